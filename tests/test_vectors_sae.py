"""SAE features: runtime clamp / add ops against plain computations (no sae-lens), then sae-lens loading and
training, feature ranking, the CLI, and the built-in family's held-out AUC."""

import random

import pytest
import torch
from capture import assert_unhooked
from tiny_models import D, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from steer import SteeredModel, SteeringVector
from steer.errors import AlphaError, ConfigError, VectorFileError
from steer.kernels import use
from steer.sae_clamp import SAEWeights, clamp_features

LAYER, M = 2, 64


@pytest.fixture(autouse=True)
def setup_env():
    previous = use("reference")
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: avoid OpenMP spin-waits on a busy 2-core machine
    yield
    torch.set_num_threads(old)
    use(previous)


@pytest.fixture(scope="module")
def sm():
    return SteeredModel(tiny_model("llama"), tiny_tokenizer())


def _weights(activation="relu", seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(M, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return SAEWeights(
        W_dec.T.clone() * 3,
        torch.randn(M, generator=g) * 0.1,
        W_dec,
        torch.randn(D, generator=g) * 0.1,
        activation,
        6 if activation == "topk" else None,
        torch.full((M,), 0.05) if activation == "jumprelu" else None,
    )


def _vector(sm, w, layer=LAYER, site="output"):
    meta = {
        "kind": "sae",
        "site": site,
        "model": sm.fingerprint(),
        "sae": {"layer": layer, "site": site, "features": [{"id": 5}, {"id": 9}], **w.info()},
    }
    return SteeringVector({layer: w.W_dec[[5, 9]]}, meta, None, w.tensors())


def _plain_encode(w, x):
    pre = (x - w.b_dec) @ w.W_enc + w.b_enc
    if w.activation == "relu":
        return torch.relu(pre)
    if w.activation == "jumprelu":
        return torch.where(pre > w.threshold, pre, torch.zeros_like(pre))
    kth = pre.topk(w.k, dim=-1).values[..., -1:]
    return torch.where(pre >= kth, torch.relu(pre), torch.zeros_like(pre))


def _logits_with_hook(sm, ids, layer, fn, site="output"):
    block = sm.layers[layer]
    if site == "output":
        h = block.register_forward_hook(lambda m, a, o: (fn(o[0]), *o[1:]) if isinstance(o, tuple) else fn(o))
    else:
        h = block.register_forward_pre_hook(
            lambda m, a, k: ((fn(a[0]), *a[1:]), k) if a else (a, {**k, "hidden_states": fn(k["hidden_states"])}),
            with_kwargs=True,
        )
    try:
        return sm.model(ids).logits
    finally:
        h.remove()


IDS = torch.randint(3, 90, (3, 10), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("site", ["output", "input"])
def test_clamp_matches_plain_computation(sm, activation, site):
    w = _weights(activation)
    vec = _vector(sm, w, site=site)
    feats, c = [5, 9], 4.0

    def plain(h):  # encode, replace, decode, keep the SAE's error: decode(a') + (h - decode(a))
        a = _plain_encode(w, h)
        a2 = a.clone()
        a2[..., feats] = c
        return (a2 @ w.W_dec + w.b_dec) + (h - (a @ w.W_dec + w.b_dec))

    want = _logits_with_hook(sm, IDS, LAYER, plain, site)
    with clamp_features(sm, vec, features=feats, value=c) as handle:
        assert handle.site == site and handle.layers == [LAYER]
        got = sm.model(IDS).logits
    assert (got - want).abs().max() <= 1e-5
    assert_unhooked(sm.model, sm.layers)


@torch.no_grad()
def test_clamp_per_row_values(sm):
    w = _weights("relu")
    vec = _vector(sm, w)
    base = sm.model(IDS).logits
    with clamp_features(sm, vec, features=[5], value=[None, 3.0, -1.0]) as handle:
        rows = sm.model(IDS).logits
        handle.set_alphas(3.0)
        all3 = sm.model(IDS).logits
        handle.set_alphas(-1.0)
        alln = sm.model(IDS).logits
    assert torch.equal(rows[0], base[0])  # None = row untouched
    assert torch.allclose(rows[1], all3[1], atol=1e-6) and torch.allclose(rows[2], alln[2], atol=1e-6)


@torch.no_grad()
def test_add_feature_direction_matches_plain(sm):
    from steer.vectors.sae import feature_vector

    w = _weights("topk")
    vec = _vector(sm, w)
    one = feature_vector(vec, 9)
    assert torch.equal(one.directions[LAYER], w.W_dec[9]) and one.meta["sae"]["features"][0]["id"] == 9
    want = _logits_with_hook(sm, IDS, LAYER, lambda h: h + 2.5 * w.W_dec[9])
    with sm.steer(one, alpha=2.5, layers=[LAYER]):
        got = sm.model(IDS).logits
    assert (got - want).abs().max() <= 1e-6
    with pytest.raises(ConfigError):
        feature_vector(vec, M)


def test_clamp_validation_before_attaching(sm, tmp_path):
    w = _weights("relu")
    vec = _vector(sm, w)
    for kwargs, err in (
        ({"features": [M]}, ConfigError),
        ({"features": [True]}, ConfigError),
        ({"features": [1], "value": float("nan")}, AlphaError),
        ({"features": [1], "layers": [99]}, Exception),
    ):
        with pytest.raises(err):
            clamp_features(sm, vec, **kwargs)
        assert_unhooked(sm.model, sm.layers)
    with pytest.raises(VectorFileError):
        clamp_features(sm, SteeringVector({1: torch.ones(D)}), features=[1])
    with clamp_features(sm, vec, features=[1], value=[1.0, 2.0]):
        with pytest.raises(AlphaError):
            sm.model(IDS)  # 3 rows, 2 values
    assert_unhooked(sm.model, sm.layers)
    # round trip through a file; default feature = the top one
    loaded = SteeringVector.load(vec.save(tmp_path / "s.safetensors"))
    with clamp_features(sm, loaded, value=1.0) as h:
        assert h.features == [5]
    with pytest.raises(RuntimeError, match="boom"):
        with clamp_features(sm, loaded, value=1.0):
            raise RuntimeError("boom")
    assert_unhooked(sm.model, sm.layers)


def test_auc_and_hook_names():
    from steer.vectors.sae import auc, hook_to_layer

    pos = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    neg = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # col 0: pairs (3>0,3>1,2>0,2>1,0<0? tie,0<1) -> (4 + 0.5) / 6 ; col 1: ties 4 pairs, 1>0 twice -> (2+2)/6
    assert torch.allclose(auc(pos, neg), torch.tensor([4.5 / 6, 4 / 6]))
    assert hook_to_layer("blocks.7.hook_resid_post") == (7, "output")
    assert hook_to_layer("blocks.0.hook_resid_pre") == (0, "input")
    with pytest.raises(ConfigError):
        hook_to_layer("blocks.3.attn.hook_z")


# ------------------------------------------------------------------------------------------ sae-lens
def _prompts(seed=0, n=24):
    r = random.Random(seed)
    harm = [" ".join(f"w{r.randrange(10, 40)}" for _ in range(6)) for _ in range(n)]
    safe = [" ".join(f"w{r.randrange(50, 90)}" for _ in range(6)) for _ in range(n)]
    return harm, safe


@torch.no_grad()
def test_weights_from_sae_lens_match_encode_decode():
    sl = pytest.importorskip("sae_lens")
    from steer.vectors.sae import weights_from_sae_lens

    torch.manual_seed(0)
    x = torch.randn(50, D)
    std = sl.StandardSAE(sl.StandardSAEConfig(d_in=D, d_sae=M))
    std.b_enc.data.normal_(0, 0.1)
    std.b_dec.data.normal_(0, 0.1)
    topk = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=D, d_sae=M, k=5))  # rescale_acts_by_decoder_norm=True
    topk.W_dec.data.mul_(torch.rand(M, 1) + 0.5)
    for sae in (std, topk):
        w = weights_from_sae_lens(sae)
        torch.testing.assert_close(w.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w.decode(w.encode(x)), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)


def test_train_rank_save_load_and_cli(sm, tmp_path):
    pytest.importorskip("sae_lens")
    from steer.cli import app
    from steer.vectors.sae import compute_sae_features, heldout_auc

    harm, safe = _prompts()
    vec = compute_sae_features(
        sm,
        LAYER,
        harm,
        safe,
        train=True,
        steps=150,
        k=4,
        d_sae=64,
        top=5,
        save_sae=str(tmp_path / "sae"),
        progress=False,
    )
    info = vec.meta["sae"]
    assert vec.kind == "sae" and vec.directions[LAYER].shape == (5, D) and info["activation"] == "topk"
    assert info["k"] == 4 and {"fvu", "l0", "dead"} <= set(info["stats"]) and info["stats"]["l0"] <= 4
    assert info["stats"]["fvu"] < 1.0 and len(info["features"]) == 5
    assert torch.equal(vec.directions[LAYER], vec.extra["sae.W_dec"][[f["id"] for f in info["features"]]])
    seps = [f["separation"] for f in info["features"]]
    assert seps == sorted(seps, reverse=True)
    again = heldout_auc(sm, vec, harm, safe)
    assert all(abs(again[f["id"]] - f["auc"]) < 1e-6 for f in info["features"])
    # the saved sae-lens SAE loads back to the same weights, its hook name mapping to the layer
    from_disk = compute_sae_features(sm, LAYER, harm, safe, sae=tmp_path / "sae", top=5, progress=False)
    assert [f["id"] for f in from_disk.meta["sae"]["features"]] == [f["id"] for f in info["features"]]
    assert from_disk.meta["sae"]["site"] == "output"
    with pytest.raises(ConfigError):
        compute_sae_features(sm, LAYER + 1, harm, safe, sae=tmp_path / "sae", progress=False)
    # CLI
    sm.model.save_pretrained(tmp_path / "m")
    sm.tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "h.txt").write_text("\n".join(harm))
    (tmp_path / "s.txt").write_text("\n".join(safe))
    out = tmp_path / "v.safetensors"
    res = CliRunner().invoke(
        app,
        [
            "vectors",
            "sae",
            str(tmp_path / "m"),
            "--layer",
            str(LAYER),
            "--harmful",
            str(tmp_path / "h.txt"),
            "--harmless",
            str(tmp_path / "s.txt"),
            "--sae",
            str(tmp_path / "sae"),
            "--top",
            "3",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert SteeringVector.load(out).directions[LAYER].shape == (3, D)
    res = CliRunner().invoke(
        app,
        [
            "vectors",
            "sae",
            str(tmp_path / "m"),
            "--layer",
            "1",
            "--harmful",
            str(tmp_path / "h.txt"),
            "--harmless",
            str(tmp_path / "s.txt"),
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 2 and "--train" in res.output


# ------------------------------------------------------------------------------------------ the family
def test_family_sae_features_separate_heldout(request):
    pytest.importorskip("sae_lens")
    from steer.family import language as lang
    from steer.vectors.sae import compute_sae_features, heldout_auc

    aligned = SteeredModel.from_pretrained(request.getfixturevalue("family")["aligned"])
    rng = random.Random(0)
    harm = rng.sample([r.prompt for r in lang.harmful_prompts("train")], 96)
    safe = rng.sample([r.prompt for r in lang.harmless_prompts("train")], 96)
    vec = compute_sae_features(
        aligned, aligned.num_layers // 2, harm, safe, train=True, steps=600, k=8, top=4, progress=False
    )
    got = heldout_auc(
        aligned,
        vec,
        [r.prompt for r in lang.harmful_prompts("heldout", cap=64)],
        [r.prompt for r in lang.harmless_prompts("heldout", cap=64)],
    )
    best = max(max(a, 1 - a) for a in got.values())
    assert best >= 0.9, (got, vec.meta["sae"]["stats"])


def test_clamp_warns_when_its_block_forward_is_replaced():
    import functools
    import warnings

    from steer.sae_clamp import FeatureClamp

    model = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5]])
    block = model.model.layers[LAYER]
    with FeatureClamp(model, _weights(), [5], 4.0, layers=[LAYER]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                model(ids)
        block.forward = functools.partial(type(block).forward, block)  # drops the clamp's wrapper
        with pytest.warns(RuntimeWarning, match="LlamaDecoderLayer was replaced after steering was attached"):
            with torch.no_grad():
                model(ids)
    del block.forward
    assert_unhooked(model, model.model.layers)
