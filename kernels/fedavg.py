"""Triton flat-buffer FedAvg: one program per block of columns, a loop over the K rows.

Same numerics as the C++ and CUDA kernels: acc = w0*x0, then acc = acc + wk*xk in row order with
float32 products and sums rounded separately (the kernel is compiled with enable_fp_fusion=False,
so no FMA), one program per column block: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fedavg_kernel(buf_ptr, w_ptr, out_ptr, K, P, ld,
                   BROADCAST: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    # Advance a pointer by the row stride instead of computing k * ld: 64-bit addresses even
    # when K * ld exceeds 2^31.
    row = buf_ptr + cols
    acc = tl.load(w_ptr) * tl.load(row, mask=mask, other=0.0).to(tl.float32)
    for k in range(1, K):
        row += ld
        acc = acc + tl.load(w_ptr + k) * tl.load(row, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, acc, mask=mask)
    if BROADCAST:
        row = buf_ptr + cols
        val = acc.to(buf_ptr.dtype.element_ty)
        for k in range(0, K):
            tl.store(row, val, mask=mask)
            row += ld


def fedavg_triton(buf: torch.Tensor, w32: torch.Tensor, out: torch.Tensor, broadcast: bool) -> None:
    """buf [K, P] fp32/bf16 (unit column stride), w32 [K] fp32, out [P] fp32 on one device.

    Validation lives in fsl_fast.ops.fedavg; this only launches.
    """
    k, p = buf.shape
    if p == 0:
        return
    ld = p if k == 1 else buf.stride(0)
    # Wide rows: 2048 columns per program (8 warps, 8 fp32 per thread). Narrow rows (the
    # simple_conv client part, 107k columns): 512, so that ~200 programs cover the GPU.
    block = 2048 if p >= (1 << 20) else 512
    grid = (triton.cdiv(p, block),)
    _fedavg_kernel[grid](buf, w32, out, k, p, ld, BROADCAST=bool(broadcast), BLOCK=block,
                         num_warps=8 if block == 2048 else 4, enable_fp_fusion=False)
