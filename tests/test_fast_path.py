"""The CPU kernel's plan path through real hooks (the default on CPU; test_steering.py pins the reference).

Under ``generate`` with the KV cache, every steered block output must equal the op's formula applied to the
unsteered output: exactly for additions (``h + α·v``, the plan adds a precomputed ``Σ α_k v_k``), within fp32
rounding for ablations (one GEMM and one fused update). Also: the fast paths are really taken at decode steps,
rows with α = 0 or a closed gate are left bit-exact, and a layer called on its own never inherits the decode flag.
"""

import pytest
import torch
from capture import around, greedy
from tiny_models import D

from steer import Condition
from steer.kernels import cpu, native, use


@pytest.fixture(autouse=True, params=["aten", "native"])
def cpu_kernel(request):
    """The CPU path, decode steps through ATen calls or through the native op (built here if needed)."""
    try:
        previous_native = native.use(request.param == "native")
    except native.NativeBuildError as e:
        pytest.skip(f"native op cannot be built here: {e}")
    previous = use("cpu")
    yield request.param
    use(previous)
    native.use(previous_native)


def _batch():
    ids = torch.tensor([[0, 0, 7, 8, 9], [10, 11, 12, 13, 14], [0, 20, 21, 22, 23]])
    return ids, (ids != 0).long()


def _ablate_add(a, d, alpha, beta):
    q = d / d.norm()
    return a - beta * (a @ q)[..., None] * q + alpha * d


@pytest.mark.parametrize("scope", ["all", "generated"])
def test_add_is_exact_at_every_step(sm, vec, scope):
    ids, attn = _batch()
    alphas = [1.5, 0.0, -2.0]
    with around(sm.layers[2], lambda: sm.steer(vec, layers=[2], scope=scope)) as (pre, post, h):
        h.set_alphas(alphas)
        greedy(sm, ids, attn)
    assert [p.shape[1] for p in pre] == [5, 1, 1, 1]
    for step, (a, b) in enumerate(zip(pre, post)):
        for row, alpha in enumerate(alphas):
            steered = scope == "all" or step > 0
            want = a[row] + alpha * vec.directions[2] if steered else a[row]
            assert torch.equal(b[row], want), (step, row)


@pytest.mark.parametrize("alphas", [[1.0, 1.0, 1.0], [2.0, 0.0, -0.5]], ids=["uniform", "mixed_with_zero"])
def test_ablate_add_matches_the_formula_at_every_step(sm, vec, alphas):
    ids, attn = _batch()
    with around(sm.layers[1], lambda: sm.steer(vec, layers=[1], mode="ablate_add")) as (pre, post, h):
        h.set_alphas(alphas)
        greedy(sm, ids, attn)
    assert len(pre) == 4
    for a, b in zip(pre, post):
        for row, alpha in enumerate(alphas):
            if alpha == 0:
                assert torch.equal(b[row], a[row])
            else:
                want = _ablate_add(a[row], vec.directions[1], alpha, 1.0)
                torch.testing.assert_close(b[row], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["add", "ablate_add"])
def test_gate_closed_rows_stay_exact_and_open_rows_follow(sm, vec, mode):
    ids, attn = _batch()
    cdir = torch.randn(D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hs = sm.model(ids, attention_mask=attn, output_hidden_states=True).hidden_states[1]
    scores = hs[:, -1] @ (cdir / cdir.norm())
    threshold = float(scores.median())  # rows above it open the gate
    cond = Condition(layer=0, direction=cdir, threshold=threshold)
    with around(sm.layers[2], lambda: sm.steer(vec, alpha=2.0, layers=[2], mode=mode, condition=cond)) as (
        pre,
        post,
        h,
    ):
        greedy(sm, ids, attn)
        gate = h.last_gate.clone()
    assert gate.any() and not gate.all()
    for a, b in zip(pre, post):
        for row in range(3):
            if not gate[row]:
                assert torch.equal(b[row], a[row])
            elif mode == "add":
                assert torch.equal(b[row], a[row] + 2.0 * vec.directions[2])
            else:
                torch.testing.assert_close(
                    b[row], _ablate_add(a[row], vec.directions[2], 2.0, 1.0), rtol=1e-5, atol=1e-5
                )


@pytest.mark.parametrize("mode", ["add", "ablate_add"])
def test_decode_steps_take_the_plan_path(sm, vec, mode, monkeypatch):
    """The general op is not called at decode steps (add: not at all): a guard against silent slowdowns."""
    calls = []
    real = cpu.cpu_steer_
    monkeypatch.setattr(cpu, "cpu_steer_", lambda h, *a: (calls.append(h.shape[1]), real(h, *a))[1])
    ids, attn = _batch()
    with sm.steer(vec, layers=[1, 2], mode=mode, alpha=1.0):
        greedy(sm, ids, attn)
    assert calls == []


@pytest.mark.parametrize("compiling", [False, True])
def test_decode_steps_take_the_native_op_when_built_and_eager(sm, vec, cpu_kernel, compiling, monkeypatch):
    """With the native op on, every steered decode step is one native call (never while torch.compile traces:
    a pybind call would break the graph; the op itself refuses torch.jit.trace, tests/test_native.py); the
    results are checked by the tests above."""
    if cpu_kernel != "native":
        pytest.skip("native op off")
    calls, real = [], native.decode_fn()
    monkeypatch.setattr(native, "decode_fn", lambda: lambda h, *a: (calls.append(h.shape), real(h, *a))[1])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    ids, attn = _batch()
    with sm.steer(vec, layers=[1, 2], mode="ablate_add", alpha=1.0):
        greedy(sm, ids, attn)
    assert calls == ([] if compiling else [(3, 1, D)] * 6)  # 3 decode steps x 2 layers


def test_a_layer_called_alone_does_not_inherit_the_decode_flag(sm, vec):
    """After a decode step, a block called directly with [1, rows, d] must not be read as rows of one token."""
    ids, attn = _batch()
    with sm.steer(vec, layers=[1], mode="ablate_add") as h:
        h.set_alphas([1.0, 2.0, 3.0])
        greedy(sm, ids, attn, n=2)
        assert h._decode is False
        x = torch.randn(1, 3, D)
        emb = sm.model.model.rotary_emb(x, torch.arange(3)[None])
        with torch.no_grad(), pytest.raises(RuntimeError):  # 3 coefficient rows vs a batch of 1: refused
            sm.layers[1](x, position_embeddings=emb, attention_mask=None)


@pytest.mark.parametrize("site", ["output", "input"])
def test_autograd_through_the_cpu_path_one_token(sm, vec, site):
    """A plain (grad-enabled) one-token forward with ablation: the plan's in-place GEMM must not be used."""
    ids = torch.randint(3, 90, (2, 1), generator=torch.Generator().manual_seed(0))
    with sm.steer(vec, layers=[1], mode="ablate_add", site=site):
        sm.model(ids).logits.sum().backward()
    assert sm.model.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("mode", ["add", "ablate_add"])
def test_buffers_made_under_inference_mode_stay_usable(sm, vec, mode):
    ids = torch.randint(3, 90, (2, 1), generator=torch.Generator().manual_seed(0))
    with sm.steer(vec, layers=[1], mode=mode) as h:
        with torch.inference_mode():
            sm.model(ids)  # rows fitted (buffers reallocated) inside inference mode
        with torch.no_grad():
            sm.model(ids)
            h.set_alphas([1.0, 2.0])
            sm.model(ids)
