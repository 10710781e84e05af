"""The fused steering op: ``h <- h - sum_j beta_j (h.r_j) r_j + sum_k alpha_k v_k`` in place.

Three implementations behind :func:`steer_`, chosen once at import (override with the
``STEER_KERNEL`` environment variable, :func:`use` or :func:`using`):

* ``"reference"`` — :mod:`.reference`, the literal plain-PyTorch spec (every device);
* ``"cpu"``       — :mod:`.cpu`, few ATen calls, per-row operands precomputed in a ``Plan`` (every device);
  its decode step is one C++ call when the optional :mod:`.native` op has been built
  (``python -m steer.kernels.native``; ``STEER_NATIVE=0`` turns it off);
* ``"triton"``    — :mod:`.triton_steer` for CUDA tensors, the ``"cpu"`` path for the rest.

The default is ``"triton"`` when CUDA is available and triton is installed, else ``"cpu"``.
Read the current choice as ``steer.kernels.IMPL`` (``from steer.kernels import IMPL`` copies
the name at that moment and does not follow :func:`use`).

**The entry point for hooks is** :func:`plan_for`: it makes the implementation choice once, when steering
is attached (call :func:`use` before attaching), and returns a plan with ``update(coef)`` (after every change
of the coefficients) and ``steer_(h, mask, decode, eager)`` (per call). :func:`steer_` is the functional
form, dispatching per call (for tests and benchmarks). :mod:`.angular` holds a second op (a rotation) with
the same reference / fused / plan structure.
This module is cheap to import and has no side effects: it imports only torch, and triton
only on the first CUDA call.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from .cpu import Plan, cpu_steer_
from .reference import reference_steer_

__all__ = ["IMPL", "IMPLS", "CallPlan", "Plan", "plan_for", "reference_steer_", "steer_", "use", "using"]

IMPLS = ("reference", "cpu", "triton")
IMPL: str = "cpu"
_host = cpu_steer_  # implementation used for non-CUDA tensors
_cuda = cpu_steer_  # implementation used for CUDA tensors (triton resolved lazily)


def _triton_cuda(h, vecs, coef, n_ablate, mask=None, plan=None):
    """First CUDA call under ``"triton"``: import the kernel, then call it directly."""
    global _cuda
    from .triton_steer import triton_steer_

    _cuda = triton_steer_
    return triton_steer_(h, vecs, coef, n_ablate, mask, plan)


def use(name: str) -> str:
    """Select the implementation by name; return the previous name (for tests and benchmarks)."""
    global IMPL, _host, _cuda
    if name not in IMPLS:
        raise ValueError(
            f"unknown steering kernel: expected one of {IMPLS}, found {name!r}; "
            f"fix: pass one of those names (or set STEER_KERNEL to one)."
        )
    if name == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError(
            "steering kernel 'triton' requested but triton is not installed; fix: `pip install triton` or use 'cpu'."
        )
    previous, IMPL = IMPL, name
    _host = reference_steer_ if name == "reference" else cpu_steer_
    _cuda = {"reference": reference_steer_, "cpu": cpu_steer_, "triton": _triton_cuda}[name]
    return previous


@contextlib.contextmanager
def using(name: str):
    """``with using("cpu"): Steering(...)``: :func:`use` for a block, the previous choice restored after."""
    previous = use(name)
    try:
        yield
    finally:
        use(previous)


def steer_(
    h: torch.Tensor, vecs: torch.Tensor, coef: torch.Tensor, n_ablate: int, mask: torch.Tensor | None = None, plan=None
) -> torch.Tensor:
    """In place on ``h`` [B, T, d] (fp32/fp16/bf16, any strides); returns ``h``.

    ``vecs`` [J+K, d] fp32 on h's device: the first ``n_ablate`` (=J) rows are unit ablation
    directions r_j, the other K rows add vectors v_k. ``coef`` [B, J+K] (or [1, J+K],
    broadcast over rows) fp32: J ablation strengths beta (1.0 removes the projection) then K
    add strengths alpha. ``mask`` None (all tokens) or [B, T] bool/float: nonzero = steer the
    token, zero = leave it bit-exactly unchanged. Projections use the original h; fp32 maths,
    one cast at the end. ``plan``: optional :class:`Plan` of these vectors, updated with this ``coef``
    by callers that apply the same vectors many times (the CPU path uses it; the others ignore it).
    No checks here (hot path): callers validate shapes once.
    """
    if h.is_cuda:
        return _cuda(h, vecs, coef, n_ablate, mask, plan)
    return _host(h, vecs, coef, n_ablate, mask, plan)


class CallPlan:
    """The plan of an implementation that takes ``coef`` as it is (the reference; Triton on CUDA)."""

    __slots__ = ("fn", "vecs", "n_ablate", "coef")

    def __init__(self, fn, vecs: torch.Tensor, n_ablate: int):
        self.fn, self.vecs, self.n_ablate, self.coef = fn, vecs, n_ablate, None

    def update(self, coef: torch.Tensor) -> CallPlan:
        self.coef = coef
        return self

    def steer_(self, h: torch.Tensor, mask: torch.Tensor | None = None, decode: bool = False, eager=None):
        return self.fn(h, self.vecs, self.coef, self.n_ablate, mask)


def plan_for(vecs: torch.Tensor, n_ablate: int) -> Plan | CallPlan:
    """The one entry point for hooks: a plan of these vectors for the implementation active on their device,
    chosen here, once (the CPU path's :class:`Plan`, whose ATen calls run on any device; else a
    :class:`CallPlan` of the reference or of the Triton kernel). ``plan.update(coef)`` after every change of
    the coefficients, ``plan.steer_(h, mask, decode, eager)`` per call."""
    impl = _cuda if vecs.is_cuda else _host
    if impl is cpu_steer_:
        return Plan(vecs, n_ablate)
    if impl is _triton_cuda:  # resolve the Triton kernel now, not on the first call
        from .triton_steer import triton_steer_

        impl = triton_steer_
    return CallPlan(impl, vecs, n_ablate)


def _default() -> str:
    env = os.environ.get("STEER_KERNEL", "").strip().lower()
    if env:
        return env
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "cpu"


use(_default())
