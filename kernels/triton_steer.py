"""Triton kernel for the steering op on CUDA tensors.

Implements, for every token whose mask is set (see :mod:`.reference`, the spec)::

    h <- h - sum_j beta_j (h . r_j) r_j + sum_k alpha_k v_k

— directional ablation (Arditi et al. 2024, "Refusal in Language Models Is Mediated by a
Single Direction") plus activation addition (Turner et al. 2023; Rimsky et al. 2024, CAA).

One program owns a tile of ``BLOCK_M`` tokens x the whole hidden dimension: h is read once
into fp32 registers, every projection is taken from that ORIGINAL tile (simultaneous
ablation), the J+K updates are accumulated in fp32, masked-out tokens get the original
values back, and the tile is cast and stored once — one read and one write of h in total.
Arbitrary strides of h, coef and mask are supported; the last dimension of ``vecs`` must
have stride 1 (it is made contiguous otherwise).

This module imports triton at import time; :mod:`steer.kernels` imports it lazily on the
first CUDA call. Under ``TRITON_INTERPRET=1`` (set before this module is imported, because
``@triton.jit`` reads it at decoration time) the same kernel runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_D = 1 << 16  # the whole row lives in one tile


@triton.jit
def _steer_kernel(
    h_ptr,
    vec_ptr,
    coef_ptr,
    mask_ptr,
    N,
    T,
    D,
    n_ablate,
    n_vec,
    s_hb,
    s_ht,
    s_hd,
    s_vj,
    s_cb,
    s_cj,
    s_mb,
    s_mt,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_ok = tok < N
    b = (tok // T).to(tl.int64)  # int64 offsets: h may exceed 2^31
    t = (tok % T).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ptrs = h_ptr + b[:, None] * s_hb + t[:, None] * s_ht + cols[None, :] * s_hd
    io_ok = tok_ok[:, None] & col_ok[None, :]
    x = tl.load(ptrs, mask=io_ok, other=0.0).to(tl.float32)  # original h, fp32
    acc = x
    for j in range(0, n_ablate):  # ablation: uses x, not acc
        r = tl.load(vec_ptr + j * s_vj + cols, mask=col_ok, other=0.0)
        beta = tl.load(coef_ptr + b * s_cb + j * s_cj, mask=tok_ok, other=0.0)
        proj = tl.sum(x * r[None, :], axis=1)
        acc = acc - (beta * proj)[:, None] * r[None, :]
    for k in range(n_ablate, n_vec):  # addition
        v = tl.load(vec_ptr + k * s_vj + cols, mask=col_ok, other=0.0)
        alpha = tl.load(coef_ptr + b * s_cb + k * s_cj, mask=tok_ok, other=0.0)
        acc = acc + alpha[:, None] * v[None, :]
    if HAS_MASK:
        m = tl.load(mask_ptr + b * s_mb + t * s_mt, mask=tok_ok, other=0)
        acc = tl.where((m != 0)[:, None], acc, x)
    tl.store(ptrs, acc.to(h_ptr.dtype.element_ty), mask=io_ok)


def _config(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): ~4K elements per tile, whole row per tile."""
    block_d = triton.next_power_of_2(max(d, 16))
    block_m = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_d <= 2048 else (8 if block_d <= 8192 else 16)
    return block_m, block_d, num_warps


def triton_steer_(
    h: torch.Tensor, vecs: torch.Tensor, coef: torch.Tensor, n_ablate: int, mask: torch.Tensor | None = None, plan=None
) -> torch.Tensor:
    """In-place steering of ``h`` [B, T, d] by the Triton kernel; returns ``h``.

    Same contract as :func:`steer.kernels.steer_`; ``d`` may be at most 65536.
    """
    B, T, d = h.shape
    n = B * T
    if n == 0:
        return h
    if d > MAX_D:
        raise ValueError(
            f"triton steering kernel: expected hidden size <= {MAX_D}, found {d}; fix: use steer.kernels.use('cpu')."
        )
    vecs = vecs if vecs.stride(-1) == 1 else vecs.contiguous()
    coef = coef.expand(B, vecs.shape[0])  # [1, J+K] -> stride 0 over rows
    if mask is None:
        mask_arg, s_mb, s_mt = h, 0, 0  # unused pointer
    else:
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        s_mb, s_mt = mask_arg.stride()
    block_m, block_d, num_warps = _config(d)
    grid = (triton.cdiv(n, block_m),)
    _steer_kernel[grid](
        h,
        vecs,
        coef,
        mask_arg,
        n,
        T,
        d,
        n_ablate,
        vecs.shape[0],
        h.stride(0),
        h.stride(1),
        h.stride(2),
        vecs.stride(0),
        coef.stride(0),
        coef.stride(1),
        s_mb,
        s_mt,
        HAS_MASK=mask is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return h
