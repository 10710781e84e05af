"""Safety task vectors: τ = θ_aligned − θ_base, low-rank / top-k variants, and exact application/restoration."""

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from steer import SteeredModel, SteeringVector
from steer.cli import app
from steer.errors import AlphaError, ModelMismatchError, VectorFileError
from steer.params import dense_tau
from steer.vectors.task import apply_task_vector, compute_task_vector, low_rank, unique_parameters


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine (10-100x)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap):
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    return request.param, tiny_model(request.param, seed=1), tiny_model(request.param, seed=2)


@torch.no_grad()
def test_base_plus_tau_reproduces_aligned(pair):
    arch, aligned, base = pair
    vec = compute_task_vector(aligned, base, progress=False)
    ids = torch.randint(3, 90, (3, 12), generator=torch.Generator().manual_seed(0))
    snap = _snapshot(base)
    want = aligned(ids).logits
    with apply_task_vector(base, vec, 1.0) as h:
        assert h.active
        got = base(ids).logits
        gen_b = base.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(gen_b, aligned.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
    assert _same(base, snap) and not h.active  # original tensors restored bit-exactly


def test_tied_and_conv1d_recorded():
    aligned, base = tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=2)
    vec = compute_task_vector(aligned, base, progress=False)
    params = vec.meta["task"]["params"]
    assert "lm_head.weight" not in params and "transformer.wte.weight" in params  # tied: stored once
    assert params["transformer.h.0.mlp.c_fc.weight"]["conv1d"] is True
    assert params["transformer.wte.weight"]["conv1d"] is False
    assert set(unique_parameters(base)) >= set(params)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_low_rank_factors_match_svd(arch):
    aligned, base = tiny_model(arch, seed=1), tiny_model(arch, seed=2)
    vec = compute_task_vector(aligned, base, rank=3, progress=False)
    conv = {n for n, i in vec.meta["task"]["params"].items() if i["conv1d"]}
    assert bool(conv) == (arch == "gpt2")
    pa, pb = dict(aligned.named_parameters()), dict(base.named_parameters())
    for name, info in vec.meta["task"]["params"].items():
        tau = (pa[name] - pb[name]).detach()
        if tau.dim() != 2:
            assert info["rank"] is None and torch.equal(vec.extra[f"task.{name}"], tau)
            continue
        mat = tau.T if info["conv1d"] else tau  # Linear orientation [out, in]
        up, down = vec.extra[f"task.{name}.up"], vec.extra[f"task.{name}.down"]
        assert up.shape == (mat.shape[0], 3) and down.shape == (3, mat.shape[1])
        u, s, vh = torch.linalg.svd(mat)
        ref = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        assert torch.allclose(up @ down, ref, atol=1e-5)
        assert info["energy"] == pytest.approx(float(s[:3].pow(2).sum() / s.pow(2).sum()), abs=1e-5)
        assert torch.allclose(dense_tau(vec, name), ref.T if info["conv1d"] else ref, atol=1e-5)


@torch.no_grad()
def test_full_rank_reproduces_and_energy_grows():
    aligned, base = tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=2)
    full = compute_task_vector(aligned, base, rank=10_000, progress=False)
    assert all(i["energy"] == pytest.approx(1.0, abs=1e-5) for i in full.meta["task"]["params"].values())
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    with apply_task_vector(base, full, 1.0):
        assert (base(ids).logits - aligned(ids).logits).abs().max() <= 1e-4
    e2, e8 = (compute_task_vector(aligned, base, rank=r, progress=False).meta["task"]["params"] for r in (2, 8))
    assert all(e2[n]["energy"] < e8[n]["energy"] for n in e2 if e2[n]["rank"])


def test_low_rank_helper_randomized_branch():
    torch.manual_seed(0)
    m = torch.randn(1100, 8) @ torch.randn(8, 1200)  # rank 8: randomized SVD is exact up to rounding
    up, down, energy = low_rank(m, 8)
    assert energy == pytest.approx(1.0, abs=1e-4) and torch.allclose(up @ down, m, atol=1e-3)


