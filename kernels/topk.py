"""Triton kernel of the per-row top-k selection (contract: fsl_fast/ops/topk.py).

One program per row, in three phases over the row's float32 bit patterns with the sign cleared
(for finite values their integer order is the order of the magnitudes):

1. the largest pattern, to report a row holding a NaN or an infinity (flag per row, no output);
2. the k-th largest pattern ``thr``, found bit by bit from bit 30 down: a bit stays set if at
   least k patterns are >= the threshold with it set (31 counting passes over the row, which
   stays in L1/L2 for the rows of smashed data);
3. one ordered pass that writes every position above ``thr`` and the first ``k - #above``
   positions equal to it, each at its rank among the kept ones (running counts plus an in-block
   prefix sum), so positions come out ascending and ties go to the lower position.

The selection is the PyTorch reference's bit for bit (tests/triton/test_topk_triton.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
_INF_BITS = tl.constexpr(0x7F800000)


@triton.jit
def _topk_row_kernel(x_ptr, index_ptr, values_ptr, bad_ptr, M, k, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * M
    j = tl.arange(0, BLOCK)
    top = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(0, M, BLOCK):
        x = tl.load(base + s + j, mask=(s + j) < M, other=0.0)
        top = tl.maximum(top, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    if tl.max(top, axis=0) >= _INF_BITS:
        tl.store(bad_ptr + row, 1)
    else:
        thr = 0
        for b in range(30, -1, -1):
            cand = thr | (1 << b)
            cnt = 0
            for s in range(0, M, BLOCK):
                x = tl.load(base + s + j, mask=(s + j) < M, other=0.0)
                m = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
                cnt += tl.sum((m >= cand).to(tl.int32), axis=0)
            if cnt >= k:
                thr = cand
        above = 0
        for s in range(0, M, BLOCK):
            x = tl.load(base + s + j, mask=(s + j) < M, other=0.0)
            m = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            above += tl.sum(((m > thr) & ((s + j) < M)).to(tl.int32), axis=0)
        ties_left = k - above
        kept = 0
        for s in range(0, M, BLOCK):
            valid = (s + j) < M
            x = tl.load(base + s + j, mask=valid, other=0.0)
            m = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            tie = ((m == thr) & valid).to(tl.int32)
            tie_rank = tl.cumsum(tie, axis=0) - tie  # ties before this one in the block
            keep = ((m > thr) & valid) | ((tie == 1) & (tie_rank < ties_left))
            keep_i = keep.to(tl.int32)
            pos = kept + tl.cumsum(keep_i, axis=0) - keep_i
            out = row * k + pos.to(tl.int64)
            tl.store(index_ptr + out, (s + j).to(tl.int64), mask=keep)
            tl.store(values_ptr + out, x, mask=keep)
            kept += tl.sum(keep_i, axis=0)
            ties_left -= tl.sum(tie, axis=0)


def topk_rows(x2: torch.Tensor, k: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x2 float32 [N, M] contiguous; writes index [N, k] int64 and values [N, k] float32 and
    returns the int32 [N] flags of rows with a non-finite value (their outputs are unwritten)."""
    n, m = x2.shape
    bad = torch.zeros(n, dtype=torch.int32, device=x2.device)
    if n:
        _topk_row_kernel[(n,)](x2, index, values, bad, m, k, BLOCK=BLOCK, num_warps=4)
    return bad
