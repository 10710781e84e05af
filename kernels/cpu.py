"""Fused CPU path for the steering op (same maths as :mod:`.reference`, fewer passes over h).

At decode sizes the op costs almost nothing in arithmetic; what it costs is ATen dispatch, which is dearer right
after a decoder layer than in a tight loop (the layer's weight traffic leaves code and data cold; figures in
docs/performance.md, from ``benchmarks/hook_overhead.py``). So this path is as few ATen calls as the maths allows,
and everything that depends only on the vectors and the per-row coefficients is computed when they change, in a
:class:`Plan`:

* add only: ``bias`` [B|1, 1, d] = ``sum_k alpha_k v_k`` per row, so a step is one ``h.add_(bias)``, which rounds
  exactly like the reference (``h + alpha*v`` for one vector);
* ablation (+ addition), one token per row (a decode step): a persistent coefficient buffer ``C = [. | alpha]``
  [B, J+K] whose alpha columns are written on update; a step is ``mm(x, -beta R^T, out=C[:, :J])`` (all J
  projections of the original h in one GEMM, written into the buffer; beta folded into the matrix when every
  row shares it, else one ``mul_`` by the per-row beta) and one fused ``x.addmm_(C, vecs)`` that applies
  ``x - beta*P*r + alpha*v`` for all directions at once: 2 ATen calls (3 with per-row beta) plus a view;
  or, when the optional native op is built (:mod:`.native`), one C++ call doing the same from ``R``, the
  per-row ``beta`` and ``bias``;
* ablation over several tokens per row (a prompt): ``P = mm(x, -beta R^T)``, ``x.addmm_(P, R)``, ``h.add_(bias)``.

Everything else (no plan, fp16/bf16 or non-contiguous h, a token mask, h that needs autograd) takes the general
path: ``C = [P | -1] * coef`` (masked tokens -> 0) and one ``x.addmm_(C, vecs, alpha=-1)``, via one fp32 copy for
half dtypes. Rows whose coefficients are all zero, and masked-out tokens, get ``x + 0``, which is ``x``.
``torch.compile`` of the same maths is slower per call on CPU (guard and wrapper overhead), so it is not used. Also
correct (not fastest) on CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_F32, _grad_enabled = torch.float32, torch.is_grad_enabled


class Plan:
    """Operands the CPU path derives from ``(vecs, n_ablate)`` once and from ``coef`` on every change.

    ``plan = Plan(vecs, n_ablate).update(coef)``; call :meth:`update` again after every change of ``coef``
    (it writes in place when the shape is unchanged, so hooks and compiled graphs keep the same tensors), then
    :meth:`steer_` applies the op: the one entry point a hook calls, which picks the cheapest path for the
    call (add-only bias, native or ATen decode step, ATen prompt step, general path). Not for concurrent use
    from several threads (the coefficient buffer is written per call).
    """

    __slots__ = (
        "n_ablate",
        "coef",
        "vecs",
        "neg_rt",
        "proj",
        "C",
        "C_proj",
        "beta",
        "per_row_beta",
        "bias",
        "rows",
        "d",
        "R",
        "native",
    )

    @torch.inference_mode(False)  # its buffers are written in place later, possibly outside inference mode
    def __init__(self, vecs: torch.Tensor, n_ablate: int):
        self.n_ablate = n_ablate
        self.coef: torch.Tensor | None = None  # the caller's [rows, J+K] coefficients (general path)
        self.vecs = vecs  # [J+K, d]
        self.R = vecs[:n_ablate]  # [J, d]
        self.neg_rt = (-vecs[:n_ablate]).t().contiguous()  # [d, J] = -R^T
        self.proj = self.neg_rt.clone()  # -beta R^T (beta shared by all rows) or -R^T
        self.C: torch.Tensor | None = None  # [rows, J+K]: [-beta*P (per call) | alpha]
        self.C_proj: torch.Tensor | None = None  # C[:, :J], the GEMM's output view
        self.beta: torch.Tensor | None = None  # [rows, J]
        self.per_row_beta = False
        self.bias: torch.Tensor | None = None  # [rows, 1, d] = sum_k alpha_k v_k; None if K = 0
        self.rows, self.d = 0, vecs.shape[1]  # apply_(one_token=True) takes [rows, 1, d]
        # the native decode step (kernels/native.py) when built and enabled, else None: read once, here
        self.native = (
            _native_decode() if n_ablate and vecs.device.type == "cpu" and vecs.dtype == torch.float32 else None
        )

    @torch.inference_mode(False)
    def update(self, coef: torch.Tensor) -> Plan:
        J = self.n_ablate
        coef = coef.float()
        self.coef = coef
        self.rows = coef.shape[0]
        if self.vecs.shape[0] > J:
            self.bias = _into(self.bias, torch.mm(coef[:, J:], self.vecs[J:]).unsqueeze(1))
        if J == 0:
            return self
        beta = coef[:, :J]
        first = beta.reshape(-1)[:1] if beta.numel() else torch.ones(1, device=beta.device)
        self.per_row_beta = not bool((beta == first).all())
        self.proj.copy_(self.neg_rt if self.per_row_beta else self.neg_rt * first)
        self.beta = _into(self.beta, beta.contiguous())
        C = _into(self.C, coef)
        if C is not self.C:
            self.C, self.C_proj = C, C[:, :J]
        return self

    def steer_(
        self, h: torch.Tensor, mask: torch.Tensor | None = None, decode: bool = False, eager: bool | None = None
    ) -> torch.Tensor:
        """The op on ``h`` [rows, T, d] in place with the coefficients of the last :meth:`update`; returns ``h``.

        ``decode``: the caller knows T == 1 (a decode step), which lets the hot path skip reading h's shape;
        ``eager``: not traced by ``torch.compile`` (None: ask torch). Any dtype, strides, mask or autograd.
        """
        if mask is None and not (h.requires_grad and _grad_enabled()):
            if self.n_ablate == 0:  # + sum_k alpha_k v_k, any T and dtype: one add_
                return h if self.bias is None else h.add_(self.bias)
            if h.dtype is _F32:
                if eager is None:
                    eager = not torch.compiler.is_compiling()
                native = self.native  # a decode step in one native call (False: not plain [B, 1, d]; ATen runs)
                if decode and eager and native is not None and native(h, self.R, self.beta, self.bias):
                    return h
                if self.apply_(h, decode, eager):
                    return h
        return cpu_steer_(h, self.vecs, self.coef, self.n_ablate, mask)

    def apply_(self, h: torch.Tensor, one_token: bool, eager: bool | None = None) -> bool:
        """The ATen form of ablation (+ addition), in place on fp32 ``h`` [rows, T, d], no token mask;
        ``one_token``: T == 1. (:meth:`steer_` is the entry point; it tries the native op first.)

        The caller says whether this is a one-token (decode) step, and may say whether it runs eagerly (not
        traced by ``torch.compile``; None: ask torch). Returns False, changing nothing, when ``h`` has another
        number of rows or strides that cannot be flattened; the general path then runs.
        """
        if one_token:
            if eager is None:
                eager = not torch.compiler.is_compiling()
            try:
                x = h.view(self.rows, self.d)  # raises unless h is [rows, 1, d] and flattens
            except RuntimeError:
                return False
            if eager:
                C, P = self.C, self.C_proj
                torch.mm(x, self.proj, out=P)  # -beta*P (or -P): projections of the original h
            else:  # traced: dynamo refuses out= into a strided view; the same maths without it
                P = torch.mm(x, self.proj)
                C = torch.cat([P, self.C[:, self.n_ablate :]], 1)
                P = C[:, : self.n_ablate]
            if self.per_row_beta:
                P.mul_(self.beta)
            x.addmm_(C, self.vecs)  # x - beta*P*r + alpha*v, all directions at once
            return True
        if h.dim() != 3 or h.shape[0] != self.rows or not h.is_contiguous():
            return False
        B, T, d = h.shape
        x = h.view(B * T, d)
        P = torch.mm(x, self.proj)  # [N, J]: -beta*P (or -P), original h
        if self.per_row_beta:
            P.view(B, T, self.n_ablate).mul_(self.beta.unsqueeze(1))
        x.addmm_(P, self.R)  # x - beta*P*r
        if self.bias is not None:
            h.add_(self.bias)  # + sum_k alpha_k v_k
        return True


def _native_decode():
    """The native decode step if built and enabled, else None; attaching never fails because of it."""
    from . import native  # here, not at import: `python -m steer.kernels.native` must find it unimported

    try:
        return native.decode_fn()
    except Exception:  # e.g. its load warning raised as an error (-W error): the ATen path instead
        return None


def _into(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """``new``'s values in ``old``'s storage when shapes match (same tensor for hooks/graphs), else a copy."""
    if old is not None and old.shape == new.shape and old.device == new.device:
        return old.copy_(new)
    return new.clone(memory_format=torch.contiguous_format)


def cpu_steer_(
    h: torch.Tensor,
    vecs: torch.Tensor,
    coef: torch.Tensor,
    n_ablate: int,
    mask: torch.Tensor | None = None,
    plan: Plan | None = None,
) -> torch.Tensor:
    """In-place steering of ``h`` [B, T, d]; see :func:`steer.kernels.reference_steer_`.

    ``plan``: a :class:`Plan` of these ``vecs``/``n_ablate``, updated with this ``coef`` (optional).
    """
    B, T, d = h.shape
    if plan is not None:  # the plan's entry point (updated with this coef by the caller)
        return plan.steer_(h, mask, T == 1)
    if n_ablate == 0 and mask is None:
        # add only: one tiny GEMM for sum_k alpha_k v_k per row, one in-place add that computes in fp32 (type
        # promotion) and casts once for half dtypes
        return h.add_(torch.mm(coef, vecs).unsqueeze(1))
    inplace = h.dtype == torch.float32 and h.is_contiguous()
    x = h.view(B * T, d) if inplace else h.reshape(B * T, d).float()  # fp32, [N, d]
    n_vec = vecs.shape[0]
    P = F.linear(x, vecs[:n_ablate])  # [N, J] on the original h
    C = torch.constant_pad_nd(P, (0, n_vec - n_ablate), -1.0)  # [N, J+K] = [P | -1]
    C.view(B, T, n_vec).mul_(coef.unsqueeze(1))  # [beta*P | -alpha]
    if mask is not None:
        keep = mask.reshape(B * T, 1)
        C = torch.where(keep if keep.dtype == torch.bool else keep != 0, C, 0.0)  # masked tokens: 0
    x.addmm_(C, vecs, alpha=-1.0)  # x - beta*P*r + alpha*v
    if not inplace:
        h.copy_(x.view(B, T, d))
    return h
