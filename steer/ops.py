"""Steering ops, the extension point: how a vector's directions at one layer become kernel operands, how per-row
α become coefficients, which fused kernel applies them and which plain-PyTorch reference specifies them.

An op registered with :func:`register_op` is a ``mode`` everywhere (``SteeringConfig(mode=...)``,
``steer generate --mode``, vector files' ``op``); nothing else needs editing. Built in:

* ``add``        — ``h + α·v`` (activation addition; Turner et al. 2023; Rimsky et al. 2024, CAA)
* ``ablate``     — ``h − α·(h·r̂)r̂`` for each stored direction (directional ablation; Arditi et al. 2024)
* ``ablate_add`` — ``h − (h·r̂)r̂ + α·v`` (set the component along r̂ to α·v's)
* ``ace``        — ``h − ((h − μ)·r̂)r̂ + α·v``: affine concept editing (Marshall et al. 2024, "Refusal in LLMs:
  an affine perspective"): the component along r̂ is first set to the reference (harmless) mean μ's, then
  α·v is added, so α = 1 puts it at the harmful mean's and the result does not depend on where the origin
  is. μ is read from the vector file (``extra["mean.<layer>"]``, stored by ``steer vectors refusal``).
* ``angular``    — rotate h toward r̂ by α·90° in the plane of h and r̂, keeping its norm (angular steering;
  Vu & Nguyen 2025); negative α turns away. :mod:`steer.kernels.angular`.

The contract every op keeps (``tests/test_ops.py`` runs it against each registered op, so a new one is
checked too): a row whose coefficients are all zero is left bit-exactly unchanged (per-request α = 0 and a
closed conditional gate, which multiplies the row's coefficients by 0, rely on it), and the fused plan
agrees with the reference within fp32 rounding. For ``ablate_add`` and ``ace`` the ablation strength of a
row is ``α != 0``, so α = 0 means "this request is not steered", as for every op. ACE's own α = 0 (the affine
ablation alone, which removes the concept in Marshall et al.) is therefore the limit α → 0⁺: pass a tiny α such
as 1e-6 (the added α·v is then negligible).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from steer.kernels import plan_for, reference_steer_
from steer.kernels.angular import AngularPlan, reference_rotate_

from .errors import ConfigError


@dataclass(frozen=True)
class Op:
    """One steering op. ``prepare(directions [k, d] fp32, extras) -> (operands [M, d] fp32, n_ablate)``;
    ``coefficients(alphas [B] fp32, n_ablate, M) -> coef [B, M]`` (zero α → a zero row);
    ``plan(operands, n_ablate)`` → a kernel plan with ``update(coef)`` and ``steer_(h, mask, decode, eager)``
    (default: the fused ablate/add kernel, :func:`steer.kernels.plan_for`);
    ``reference(h, operands, coef, n_ablate, mask) -> h``: the plain-PyTorch spec, in place;
    ``needs``: per-layer tensors read from the vector file as ``extra["<name>.<layer>"]``, passed to
    ``prepare`` as ``extras[name]``; ``nonzero``: the op needs non-zero directions (it normalises them)."""

    name: str
    prepare: Callable[[torch.Tensor, dict], tuple[torch.Tensor, int]]
    coefficients: Callable[[torch.Tensor, int, int], torch.Tensor]
    plan: Callable = plan_for
    reference: Callable = reference_steer_
    needs: tuple[str, ...] = ()
    nonzero: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConfigError(
                "an op needs a name usable as a mode",
                expected="an identifier such as 'my_op'",
                found=repr(self.name),
                fix="name the op with letters, digits and underscores",
            )


OPS: dict[str, Op] = {}
RESERVED = ("conditional", "merged", "merge", "per_request", "clamp")  # modes that are not ops (steer.kinds)


def register_op(op: Op, *, replace: bool = False) -> Op:
    """Make ``op`` available as a mode; ``replace=True`` to redefine one registered before."""
    if not isinstance(op, Op):
        raise ConfigError(
            "register_op takes an Op", expected="steer.ops.Op(...)", found=type(op).__name__, fix="wrap it"
        )
    if op.name in RESERVED or (op.name in OPS and not replace):
        raise ConfigError(
            f"op {op.name!r} exists",
            expected="a new name",
            found=op.name,
            fix="pick another name" + ("" if op.name in RESERVED else ", or pass replace=True"),
        )
    OPS[op.name] = op
    return op


def get_op(name: str) -> Op:
    if name not in OPS:
        raise ConfigError(
            "unknown op", expected=" | ".join(OPS), found=repr(name), fix="choose a registered op (steer.ops.OPS)"
        )
    return OPS[name]


# ----------------------------------------------------------------------------------- built-in ops
def orthonormal(d: torch.Tensor) -> torch.Tensor:
    """Unit rows spanning ``d`` [k, d] (QR for k > 1)."""
    return torch.linalg.qr(d.T).Q.T if d.shape[0] > 1 else d / d.norm(dim=-1, keepdim=True)


def _gate(a: torch.Tensor, n: int) -> torch.Tensor:
    return (a != 0).float()[:, None].expand(-1, n)


def _alpha(a: torch.Tensor, n: int) -> torch.Tensor:
    return a.float()[:, None].expand(-1, n)


def _ace_prepare(d: torch.Tensor, extras: dict) -> tuple[torch.Tensor, int]:
    q = orthonormal(d)
    mu = extras["mean"].reshape(-1).float()
    return torch.cat([q, ((q @ mu) @ q)[None], d]), q.shape[0]  # [r̂ | (μ·r̂)r̂ | v]


def _angular_prepare(d: torch.Tensor, extras: dict) -> tuple[torch.Tensor, int]:
    if d.shape[0] != 1:
        raise ConfigError(
            "angular steering rotates toward one direction",
            expected="one direction per layer",
            found=f"{d.shape[0]} directions",
            fix="use a vector with one direction per layer, or another op",
        )
    return d / d.norm(), 0


for _op in (
    Op("add", prepare=lambda d, e: (d, 0), coefficients=lambda a, j, m: _alpha(a, m), nonzero=False),
    Op("ablate", prepare=lambda d, e: (orthonormal(d), d.shape[0]), coefficients=lambda a, j, m: _alpha(a, m)),
    Op(
        "ablate_add",
        prepare=lambda d, e: (torch.cat([orthonormal(d), d]), d.shape[0]),
        coefficients=lambda a, j, m: torch.cat([_gate(a, j), _alpha(a, m - j)], 1),
    ),
    Op(
        "ace",
        prepare=_ace_prepare,
        coefficients=lambda a, j, m: torch.cat([_gate(a, j + 1), _alpha(a, m - j - 1)], 1),
        needs=("mean",),
    ),
    Op(
        "angular",
        prepare=_angular_prepare,
        coefficients=lambda a, j, m: _alpha(a, 1) * (math.pi / 2),
        plan=lambda operands, n_ablate: AngularPlan(operands[0]),
        reference=lambda h, operands, coef, n_ablate, mask=None: reference_rotate_(h, operands[0], coef[:, 0], mask),
    ),
):
    register_op(_op)
