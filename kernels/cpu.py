"""Fused CPU path for the steering op (same maths as :mod:`.reference`, fewer passes over h).

All J+K directions are applied with two BLAS calls on the flattened ``x = h.view(B*T, d)``:

1. ``P = x @ R^T``                         one GEMM for every ablation projection ([N, J]);
2. ``C = [P | -1] * coef``, masked -> 0     the per-token coefficients ([N, J+K], tiny);
3. ``x.addmm_(C, vecs, alpha=-1)``          one fused read-modify-write of h that applies
   ``x - beta*P*r + alpha*v`` for all directions at once.

fp32 contiguous h is updated in place with no [N, d] temporary; fp16/bf16 (or non-contiguous)
h is converted to one fp32 buffer, updated, and cast back once. Rows whose coefficients are
all zero, and masked-out tokens, get ``x + (-1)*0``, which is ``x`` exactly.

Add-only calls without a mask (the common case) take a shorter path: ``h += (coef @ vecs)[:, None]``.

At decode sizes the cost is per-op dispatch (~2 us each), so this path is a handful of ATen
calls; ``torch.compile`` of the same maths measured ~2x slower per call on CPU (guard and
wrapper overhead), so it is not used. Also correct (not fastest) on CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cpu_steer_(h: torch.Tensor, vecs: torch.Tensor, coef: torch.Tensor, n_ablate: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """In-place steering of ``h`` [B, T, d]; see :func:`steer.kernels.reference_steer_`."""
    B, T, d = h.shape
    if n_ablate == 0 and mask is None:
        # add-only fast path (the common case): one tiny GEMM for sum_k alpha_k v_k per row, one in-place add
        # that computes in fp32 (type promotion) and casts once for half dtypes
        return h.add_(torch.mm(coef, vecs).unsqueeze(1))
    inplace = h.dtype == torch.float32 and h.is_contiguous()
    x = h.view(B * T, d) if inplace else h.reshape(B * T, d).float()   # fp32, [N, d]
    n_vec = vecs.shape[0]
    P = F.linear(x, vecs[:n_ablate])                                    # [N, J] on original h
    C = torch.constant_pad_nd(P, (0, n_vec - n_ablate), -1.0)           # [N, J+K] = [P | -1]
    C3 = C.view(B, T, n_vec).mul_(coef.unsqueeze(1))                    # [beta*P | -alpha]
    if mask is not None:
        keep = mask.unsqueeze(-1) if mask.dtype == torch.bool else mask.unsqueeze(-1) != 0
        C = torch.where(keep, C3, 0.0).view(B * T, n_vec)                 # masked tokens: 0
    x.addmm_(C, vecs, alpha=-1.0)                                       # x - beta*P*r + alpha*v
    if not inplace:
        h.copy_(x.view(B, T, d))
    return h
