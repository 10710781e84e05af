"""Parameter steering: merged θ₀+α·τ (bit-exact restore, no drift, finiteness) and per-request low-rank τ."""

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from steer import SteeredModel, SteeringVector
from steer.errors import AlphaError, ConfigError
from steer.lowrank import TaskSteering
from steer.params import MergedTaskSteering, dense_tau
from steer.vectors.task import compute_task_vector

ALPHAS = [0.0, 0.5, -1.0, 2.0]


pytestmark = pytest.mark.usefixtures("exact_and_one_thread")


def _snap(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap):
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def _ids(b=4, t=9, seed=0):
    return torch.randint(3, 90, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    arch = request.param
    aligned, base = tiny_model(arch, seed=1), tiny_model(arch, seed=2)
    return arch, base, {r: compute_task_vector(aligned, base, rank=r, progress=False) for r in (None, 3)}


# ------------------------------------------------------------------------------ merged mode
@torch.no_grad()
def test_merged_matches_reference_and_restores(setup):
    _, model, vecs = setup
    vec, snap, ids = vecs[None], _snap(model), _ids()
    ref = {n: snap[n] + 0.7 * dense_tau(vec, n) for n in vec.meta["task"]["params"]}
    with MergedTaskSteering(model, vec, 0.7) as h:
        params = dict(model.named_parameters())
        assert all((params[n] - ref[n]).abs().max() <= 1e-6 for n in ref)  # θ₀ + α·τ
        model(ids)
    assert not h.active and _same(model, snap)
    with pytest.raises(RuntimeError, match="boom"):
        with MergedTaskSteering(model, vec, 1.0):
            raise RuntimeError("boom")
    assert _same(model, snap)


@torch.no_grad()
def test_alpha_switch_has_no_drift(setup):
    _, model, vecs = setup
    snap = _snap(model)
    with MergedTaskSteering(model, vecs[3], 0.3) as h:
        first = _snap(model)
        for a in [1.7, -2.0, 0.0, 5.5, 0.3] * 20:
            h.set_alpha(a)
        assert _same(model, first)
        h.set_alpha(0.0)
        assert _same(model, snap)
        h.set_alphas([1.0, 1.0])
        with pytest.raises(AlphaError):
            h.set_alphas([1.0, 2.0])  # merged mode has one alpha
    assert _same(model, snap)


@torch.no_grad()
def test_nonfinite_alpha_refused_untouched(setup):
    _, model, vecs = setup
    snap = _snap(model)
    with pytest.raises(AlphaError):
        MergedTaskSteering(model, vecs[None], 1e40)
    assert _same(model, snap)
    with MergedTaskSteering(model, vecs[None], 0.5) as h:
        mid = _snap(model)
        with pytest.raises(AlphaError):
            h.set_alpha(1e39)
        with pytest.raises(AlphaError):
            h.set_alpha(float("inf"))
        assert _same(model, mid) and h.alpha == 0.5
    assert _same(model, snap)


# ------------------------------------------------------------------------------ per-request mode
@torch.no_grad()
@pytest.mark.parametrize("rank", [None, 3])
def test_per_row_matches_merged_reference(setup, rank):
    """Each row of one mixed-α batch == that row alone under merged θ₀+α·τ (dense up@down reference);
    covers Conv1D (gpt2), tied wte/lm_head, position embeddings and norm weights (affine fallback)."""
    _, model, vecs = setup
    vec, ids, snap = vecs[rank], _ids(), _snap(model)
    ref = []
    for i, a in enumerate(ALPHAS):
        with MergedTaskSteering(model, vec, a):
            ref.append(model(ids[i : i + 1]).logits)
    with TaskSteering(model, vec) as h:
        h.set_alphas(ALPHAS)
        got = model(ids).logits
        h.set_alphas(0.5)
        uni = model(ids).logits
    assert (got - torch.cat(ref)).abs().max() <= 1e-5
    assert torch.equal(got[0], model(ids[:1]).logits[0]) or (got[0] - model(ids[:1]).logits[0]).abs().max() <= 1e-6
    with MergedTaskSteering(model, vec, 0.5):
        assert (uni - model(ids).logits).abs().max() <= 1e-5
    assert _same(model, snap) and not h.active
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.modules())


