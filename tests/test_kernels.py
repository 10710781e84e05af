"""Steering op: every implementation against the plain-PyTorch reference (Liger-Kernel style).

Odd shapes (1 row, d not a power of two, many directions, J=0 or K=0), fp32/fp16/bf16, masks,
broadcast coefficients and strided h. Tolerances are honest: the implementations sum in a
different order in fp32, so fp32 agrees to ~1e-5 relative and half dtypes to one rounding
step of the dtype. Exactness claims (masked tokens, zero-coefficient rows, add-only reference)
are checked with torch.equal.

The Triton kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` in one subprocess:
``@triton.jit`` reads that variable at decoration time, for our kernel and for triton's own
jitted helpers (``tl.sum``) at ``import triton``, so it has to be set before triton is imported.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import steer.kernels as K
from steer.kernels import native
from steer.kernels.cpu import Plan, cpu_steer_
from steer.kernels.reference import reference_steer_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}

# (B, T, d, J, K)
SHAPES = [
    (1, 1, 576, 1, 1),  # decode, one row
    (1, 1, 7, 0, 1),  # add only, tiny d
    (2, 3, 37, 3, 0),  # ablate only, d prime
    (3, 4, 100, 0, 0),  # no directions: identity
    (4, 9, 257, 8, 8),  # many directions, d = 2^8 + 1
    (2, 17, 96, 16, 4),
]
MASKS = ["none", "bool", "float", "broadcast_coef"]


def make_case(B, T, d, J, Kn, dtype, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, d, generator=g) * 2).to(dtype)
    r = torch.randn(J, d, generator=g)
    r = r / r.norm(dim=1, keepdim=True)
    v = torch.randn(Kn, d, generator=g)
    vecs = torch.cat([r, v]).float()
    rows = 1 if mask_kind == "broadcast_coef" else B
    coef = torch.rand(rows, J + Kn, generator=g) * 2 - 0.5
    mask = None
    if mask_kind in ("bool", "float"):
        mask = torch.rand(B, T, generator=g) > 0.4
        mask[0, 0] = True
        mask = mask if mask_kind == "bool" else mask.float()
    return h, vecs, coef, mask


def check(impl, B, T, d, J, Kn, dtype, mask_kind):
    h, vecs, coef, mask = make_case(B, T, d, J, Kn, dtype, mask_kind)
    expected = reference_steer_(h.clone(), vecs, coef, J, mask)
    out = h.clone()
    ptr = out.data_ptr()
    ret = impl(out, vecs, coef, J, mask)
    assert ret is out and out.data_ptr() == ptr and out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol)
    if mask is not None:
        keep = mask == 0
        assert torch.equal(out[keep], h[keep])


# ---------------------------------------------------------------- reference semantics


def test_reference_add_only_is_literal():
    h, vecs, coef, _ = make_case(3, 5, 50, 0, 1, torch.float32, "none")
    alpha, v = coef[:, 0], vecs[0]
    expected = h + alpha[:, None, None] * v
    assert torch.equal(reference_steer_(h, vecs, coef, 0, torch.ones(3, 5, dtype=torch.bool)), expected)


@pytest.mark.parametrize("impl", [reference_steer_, cpu_steer_], ids=["reference", "cpu"])
def test_full_ablation_removes_projection(impl):
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(64, 3, generator=g))  # 3 orthonormal directions
    vecs = q.t().contiguous()
    h = torch.randn(2, 5, 64, generator=g, dtype=torch.float64).float()
    impl(h, vecs, torch.ones(1, 3), 3)
    assert (h @ vecs.t()).abs().max() < 1e-5


def test_ablation_uses_original_h():
    """Two identical directions with beta=1 each remove the projection twice (simultaneous)."""
    r = torch.zeros(4)
    r[0] = 1.0
    vecs = torch.stack([r, r])
    for impl in (reference_steer_, cpu_steer_):
        h = torch.tensor([[[3.0, 1.0, 0.0, 0.0]]])
        impl(h, vecs, torch.ones(1, 2), 2)
        assert torch.equal(h, torch.tensor([[[-3.0, 1.0, 0.0, 0.0]]]))


# ---------------------------------------------------------------- CPU path and dispatch


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_matches_reference(shape, dtype, mask_kind):
    check(cpu_steer_, *shape, dtype, mask_kind)


def cpu_with_plan(h, vecs, coef, n_ablate, mask=None):
    return cpu_steer_(h, vecs, coef, n_ablate, mask, Plan(vecs, n_ablate).update(coef))


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_with_plan_matches_reference(shape, dtype, mask_kind):
    check(cpu_with_plan, *shape, dtype, mask_kind)


@pytest.mark.parametrize("B,T", [(1, 1), (5, 1), (3, 4)])
def test_plan_uniform_and_per_row_beta(B, T):
    """The plan folds a beta shared by every row into the GEMM's matrix, and scales per row otherwise."""
    h, vecs, coef, _ = make_case(B, T, 61, 2, 1, torch.float32, "none")
    for beta in ([1.0] * B, [0.0] * B, [0.5] * B, [float(i % 2) for i in range(B)], [0.3 * i for i in range(B)]):
        coef[:, :2] = torch.tensor(beta)[:, None]
        plan = Plan(vecs, 2).update(coef)
        assert plan.per_row_beta == (len(set(beta)) > 1)
        expected = reference_steer_(h.clone(), vecs, coef, 2)
        torch.testing.assert_close(cpu_steer_(h.clone(), vecs, coef, 2, None, plan), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["eager", "traced"])
