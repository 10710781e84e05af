"""The optional native decode step (kernels/native.cpp) against the plain-PyTorch reference.

Built here on first use (~25 s with g++ and ninja; cached under $STEER_CACHE_DIR or the user cache dir);
skipped cleanly where it cannot be built. Tolerances: fp32 with a different summation order than the
reference's BLAS calls, so 1e-5 relative/absolute on O(1) values; rows with zero coefficients stay bit-exact.
"""

import subprocess
import sys

import pytest
import torch

from steer.kernels import native, reference_steer_
from steer.kernels.cpu import Plan, cpu_steer_


@pytest.fixture(scope="module")
def op():
    try:
        return native.build().decode_
    except native.NativeBuildError as e:
        pytest.skip(f"native op cannot be built here: {e}")


def _case(B, d, J, K, per_row_beta, seed=0):
    g = torch.Generator().manual_seed(seed)
    vecs = torch.randn(J + K, d, generator=g)
    vecs[:J] /= vecs[:J].norm(dim=1, keepdim=True)
    coef = torch.randn(B, J + K, generator=g)
    if not per_row_beta:
        coef[:, :J] = coef[:1, :J]
    return torch.randn(B, 1, d, generator=g), vecs, coef


@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("d", [1, 7, 576, 1000])
@pytest.mark.parametrize("J,K", [(1, 0), (1, 1), (2, 3), (5, 1)])
@pytest.mark.parametrize("per_row_beta", [False, True])
def test_decode_matches_reference(op, B, d, J, K, per_row_beta):
    h, vecs, coef = _case(B, d, J, K, per_row_beta)
    plan = Plan(vecs, J).update(coef)
    got = h.clone()
    assert op(got, plan.R, plan.beta, plan.bias) is True
    torch.testing.assert_close(got, reference_steer_(h.clone(), vecs, coef, J), rtol=1e-5, atol=1e-5)


def test_zero_rows_bit_exact_and_operands_untouched(op):
    h, vecs, coef = _case(4, 96, 2, 1, True)
    coef[1] = 0.0
    coef[3] = 0.0
    plan = Plan(vecs, 2).update(coef)
    before = [t.clone() for t in (plan.R, plan.beta, plan.bias)]
    got = h.clone()
    op(got, plan.R, plan.beta, plan.bias)
    assert torch.equal(got[1], h[1]) and torch.equal(got[3], h[3])
    assert all(torch.equal(a, b) for a, b in zip(before, (plan.R, plan.beta, plan.bias)))


def test_inputs_it_does_not_handle_are_refused_unchanged(op):
    """False and h untouched for anything but fp32 contiguous [B, 1, d] with matching operands."""
    h, vecs, coef = _case(3, 16, 1, 1, False)
    plan = Plan(vecs, 1).update(coef)
    cases = {
        "fp16": h.half(),
        "two tokens": torch.randn(3, 2, 16),
        "strided": torch.randn(3, 1, 32)[..., ::2],
        "other batch": torch.randn(2, 1, 16),
        "other width": torch.randn(3, 1, 17),
        "2-D": torch.randn(3, 16),
    }
    for name, x in cases.items():
        before = x.clone()
        assert op(x, plan.R, plan.beta, plan.bias) is False, name
        assert torch.equal(x, before), name
    bad_operands = {
        "beta of the wrong width": (plan.R, plan.beta[:, :0], plan.bias),
        "bias of the wrong size": (plan.R, plan.beta, plan.bias[:2]),
        "bias flat": (plan.R, plan.beta, plan.bias.reshape(3, 16)),
        "R strided": (torch.randn(1, 32)[:, ::2], plan.beta, plan.bias),
        "bias strided": (plan.R, plan.beta, torch.randn(3, 1, 32)[..., ::2]),
        "R on another device": (plan.R.to("meta"), plan.beta, plan.bias),
        "R 1-D": (plan.R[0], plan.beta, plan.bias),
        "R 0-D": (torch.tensor(1.0), plan.beta, plan.bias),
        "beta fp64": (plan.R, plan.beta.double(), plan.bias),
    }
    for name, operands in bad_operands.items():
        x = h.clone()
        assert op(x, *operands) is False, name
        assert torch.equal(x, h), name


def test_autograd_and_inference_tensors_are_left_to_aten(op):
    """h that autograd tracks, or an inference tensor outside inference mode (ATen refuses in-place there)."""
    h, vecs, coef = _case(2, 8, 1, 1, False)
    plan = Plan(vecs, 1).update(coef)
    leaf = h.clone().requires_grad_()
    tracked = leaf * 1
    assert op(tracked, plan.R, plan.beta, plan.bias) is False
    with torch.no_grad():
        assert op(h.clone().requires_grad_(), plan.R, plan.beta, plan.bias) is True  # grad off: fine
    with torch.inference_mode():
        inference = h.clone()
    assert op(inference, plan.R, plan.beta, plan.bias) is False
    assert torch.equal(inference, h)
    got = cpu_steer_(leaf * 1, vecs, coef, 1, None, plan)  # with the plan: the general path, gradients flow
    got.sum().backward()
    assert leaf.grad is not None


