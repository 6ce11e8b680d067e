"""Triton kernels of the fused linear auxiliary head (fp32): estimate and alignment.

Contract as csrc/aux.cpp: x [K, B, D], W [K, C, D], b [K, C], y [K, B] int64, target [K, B, D];
G = scale (softmax(x W^T + b) - onehot(y)), u = G W, g = u / spread; alignment loss
spread * sum((u / spread - target)^2), R = 2 (u / spread - target), dz = scale p (R W^T - <., p>),
dW = G^T R + dz^T x, db = colsum(dz).

One program per (block of BLOCK_B rows, client). Logits stay in registers ([BLOCK_B, BLOCK_C]);
D is walked in BLOCK_D chunks. The alignment recomputes u (one small dot per chunk) in its last
sweep instead of writing R to memory. Each program writes its own dW/db/loss partial; the host sums
partials over the row-block axis (a fixed-order torch reduction: no atomics, reproducible).
Fixed block sizes (no autotune) so that the kernels also run under TRITON_INTERPRET=1. Dots use
input_precision="ieee": fp32 products, not TF32, so results match the fp32 reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_B = 16
BLOCK_D = 64


@triton.jit
def _logits_G(x_ptr, w_ptr, b_ptr, y_ptr, k, rows, rmask, cls, cmask, B, C, D, scale,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    z = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        xt = tl.load(x_ptr + (k * B + rows[:, None]) * D + dd[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        wt = tl.load(w_ptr + (k * C + cls[None, :]) * D + dd[:, None],
                     mask=cmask[None, :] & dmask[:, None], other=0.0)
        z += tl.dot(xt, wt, input_precision="ieee")
    bias = tl.load(b_ptr + k * C + cls, mask=cmask, other=0.0)
    z = z + bias[None, :]
    z = tl.where(cmask[None, :], z, float("-inf"))
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    e = tl.where(cmask[None, :], e, 0.0)
    p = e / tl.sum(e, axis=1)[:, None]
    y = tl.load(y_ptr + k * B + rows, mask=rmask, other=-1)
    onehot = (cls[None, :] == y[:, None]).to(tl.float32)
    G = (p - onehot) * scale
    G = tl.where(rmask[:, None] & cmask[None, :], G, 0.0)
    return p, G


@triton.jit
def _estimate_kernel(x_ptr, w_ptr, b_ptr, y_ptr, g_ptr, B, C, D, inv_spread, scale,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    k = tl.program_id(1)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    p, G = _logits_G(x_ptr, w_ptr, b_ptr, y_ptr, k, rows, rmask, cls, cmask, B, C, D, scale,
                     BLOCK_B, BLOCK_C, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        wt = tl.load(w_ptr + (k * C + cls[:, None]) * D + dd[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        u = tl.dot(G, wt, input_precision="ieee")
        tl.store(g_ptr + (k * B + rows[:, None]) * D + dd[None, :], u * inv_spread,
                 mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _align_kernel(x_ptr, w_ptr, b_ptr, y_ptr, t_ptr, dw_part_ptr, db_part_ptr, loss_part_ptr,
                  B, C, D, NB, spread, scale,
                  BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    k = tl.program_id(1)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    inv_spread = 1.0 / spread
    p, G = _logits_G(x_ptr, w_ptr, b_ptr, y_ptr, k, rows, rmask, cls, cmask, B, C, D, scale,
                     BLOCK_B, BLOCK_C, BLOCK_D)
    # Sweep 1: R = 2 (u / spread - t), the loss and dP = R W^T.
    dP = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    lacc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        m2 = rmask[:, None] & dmask[None, :]
        wt = tl.load(w_ptr + (k * C + cls[:, None]) * D + dd[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        u = tl.dot(G, wt, input_precision="ieee")
        t = tl.load(t_ptr + (k * B + rows[:, None]) * D + dd[None, :], mask=m2, other=0.0)
        diff = tl.where(m2, u * inv_spread - t, 0.0)
        lacc += diff * diff
        dP += tl.dot(2.0 * diff, tl.trans(wt), input_precision="ieee")
    dz = scale * p * (dP - tl.sum(dP * p, axis=1)[:, None])
    dz = tl.where(rmask[:, None] & cmask[None, :], dz, 0.0)
    part = k * NB + pid
    tl.store(loss_part_ptr + part, tl.sum(tl.sum(lacc, axis=1), axis=0) * spread)
    tl.store(db_part_ptr + part * C + cls, tl.sum(dz, axis=0), mask=cmask)
    # Sweep 2: this block's dW partial = G^T R + dz^T x (u recomputed, R never stored).
    Gt = tl.trans(G)
    dzt = tl.trans(dz)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        m2 = rmask[:, None] & dmask[None, :]
        wt = tl.load(w_ptr + (k * C + cls[:, None]) * D + dd[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        u = tl.dot(G, wt, input_precision="ieee")
        t = tl.load(t_ptr + (k * B + rows[:, None]) * D + dd[None, :], mask=m2, other=0.0)
        R = tl.where(m2, 2.0 * (u * inv_spread - t), 0.0)
        xt = tl.load(x_ptr + (k * B + rows[:, None]) * D + dd[None, :], mask=m2, other=0.0)
        dw = tl.dot(Gt, R, input_precision="ieee") + tl.dot(dzt, xt, input_precision="ieee")
        tl.store(dw_part_ptr + (part * C + cls[:, None]) * D + dd[None, :], dw,
                 mask=cmask[:, None] & dmask[None, :])


def _block_c(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def _check(x, w, b, y, t=None):
    for name, v in (("x", x), ("weight", w), ("bias", b)) + ((("target", t),) if t is not None else ()):
        if v.dtype != torch.float32:
            raise TypeError(f"aux (triton): {name} must be float32, got {v.dtype}")
        if not v.is_contiguous():
            raise ValueError(f"aux (triton): {name} must be contiguous")
    if y.dtype != torch.int64:
        raise TypeError(f"aux (triton): labels must be int64, got {y.dtype}")
    K, B, D = x.shape
    C = w.shape[1]
    if C > 256:
        raise ValueError(f"aux (triton): at most 256 classes (logits live in registers), got C={C}")
    return K, B, C, D


def estimate(x, w, b, y, inv_spread: float, scale: float) -> torch.Tensor:
    """g [K, B, D] = (G W) * inv_spread."""
    K, B, C, D = _check(x, w, b, y)
    g = torch.empty_like(x)
    grid = (triton.cdiv(B, BLOCK_B), K)
    _estimate_kernel[grid](x, w, b, y, g, B, C, D, float(inv_spread), float(scale),
                           BLOCK_B=BLOCK_B, BLOCK_C=_block_c(C), BLOCK_D=BLOCK_D)
    return g


def align(x, w, b, y, t, spread: float, scale: float):
    """(loss [K], dW [K, C, D], db [K, C]) of the alignment, partials summed in block order."""
    K, B, C, D = _check(x, w, b, y, t)
    NB = triton.cdiv(B, BLOCK_B)
    dw_part = torch.empty((K, NB, C, D), dtype=x.dtype, device=x.device)
    db_part = torch.empty((K, NB, C), dtype=x.dtype, device=x.device)
    loss_part = torch.empty((K, NB), dtype=x.dtype, device=x.device)
    _align_kernel[(NB, K)](x, w, b, y, t, dw_part, db_part, loss_part, B, C, D, NB,
                           float(spread), float(scale),
                           BLOCK_B=BLOCK_B, BLOCK_C=_block_c(C), BLOCK_D=BLOCK_D)
    return loss_part.sum(1), dw_part.sum(1), db_part.sum(1)