@pytest.mark.parametrize("beta", ["shared", "per_row"])
def test_plan_decode_forms_match_reference(form, beta):
    """The ATen decode step (native op off): GEMM into the buffer (eager) and its out=-free form (traced)."""
    h, vecs, coef, _ = make_case(5, 1, 61, 2, 2, torch.float32, "none")
    if beta == "shared":
        coef[:, :2] = 0.7
    with native.using(False):
        plan = Plan(vecs, 2).update(coef)
    got = h.clone()
    assert plan.apply_(got, True, eager=form == "eager") is True
    torch.testing.assert_close(got, reference_steer_(h.clone(), vecs, coef, 2), rtol=1e-5, atol=1e-5)


def test_plan_add_is_exactly_h_plus_alpha_v():
    h, vecs, coef, _ = make_case(4, 3, 576, 0, 1, torch.float32, "none")
    out = cpu_with_plan(h.clone(), vecs, coef, 0)
    assert torch.equal(out, h + coef[:, 0, None, None] * vecs[0])
    assert torch.equal(out, reference_steer_(h.clone(), vecs, coef, 0))


def test_plan_zero_rows_bit_exact_and_coef_untouched():
    h, vecs, coef, _ = make_case(3, 1, 75, 1, 2, torch.float32, "none")
    coef[1] = 0.0
    before = coef.clone()
    out = cpu_with_plan(h.clone(), vecs, coef, 1)
    assert torch.equal(out[1], h[1]) and not torch.equal(out[0], h[0])
    assert torch.equal(coef, before)  # the plan writes its own buffer, never the caller's coef


def test_plan_update_is_in_place_and_follows_coef():
    h, vecs, coef, _ = make_case(3, 1, 40, 1, 2, torch.float32, "none")
    plan = Plan(vecs, 1).update(coef)
    C, beta = plan.C, plan.beta
    coef2 = coef.flip(0).contiguous()
    assert plan.update(coef2) is plan and plan.C is C and plan.beta is beta  # same tensors, new values
    torch.testing.assert_close(
        cpu_steer_(h.clone(), vecs, coef2, 1, None, plan),
        reference_steer_(h.clone(), vecs, coef2, 1),
        rtol=1e-5,
        atol=1e-5,
    )
    plan.update(coef2[:1])  # new row count: new tensors
    assert plan.C.shape == (1, 3) and plan.beta.shape == (1, 1)
    add = Plan(vecs[1:], 0).update(coef[:, 1:])
    bias = add.bias
    assert add.update(coef2[:, 1:]).bias is bias


