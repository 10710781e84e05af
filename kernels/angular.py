"""Angular steering: a norm-preserving rotation of each activation toward (or away from) a unit direction.

For every token ``h`` of row ``b`` whose mask is set, in the plane spanned by ``h`` and the unit direction
``r`` (Vu & Nguyen 2025, "Angular Steering: Behavior Control via Rotation in Activation Space", which
rotates within a fixed plane containing the refusal direction; here the plane is the token's own, so no
second basis vector is needed)::

    a = h . r,   u = h - a r,   phi = atan2(|u|, a)            (the angle between h and r, in [0, pi])
    phi' = clamp(phi - theta_b, 0, pi)                          (theta > 0 turns toward r, < 0 away from it)
    h <- |h| (cos(phi') r + sin(phi') u / |u|)                  (|h| is unchanged)

A row with ``theta_b == 0``, a masked-out token and a token parallel to ``r`` are left unchanged; "parallel" is
``|u| <= 1e-5 |h|`` (within 1e-5 rad of ±r), where fp32 cannot resolve the plane: u there is rounding noise, so a
rotation would pick an arbitrary direction and lose |h| by up to 1e-3. :func:`reference_rotate_` is the spec
(literal, fp32, cast once); :func:`rotate_` is the fused path (one GEMV for the projections, ``u = h - a r`` once,
two norms, then ``|h|(cos φ' r + sin φ' û)`` as ``u·c_u + c_r r`` with per-token scalars, written back in place for
contiguous fp32, through one fp32 copy otherwise); :class:`AngularPlan` is the entry point a hook calls.
"""

from __future__ import annotations

import math

import torch

PARALLEL = 1e-5  # |u| / |h| at or below which a token counts as parallel to r (no plane to rotate in)


def reference_rotate_(
    h: torch.Tensor, r: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate ``h`` [B, T, d] in place by ``theta`` [B] or [1] radians toward the unit ``r`` [d]; returns ``h``."""
    return h.copy_(rotated(h, r, theta, mask))


def rotated(h: torch.Tensor, r: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The rotation out of place, in fp32 or wider (differentiable): what :func:`reference_rotate_` writes."""
    x = h.to(torch.promote_types(h.dtype, torch.float32))
    r = r.to(x.dtype)
    th = theta.to(x.dtype).reshape(-1, 1)  # [B|1, 1]
    a = x @ r  # [B, T]
    u = x - a[..., None] * r
    n = u.norm(dim=-1)
    norm = x.norm(dim=-1)
    phi = torch.atan2(n, a)
    phi2 = (phi - th).clamp(0.0, math.pi)
    unit_u = u / n.clamp_min(torch.finfo(x.dtype).tiny)[..., None]
    out = norm[..., None] * (torch.cos(phi2)[..., None] * r + torch.sin(phi2)[..., None] * unit_u)
    keep = (th == 0) | (n <= PARALLEL * norm)
    if mask is not None:
        keep = keep | (mask == 0)
    return torch.where(keep[..., None], x, out)


def rotate_(h: torch.Tensor, r: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The fused path of :func:`reference_rotate_` (same contract): ``h <- s*h + t*r`` per token."""
    B, T, d = h.shape
    inplace = h.dtype == torch.float32 and h.is_contiguous()
    x = h.view(B * T, d) if inplace else h.reshape(B * T, d).float()
    a = torch.mv(x, r)  # [N]
    u = torch.addr(x, a, r, alpha=-1.0)  # h - a r: the in-plane part orthogonal to r, computed once
    n = torch.linalg.vector_norm(u, dim=-1)
    norm = torch.linalg.vector_norm(x, dim=-1)
    th = theta.float().reshape(-1, 1).expand(B, T).reshape(-1)
    phi2 = (torch.atan2(n, a) - th).clamp(0.0, math.pi)
    cu = norm * torch.sin(phi2) / n.clamp_min(torch.finfo(torch.float32).tiny)
    cr = norm * torch.cos(phi2)
    keep = (th == 0) | (n <= PARALLEL * norm)
    if mask is not None:
        keep = keep | (mask.reshape(-1) == 0)
    u.mul_(cu[:, None]).addr_(cr, r)  # |h| (cos φ' r + sin φ' û), no cancellation near ±r
    x.copy_(torch.where(keep[:, None], x, u))  # kept tokens: x itself, bit for bit
    if not inplace:
        h.copy_(x.view(B, T, d))
    return h


class AngularPlan:
    """Entry point for a hook: ``AngularPlan(r).update(theta)``, then ``plan.steer_(h, mask)`` per call.

    ``coef`` given to :meth:`update` is ``[rows, 1]`` angles in radians (zero rows are unsteered)."""

    __slots__ = ("r", "theta")

    def __init__(self, r: torch.Tensor):
        self.r = r.reshape(-1).float().contiguous()
        self.theta: torch.Tensor | None = None

    def update(self, coef: torch.Tensor) -> AngularPlan:
        self.theta = coef.float().reshape(-1)
        return self

    def steer_(
        self, h: torch.Tensor, mask: torch.Tensor | None = None, decode: bool = False, eager: bool | None = None
    ) -> torch.Tensor:
        if h.requires_grad and torch.is_grad_enabled():  # autograd: a new tensor (the in-place path saves none)
            return rotated(h, self.r, self.theta, mask).to(h.dtype)
        return rotate_(h, self.r, self.theta, mask)
