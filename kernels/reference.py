"""Plain-PyTorch reference for the steering op — this file is the spec.

For every token t of row b whose mask is set::

    h[b,t] <- h[b,t] - sum_j beta[b,j] * (h[b,t] . r_j) * r_j + sum_k alpha[b,k] * v_k

i.e. directional ablation of unit directions r_j (Arditi et al. 2024, "Refusal in Language
Models Is Mediated by a Single Direction"; beta=1 removes the projection) plus activation
addition of vectors v_k (Turner et al. 2023, "Activation Addition"; Rimsky et al. 2024, CAA).
All projections use the ORIGINAL h (simultaneous ablation), arithmetic is fp32 and the result
is cast to h's dtype once at the end. Masked-out tokens are left bit-exactly unchanged; rows
whose coefficients are all zero compare equal to the input (``x - 0*p*r`` may turn a -0.0
entry into +0.0, which ``torch.equal`` and ``==`` treat as the same value).

Written for readability, not speed: one pass over h per direction.
"""

from __future__ import annotations

import torch


def reference_steer_(
    h: torch.Tensor, vecs: torch.Tensor, coef: torch.Tensor, n_ablate: int, mask: torch.Tensor | None = None, plan=None
) -> torch.Tensor:
    """Apply the steering op to ``h`` ([B, T, d]) in place and return it.

    ``vecs`` [J+K, d] fp32: the first ``n_ablate`` (=J) rows are unit ablation directions, the
    rest are add vectors. ``coef`` [B or 1, J+K] fp32: beta columns then alpha columns.
    ``mask`` None or [B, T] (bool or float; nonzero = steer this token). ``plan`` is ignored (it only
    speeds up the CPU path).
    """
    n_add = vecs.shape[0] - n_ablate
    x = h.float()  # the original h, in fp32 (h itself when h is already fp32)
    out = x
    for j in range(n_ablate):
        r = vecs[j]
        beta = coef[:, j, None, None]  # [B|1, 1, 1]
        proj = (x @ r)[..., None]  # [B, T, 1], projection of the ORIGINAL h
        out = out - beta * proj * r
    for k in range(n_add):
        v = vecs[n_ablate + k]
        alpha = coef[:, n_ablate + k, None, None]
        out = out + alpha * v
    if mask is not None:
        out = torch.where(mask[..., None] != 0, out, x)
    h.copy_(out)  # copy_ casts to h's dtype once
    return h