@pytest.mark.parametrize("impl", [reference_steer_, cpu_steer_, cpu_with_plan], ids=["reference", "cpu", "plan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_coef_rows_and_masked_tokens_bit_exact(impl, dtype):
    h, vecs, coef, _ = make_case(3, 6, 75, 2, 2, dtype, "none")
    coef[1] = 0.0
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, ::2] = False
    out = impl(h.clone(), vecs, coef, 2, mask)
    assert torch.equal(out[1], h[1])
    assert torch.equal(out[2, ::2], h[2, ::2])
    assert not torch.equal(out[0], h[0])


@pytest.mark.parametrize("impl", [reference_steer_, cpu_steer_], ids=["reference", "cpu"])
def test_masked_inf_stays(impl):
    h, vecs, coef, _ = make_case(1, 3, 20, 1, 1, torch.float16, "none")
    h[0, 1, 3] = float("inf")
    mask = torch.tensor([[True, False, True]])
    out = impl(h.clone(), vecs, coef, 1, mask)
    assert torch.equal(out[0, 1], h[0, 1])


@pytest.mark.parametrize("impl", [reference_steer_, cpu_steer_], ids=["reference", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_h(impl, dtype):
    h, vecs, coef, mask = make_case(3, 4, 33, 2, 1, dtype, "bool")
    big = torch.zeros(3, 2 * 4, 2 * 33, dtype=dtype)
    view = big[:, ::2, 1::2]  # non-contiguous in T and d
    view.copy_(h)
    impl(view, vecs, coef, 2, mask)
    expected = reference_steer_(h.clone(), vecs, coef, 2, mask)
    torch.testing.assert_close(view.float(), expected.float(), rtol=TOL[dtype][0], atol=TOL[dtype][1])
    big[:, ::2, 1::2] = 0
    assert not big.any()  # nothing outside the view was written


def test_empty_batch():
    vecs = torch.randn(2, 8)
    for impl in (reference_steer_, cpu_steer_, cpu_with_plan):
        for T in (3, 1):
            assert impl(torch.empty(0, T, 8), vecs, torch.ones(0, 2), 1).shape == (0, T, 8)


def test_use_switches_and_restores():
    assert K.IMPL in K.IMPLS
    previous = K.use("reference")
    try:
        assert K.IMPL == "reference"
        check(K.steer_, 2, 3, 37, 1, 2, torch.float32, "bool")
        K.use("cpu")
        check(K.steer_, 2, 3, 37, 1, 2, torch.bfloat16, "float")
        with pytest.raises(ValueError, match="expected one of"):
            K.use("cuda")
        with K.using("reference"):
            assert K.IMPL == "reference"
        assert K.IMPL == "cpu"
        with pytest.raises(RuntimeError), K.using("reference"):
            raise RuntimeError
        assert K.IMPL == "cpu"  # restored after an exception too
    finally:
        K.use(previous)


def test_import_is_cheap_and_env_override():
    code = "import sys, steer.kernels as k; print(k.IMPL, 'triton' in sys.modules, hasattr(k, '__version__'))"
    env = {**os.environ, "STEER_KERNEL": "reference"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["reference", "False", "False"]


def test_kernels_import_nothing_of_the_project():
    allowed = {
        "__future__",
        "contextlib",
        "functools",
        "hashlib",
        "importlib",
        "ninja",
        "math",
        "os",
        "pathlib",
        "platform",
        "platformdirs",
        "shutil",
        "sys",
        "time",
        "torch",
        "triton",
        "warnings",
    }
    own = {p.stem for p in pathlib.Path(K.__file__).parent.glob("*.py")}
    for path in pathlib.Path(K.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = (
                    [node.module.split(".")[0]]
                    if node.level == 0
                    else ([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
                )
                if node.level:
                    assert set(names) <= own, f"{path.name}: relative import {names}"
                    continue
            else:
                continue
            assert set(names) <= allowed, f"{path.name} imports {names}"


# ---------------------------------------------------------------- Triton (interpreted on CPU)


def _run_triton_interpreted() -> int:
    """Run every Triton case for every dtype; print failures; return their count.

    Called in a subprocess started with TRITON_INTERPRET=1 (see the test below).
    """
    import warnings

    from steer.kernels.triton_steer import _steer_kernel, triton_steer_

    if type(_steer_kernel).__name__ != "InterpretedFunction":
        print("kernel is not interpreted: TRITON_INTERPRET was not seen at decoration time")
        return 1
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy: inf - inf on masked tokens
    cases = [("masked-inf", test_masked_inf_stays, (triton_steer_,))]
    for dtype in DTYPES:
        cases += [
            (f"{dtype} {shape} mask={mask_kind}", check, (triton_steer_, *shape, dtype, mask_kind))
            for shape in SHAPES
            for mask_kind in MASKS
        ]
        cases += [
            (f"{dtype} strided", test_strided_h, (triton_steer_, dtype)),
            (f"{dtype} bit-exact", test_zero_coef_rows_and_masked_tokens_bit_exact, (triton_steer_, dtype)),
        ]
    failures = 0
    for name, fn, args in cases:
        try:
            fn(*args)
        except Exception as exc:  # report every failing case, not just the first
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    print(f"{len(cases) - failures}/{len(cases)} triton interpreted cases passed")
    return min(failures, 100)


_SUBPROCESS = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_kernel_tests', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
    "sys.exit(mod._run_triton_interpreted())\n"
)


def test_triton_interpreted_matches_reference():
    """The Triton kernel under TRITON_INTERPRET=1 on CPU tensors (all shapes, dtypes, masks,
    strided h, bit-exactness), in a fresh interpreter.

    A subprocess, because ``@triton.jit`` reads TRITON_INTERPRET when a function is decorated
    — including triton's own ``tl.sum`` at ``import triton`` — so it must be set before triton
    is first imported, and must not leak into CUDA tests of this process.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_steer_cuda_matches_reference(shape, dtype):
    """Through the public dispatch (the Triton kernel when triton is installed)."""
    h, vecs, coef, mask = make_case(*shape, dtype, "bool")
    expected = reference_steer_(h.clone(), vecs, coef, shape[3], mask)
    out = K.steer_(h.cuda(), vecs.cuda(), coef.cuda(), shape[3], mask.cuda())
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=TOL[dtype][0], atol=TOL[dtype][1])
    assert torch.equal(out.cpu()[~mask], h[~mask])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_cuda_steering_through_each_path_matches_reference(impl):
    """Steering hooks on a CUDA model, prompt and decode steps (KV cache), mixed α with a zero row: each CUDA
    path ("cpu": a Plan's ATen calls; "triton": the kernel) gives the reference path's logits."""
    if impl == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from tiny_models import D, tiny_model

    from steer import SteeringVector
    from steer.config import SteeringConfig
    from steer.hooks import Steering

    model = tiny_model("llama").cuda()
    g = torch.Generator().manual_seed(3)
    vec = SteeringVector({1: torch.randn(D, generator=g), 2: torch.randn(D, generator=g)}, {"op": "ablate_add"})
    config = SteeringConfig(mode="ablate_add", layers=[1, 2], alpha=1.0)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]], device="cuda")

    def run(name):
        with K.using(name), Steering(model, vec, config) as s, torch.no_grad():
            assert isinstance(s._plans[1], K.Plan) == (name == "cpu")  # the CPU Plan path is used on CUDA too
            s.set_alphas([1.5, 0.0, -2.0])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return torch.stack(out.logits).cpu(), out.sequences.cpu()

    want_logits, want_seq = run("reference")
    got_logits, got_seq = run(impl)
    assert torch.equal(got_seq, want_seq)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