def test_wrapped_and_lazy_tensors_and_dispatch_modes_are_refused(op):
    """Forward-AD duals (the tangent would be skipped), neg-bit views, functionalized tensors, and any active
    TorchDispatchMode (make_fx / FakeTensorMode would not record a raw write)."""
    import torch.autograd.forward_ad as fwAD
    from torch.utils._python_dispatch import TorchDispatchMode

    h, vecs, coef = _case(2, 8, 1, 1, False)
    plan = Plan(vecs, 1).update(coef)
    with fwAD.dual_level():
        dual = fwAD.make_dual(h.clone(), torch.ones_like(h))
        assert op(dual, plan.R, plan.beta, plan.bias) is False
    x = h.clone()
    assert op(torch._neg_view(x), plan.R, plan.beta, plan.bias) is False

    def functional(t):
        assert op(t, plan.R, plan.beta, plan.bias) is False
        return t

    torch.func.functionalize(functional)(h.clone())

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Recording():
        assert op(x, plan.R, plan.beta, plan.bias) is False
    assert torch.equal(x, h)

    def traced(t):
        t = t.clone()
        assert op(t, plan.R, plan.beta, plan.bias) is False  # the trace would not record the write
        return t

    torch.jit.trace(traced, h.clone(), check_trace=False)


def test_empty_batch(op):
    plan = Plan(torch.randn(2, 8), 1).update(torch.zeros(0, 2))
    assert op(torch.zeros(0, 1, 8), plan.R, plan.beta, plan.bias) is True


def test_bumps_the_version_like_an_in_place_op(op):
    h, vecs, coef = _case(2, 8, 1, 1, False)
    plan = Plan(vecs, 1).update(coef)
    v = h._version
    op(h, plan.R, plan.beta, plan.bias)
    assert h._version > v
    with torch.inference_mode():
        x = h.clone()
        assert op(x, plan.R, plan.beta, plan.bias) is True  # inference tensors have no version


def test_plan_uses_it_at_decode_and_not_for_prompts(op, monkeypatch):
    h, vecs, coef = _case(3, 40, 1, 2, True)
    calls = []
    monkeypatch.setattr(native, "decode_fn", lambda: lambda x, *a: (calls.append(x.shape[1]), op(x, *a))[1])
    plan = Plan(vecs, 1).update(coef)
    prompt = torch.randn(3, 5, 40)
    want = [reference_steer_(x.clone(), vecs, coef, 1) for x in (h, prompt)]
    got = [cpu_steer_(x.clone(), vecs, coef, 1, None, plan) for x in (h, prompt)]
    assert calls == [1]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_switches(op, monkeypatch):
    monkeypatch.delenv("STEER_NATIVE", raising=False)
    vecs = torch.randn(2, 8)
    assert Plan(vecs, 1).native is not None  # built: used by default
    assert Plan(vecs, 0).native is None  # add only stays one ATen add_
    assert Plan(vecs.double(), 1).native is None
    assert Plan(vecs.to("meta"), 1).native is None  # CPU only
    with native.using(False):
        assert Plan(vecs, 1).native is None
    assert Plan(vecs, 1).native is not None  # the previous choice is back
    monkeypatch.setenv("STEER_NATIVE", "0")
    assert Plan(vecs, 1).native is None


def test_not_built_means_not_used_and_never_compiled_on_import(tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load() is None and native.decode_fn() is None
    assert Plan(torch.randn(2, 8), 1).native is None
    assert not (tmp_path / "native").exists()


def test_missing_ninja_is_a_clear_error(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as ext

    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_build_error", None)
    monkeypatch.setattr(ext, "verify_ninja_availability", no_ninja)
    with pytest.raises(native.NativeBuildError, match="pip install ninja"):
        native.build()
    monkeypatch.setattr(ext, "verify_ninja_availability", lambda: None)
    with pytest.raises(native.NativeBuildError, match="pip install ninja"):
        native.use(True)  # remembered: a process tries to build once
    assert native._override is None  # a failed use(True) changes nothing


def test_a_library_that_does_not_import_is_a_warning_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    native.build_dir().mkdir(parents=True)
    (native.build_dir() / f"{native._name()}.so").write_bytes(b"not a shared library")
    with pytest.warns(RuntimeWarning, match="does not load"):
        assert native.decode_fn() is None
    assert Plan(torch.randn(2, 8), 1).native is None  # attaching still works, on the ATen path


def test_a_build_in_progress_is_not_loaded(op, tmp_path, monkeypatch):
    """torch holds ``lock`` in the build folder while compiling and linking: the library may be incomplete."""
    import shutil

    built = native._library(native.build_dir(), native._name())  # where the fixture built it
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    native.build_dir().mkdir(parents=True)
    shutil.copy(built, native.build_dir() / built.name)
    (native.build_dir() / "lock").touch()
    assert native.load() is None
    (native.build_dir() / "lock").unlink()
    assert native.load() is not None


def test_command_line_build_reports_the_library(op):
    out = subprocess.run([sys.executable, "-m", "steer.kernels.native"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ready" in out.stdout and "RuntimeWarning" not in out.stderr


def test_build_locks_young_refused_stale_dropped(tmp_path):
    """torch's build waits without a timeout while its lock exists: a killed build's lock must not hang us."""
    import os
    import time

    lock = tmp_path / "lock"
    native._check_lock(lock)  # no lock: nothing to do
    lock.touch()
    with pytest.raises(native.NativeBuildError, match="another build"):
        native._check_lock(lock)
    old = time.time() - native._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    native._check_lock(lock)
    assert not lock.exists()