def test_include_exclude_and_top_k():
    aligned, base = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    vec = compute_task_vector(aligned, base, include=r"mlp\.", exclude="down_proj", top_k=0.25, progress=False)
    names = list(vec.meta["task"]["params"])
    assert names and all(".mlp." in n and "down_proj" not in n for n in names)
    pa, pb = dict(aligned.named_parameters()), dict(base.named_parameters())
    for n in names:
        tau = (pa[n] - pb[n]).detach()
        kept = vec.extra[f"task.{n}"]
        k = round(0.25 * tau.numel())
        assert int((kept != 0).sum()) == k == vec.meta["task"]["params"][n]["kept"]
        assert torch.equal(kept[kept != 0], tau[kept != 0])  # kept entries are exact
        assert kept.abs().max() == tau.abs().max() and (kept != 0).sum() < tau.numel()
        assert tau.abs()[kept == 0].max() <= kept.abs()[kept != 0].min()
    snap = _snapshot(base)
    with apply_task_vector(base, vec, 0.5):
        changed = {n for n, p in base.named_parameters() if not torch.equal(p, snap[n])}
    assert changed == set(names) and _same(base, snap)


def test_save_load_negation_and_harm_role(tmp_path):
    aligned, base = tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=2)
    vec = compute_task_vector(aligned, base, rank=4, role="harm", progress=False)
    assert vec.kind == "task" and vec.recommended["alpha"] == -1.0 and not vec.directions
    loaded = SteeringVector.load(vec.save(tmp_path / "t.safetensors"))
    assert loaded.meta["task"] == vec.meta["task"]
    assert all(torch.equal(loaded.extra[k], vec.extra[k]) for k in vec.extra)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with apply_task_vector(base, loaded, -0.7):
            a = base(ids).logits
        with apply_task_vector(base, -loaded, 0.7):
            b = base(ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(VectorFileError):
        loaded + loaded


def test_errors_leave_model_untouched():
    aligned, base = tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=2)
    vec = compute_task_vector(aligned, base, progress=False)
    snap = _snapshot(base)
    with pytest.raises(AlphaError):
        apply_task_vector(base, vec, 1e40)  # overflows to inf: refused before committing
    with pytest.raises(AlphaError):
        apply_task_vector(base, vec, float("nan"))
    other = tiny_model("llama", seed=3)
    with pytest.raises(ModelMismatchError):
        apply_task_vector(other, vec, 1.0)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_task_vector(base, vec, 1.0):
            raise RuntimeError("boom")
    assert _same(base, snap)
    with pytest.raises(ModelMismatchError):
        compute_task_vector(tiny_model("llama"), base, progress=False)
    with pytest.raises(VectorFileError):
        compute_task_vector(aligned, base, include="no-such-param", progress=False)
    with pytest.raises(VectorFileError):
        compute_task_vector(aligned, aligned, progress=False)  # identical models: nothing to store


def test_cli_task(tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        tiny_model("gpt2", seed=seed).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    out = tmp_path / "tau.safetensors"
    res = CliRunner().invoke(
        app,
        [
            "vectors",
            "task",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "-o",
            str(out),
            "--include",
            "mlp",
            "--rank",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "energy" in res.output and out.is_file()
    vec = SteeringVector.load(out)
    assert vec.meta["task"]["rank"] == 2 and all("mlp" in n for n in vec.meta["task"]["params"])
    res = CliRunner().invoke(
        app, ["vectors", "task", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--top-k", "1.5"]
    )
    assert res.exit_code == 2 and "top_k" in res.output


# ------------------------------------------------------------------------------------------ the family
def test_family_aligned_equals_base_plus_tau(request):
    from steer.family import language as lang

    paths = request.getfixturevalue("family")  # may build the family: not under no_grad
    with torch.no_grad():
        aligned, base = SteeredModel.from_pretrained(paths["aligned"]), SteeredModel.from_pretrained(paths["base"])
        vec = compute_task_vector(aligned, base, progress=False)
        prompts = [r.prompt for r in lang.harmful_prompts("heldout", cap=8)] + [
            r.prompt for r in lang.harmless_prompts("heldout", cap=8)
        ]
        enc = base.encode(base.format(prompts), True, position_ids=True)
        want = aligned.model(**enc).logits
        snap = _snapshot(base.model)
        with apply_task_vector(base, vec, 1.0):
            got = base.model(**enc).logits
            out_b = base.generate(prompts, max_new_tokens=16)
        assert (got - want).abs().max() <= 1e-5
        assert out_b == aligned.generate(prompts, max_new_tokens=16)
        assert _same(base.model, snap)