@torch.no_grad()
def test_generate_mixed_alphas_and_merged_mode():
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    vec = compute_task_vector(tiny_model("llama", seed=1), model, rank=4, progress=False)
    sm = SteeredModel(model, tok)
    prompts = ["w10 w11 w12", "w20 w21", "w30 w31 w32 w33", "w40"]
    mixed = sm.generate(prompts, vector=vec, alphas=ALPHAS, max_new_tokens=6)
    alone = [sm.generate([p], vector=vec, alphas=[a], max_new_tokens=6)[0] for p, a in zip(prompts, ALPHAS)]
    merged = [
        sm.generate([p], vector=vec, alphas=[a], mode="merged", max_new_tokens=6)[0] for p, a in zip(prompts, ALPHAS)
    ]
    assert mixed == alone == merged
    with pytest.raises(AlphaError):
        sm.generate(prompts, vector=vec, alphas=ALPHAS, mode="merged", max_new_tokens=2)
    with pytest.raises(ConfigError):
        sm.steer(vec, layers=[1])
    assert isinstance(sm.steer(vec, mode="merged", alpha=0.2).__enter__(), MergedTaskSteering)


@torch.no_grad()
def test_mixed_alpha_with_activation_steering():
    """Task vector per row + activation steering per row, in one batch == each row alone."""
    model = tiny_model("gpt2", seed=2)
    vec = compute_task_vector(tiny_model("gpt2", seed=1), model, rank=2, progress=False)
    act = SteeringVector({1: torch.randn(32, generator=torch.Generator().manual_seed(5))}, {"op": "ablate_add"})
    sm, ids = SteeredModel(model, tiny_tokenizer()), _ids(4, 7, seed=3)
    act_alphas = [1.0, 0.0, -2.0, 0.5]
    with sm.steer(vec) as t, sm.steer(act, layers=[1, 2]) as a:
        t.set_alphas(ALPHAS)
        a.set_alphas(act_alphas)
        got = model(ids).logits
        gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for i in range(4):
            t.set_alphas([ALPHAS[i]])
            a.set_alphas([act_alphas[i]])
            assert (got[i] - model(ids[i : i + 1]).logits[0]).abs().max() <= 1e-5
            assert torch.equal(
                gen[i], model.generate(ids[i : i + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)[0]
            )


def test_per_request_norm_deltas_and_non_affine_modules():
    """A τ touching norm weights is applied exactly per row (norm outputs are affine in their weight); a τ on a
    module whose output is not affine in it (an MoE router) is refused before any hook is attached."""
    from steer.errors import ConfigError
    from steer.lowrank import TaskSteering
    from steer.params import MergedTaskSteering
    from steer.vectors.task import compute_task_vector

    base = tiny_model("llama")
    tuned = tiny_model("llama")
    with torch.no_grad():
        tuned.model.norm.weight.add_(0.1)
        tuned.model.layers[1].input_layernorm.weight.mul_(1.5)
        tuned.model.layers[1].mlp.down_proj.weight.add_(0.01)
    tv = compute_task_vector(tuned, base, progress=False)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with TaskSteering(base, tv, 0.5) as t:
            t.set_alphas([0.5, 0.0])
            per_row = base(ids).logits
        with MergedTaskSteering(base, tv, 0.5):
            merged = base(ids).logits
        plain = base(ids).logits
    torch.testing.assert_close(per_row[0], merged[0], atol=1e-5, rtol=0)
    assert torch.equal(per_row[1], plain[1])
    moe, moe2 = tiny_model("mixtral"), tiny_model("mixtral", seed=5)
    tv_moe = compute_task_vector(moe2, moe, progress=False)
    fused = [n for n, mod in moe.named_modules() if any(p.dim() == 3 for p in mod.parameters(recurse=False))]
    if fused:  # transformers 5: fused expert tensors, used non-linearly inside one module
        with pytest.raises(ConfigError, match="not affine"):
            TaskSteering(moe, tv_moe, 1.0)
        assert not moe._forward_pre_hooks
        assert not any(m._forward_hooks or "forward" in m.__dict__ for m in moe.modules())
    else:  # transformers 4.x: router and experts are plain Linear modules, applied exactly per row
        with torch.no_grad():
            with TaskSteering(moe, tv_moe, 1.0) as t:
                uniform = moe(ids).logits
                t.set_alphas([1.0, 0.0])
                with pytest.raises(AlphaError, match="routed"):  # experts see tokens out of their rows
                    moe(ids)
            torch.testing.assert_close(uniform, moe2(ids).logits, atol=1e-5, rtol=0)
