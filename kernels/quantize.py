"""Triton kernels of the uplink activation quantizer (contract: docs/quantize.md).

Two quantize kernels, both with fixed block sizes (no autotune):

- ``_quant_tile_kernel`` for groups of at most ``TILE_MAX`` elements: each program holds ``R``
  whole groups as an ``[R, GS_PAD]`` tile (GS_PAD = group length rounded up to a power of two),
  so the absmax and the codes come from registers in one read of the input;
- ``_quant_loop_kernel`` for longer groups (per-row int8 of wide rows): one program per group,
  two passes over it in ``LOOP_BLOCK`` chunks (the second one hits L2).

The arithmetic follows the contract exactly: absmax as an integer max of bit patterns, IEEE
divisions (``tl.math.div_rn``; Triton's ``/`` on float32 is approximate), one float product
``|x| * inv`` followed only by an exact ``* 2**24`` and integer rounding, so neither FMA
contraction nor flush-to-zero can change a code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_MAX = 8192  # longest group held as one tile (32 KiB of fp32 per program)
TILE_ELEMS = 2048  # elements per program for short groups: R = TILE_ELEMS // GS_PAD groups
LOOP_BLOCK = 2048
DEQ_BLOCK = 1024
_TINY_BITS = tl.constexpr(0x10000000)  # float32 bits of 2**-95


@triton.jit
def _mix24(h):
    # fmix32 without its last xorshift, top 24 bits (the contract's counter hash); uint32 in/out.
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h >> 8


@triton.jit
def _scale_inv(mb, QMAXF: tl.constexpr):
    # mb: uint32 absmax bit patterns. Zero groups (below 2**-95) get scale = inv = 0; NaN/Inf
    # patterns are larger than any finite one, stay live and give a non-finite scale.
    live = mb >= _TINY_BITS
    a = tl.where(live, mb, 0x3F800000).to(tl.float32, bitcast=True)
    q = tl.full(a.shape, QMAXF, tl.float32)
    scale = tl.where(live, tl.math.div_rn(a, q), 0.0)
    inv = tl.where(live, tl.math.div_rn(q, a), 0.0)
    return scale, inv


@triton.jit
def _codes(x, inv, idx, key, QMAX: tl.constexpr, STOCH: tl.constexpr):
    # x fp32, inv broadcastable fp32, idx int64 flat element indices, key uint32.
    m = tl.abs(x) * inv
    y = (m * 16777216.0).to(tl.int32)  # truncation == floor (m >= 0); exact for m >= 0.5
    q = y >> 24
    rem = y & 0xFFFFFF
    if STOCH:
        k = _mix24(idx.to(tl.uint32) ^ key).to(tl.int32)
        mag = q + ((rem + k) >> 24)
    else:
        up = (rem > 0x800000) | ((rem == 0x800000) & ((q & 1) == 1))
        mag = q + up.to(tl.int32)
    mag = tl.minimum(mag, QMAX)
    return tl.where(x < 0.0, -mag, mag)


@triton.jit(do_not_specialize=["key"])
def _quant_tile_kernel(x_ptr, codes_ptr, scales_ptr, M, G, gs, n_groups, key,
                       BITS: tl.constexpr, STOCH: tl.constexpr, QMAX: tl.constexpr,
                       QMAXF: tl.constexpr, GS_PAD: tl.constexpr, R: tl.constexpr):
    pid = tl.program_id(0)
    gi = pid.to(tl.int64) * R + tl.arange(0, R)
    gvalid = gi < n_groups
    row = gi // G
    c0 = (gi % G) * gs
    glen = tl.minimum(M - c0, gs)
    j = tl.arange(0, GS_PAD)
    mask = gvalid[:, None] & (j[None, :] < glen[:, None])
    offs = row[:, None] * M + c0[:, None] + j[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mb = tl.max(x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, axis=1)
    scale, inv = _scale_inv(mb, QMAXF)
    tl.store(scales_ptr + gi, scale, mask=gvalid)
    keyu = key.to(tl.uint32)
    code = _codes(x, inv[:, None], offs, keyu, QMAX, STOCH)
    if BITS == 8:
        tl.store(codes_ptr + offs, code.to(tl.int8), mask=mask)
    elif BITS == 4:
        lo, hi = tl.split(tl.reshape(code, (R, GS_PAD // 2, 2)))
        byte = (lo & 0xF) | ((hi & 0xF) << 4)
        jb = tl.arange(0, GS_PAD // 2)
        mb_cols = (M + 1) // 2
        boffs = row[:, None] * mb_cols + (c0 // 2)[:, None] + jb[None, :]
        bmask = gvalid[:, None] & (jb[None, :] < ((glen + 1) // 2)[:, None])
        tl.store(codes_ptr + boffs, byte.to(tl.uint8), mask=bmask)
    else:  # int2: element 4p + t in bits 2t, 2t + 1 of byte p
        even, odd = tl.split(tl.reshape(code, (R, GS_PAD // 4, 2, 2)))
        t0, t2 = tl.split(even)
        t1, t3 = tl.split(odd)
        byte = (t0 & 3) | ((t1 & 3) << 2) | ((t2 & 3) << 4) | ((t3 & 3) << 6)
        jb = tl.arange(0, GS_PAD // 4)
        boffs = row[:, None] * ((M + 3) // 4) + (c0 // 4)[:, None] + jb[None, :]
        bmask = gvalid[:, None] & (jb[None, :] < ((glen + 3) // 4)[:, None])
        tl.store(codes_ptr + boffs, byte.to(tl.uint8), mask=bmask)


@triton.jit(do_not_specialize=["key"])
def _quant_loop_kernel(x_ptr, codes_ptr, scales_ptr, M, G, gs, key,
                       BITS: tl.constexpr, STOCH: tl.constexpr, QMAX: tl.constexpr,
                       QMAXF: tl.constexpr, BLOCK: tl.constexpr):
    gi = tl.program_id(0).to(tl.int64)
    row = gi // G
    c0 = (gi % G) * gs
    glen = tl.minimum(M - c0, gs)
    base = row * M + c0
    j = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.uint32)
    for s in range(0, glen, BLOCK):
        x = tl.load(x_ptr + base + s + j, mask=(s + j) < glen, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF)
    mb = tl.max(acc, axis=0)
    scale, inv = _scale_inv(mb, QMAXF)
    tl.store(scales_ptr + gi, scale)
    keyu = key.to(tl.uint32)
    bbase = row * ((M + 1) // 2) + c0 // 2
    jb = tl.arange(0, BLOCK // 2)
    qbase = row * ((M + 3) // 4) + c0 // 4
    jq = tl.arange(0, BLOCK // 4)
    for s in range(0, glen, BLOCK):
        offs = base + s + j
        x = tl.load(x_ptr + offs, mask=(s + j) < glen, other=0.0).to(tl.float32)
        code = _codes(x, inv, offs, keyu, QMAX, STOCH)
        if BITS == 8:
            tl.store(codes_ptr + offs, code.to(tl.int8), mask=(s + j) < glen)
        elif BITS == 4:
            lo, hi = tl.split(tl.reshape(code, (BLOCK // 2, 2)))
            byte = (lo & 0xF) | ((hi & 0xF) << 4)
            tl.store(codes_ptr + bbase + s // 2 + jb, byte.to(tl.uint8),
                     mask=(s // 2 + jb) < (glen + 1) // 2)
        else:
            even, odd = tl.split(tl.reshape(code, (BLOCK // 4, 2, 2)))
            t0, t2 = tl.split(even)
            t1, t3 = tl.split(odd)
            byte = (t0 & 3) | ((t1 & 3) << 2) | ((t2 & 3) << 4) | ((t3 & 3) << 6)
            tl.store(codes_ptr + qbase + s // 4 + jq, byte.to(tl.uint8),
                     mask=(s // 4 + jq) < (glen + 3) // 4)


@triton.jit
def _dequant_kernel(codes_ptr, scales_ptr, out_ptr, M, G, gs, n_blk,
                    BITS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blk
    col = (pid % n_blk) * BLOCK + tl.arange(0, BLOCK)
    mask = col < M
    if BITS == 8:
        c = tl.load(codes_ptr + row * M + col, mask=mask, other=0).to(tl.int32)
    elif BITS == 4:
        b = tl.load(codes_ptr + row * ((M + 1) // 2) + col // 2, mask=mask, other=0).to(tl.int32)
        nib = tl.where((col & 1) == 1, b >> 4, b & 0xF)
        c = (nib ^ 8) - 8
    else:
        b = tl.load(codes_ptr + row * ((M + 3) // 4) + col // 4, mask=mask, other=0).to(tl.int32)
        pair = (b >> (2 * (col & 3))) & 3
        c = (pair ^ 2) - 2
    s = tl.load(scales_ptr + row * G + col // gs, mask=mask, other=0.0)
    v = c.to(tl.float32) * s
    tl.store(out_ptr + row * M + col, v.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x2: torch.Tensor, bits: int, gs: int, stochastic: bool, key: int,
                  codes: torch.Tensor, scales: torch.Tensor) -> None:
    """x2 [N, M] contiguous; writes codes and scales in place (shapes checked by the caller)."""
    n, m = x2.shape
    g = scales.shape[1]
    qmax = {8: 127, 4: 7, 2: 1}[bits]
    n_groups = n * g
    common = dict(BITS=bits, STOCH=bool(stochastic), QMAX=qmax, QMAXF=float(qmax))
    if gs <= TILE_MAX:
        gs_pad = max(triton.next_power_of_2(gs), 4 if bits == 2 else 2)
        r = max(1, TILE_ELEMS // gs_pad)
        grid = (triton.cdiv(n_groups, r),)
        # About 16 elements per thread: an 8192-element tile with 8 warps would hold 32 values
        # (plus 64-bit offsets) per thread.
        tile = gs_pad * r
        warps = 16 if tile >= 8192 else 8 if tile >= 4096 else 4
        _quant_tile_kernel[grid](x2, codes, scales, m, g, gs, n_groups, key, GS_PAD=gs_pad, R=r,
                                 num_warps=warps, **common)
    else:
        _quant_loop_kernel[(n_groups,)](x2, codes, scales, m, g, gs, key, BLOCK=LOOP_BLOCK,
                                        num_warps=8, **common)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, bits: int, gs: int,
                    out2: torch.Tensor) -> None:
    n, m = out2.shape
    n_blk = triton.cdiv(m, DEQ_BLOCK)
    _dequant_kernel[(n * n_blk,)](codes, scales, out2, m, scales.shape[1], gs, n_blk,
                                  BITS=bits, BLOCK=DEQ_BLOCK, num_warps=4)
