"""Uplink activation quantization: per-row / per-group absmax int8 and packed int4.

Contract (the full text, with the reasons, is docs/quantize.md; every backend follows it bit for
bit, and tests check codes and scales for equality with :func:`quantize_reference`):

* ``x`` of any shape ``(N, ...)``, dtype float32 / float16 / bfloat16, is viewed as rows
  ``x.reshape(N, M)``. Each row is cut into groups of ``group_size`` consecutive elements (the
  last one may be shorter); ``group_size=None`` means one group per row for int8 and 32 for int4.
* ``a`` = the largest ``|x|`` of a group, in float32 (taken as the maximum of the bit patterns with
  the sign bit cleared, so a NaN or an Inf always wins and is reported). ``qmax`` is 127 (int8),
  7 (int4) or 1 (int2); codes are symmetric in ``[-qmax, qmax]``.
* A group with ``a < 2**-95`` (all zeros included) gets ``scale = 0`` and codes 0; it dequantizes
  to exact zeros. Otherwise ``scale = fl(a / qmax)`` and ``inv = fl(qmax / a)``, both IEEE
  float32 divisions rounded to nearest (never an approximate reciprocal).
* ``m = fl(|x| * inv)`` (one float32 product), ``Y = floor(m * 2**24)`` as an integer (exact: the
  product by ``2**24`` is exact and ``m <= qmax * (1 + 2**-23)``).
  Nearest: ``mag = round-half-to-even(Y / 2**24)`` (integer arithmetic on ``Y``), which equals
  IEEE rint of ``m``. Stochastic: ``mag = floor((Y + k) / 2**24)`` where ``k`` is the 24-bit
  counter-based random number of the element, so ``P(round up) = frac(m)`` up to ``2**-24``.
  ``code = sign(x) * min(mag, qmax)``.
* Random numbers: ``key = fmix32(lo ^ fmix32(hi ^ 0x9E3779B9))`` from ``seed = hi * 2**32 + lo``;
  for the element with flat index ``i`` (row-major index into ``x``, ``i < 2**32``):
  ``h = i ^ key; h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35`` (mod 2**32),
  ``k = h >> 8``: MurmurHash3's 32-bit finalizer ``fmix32`` without its last xorshift, which
  only touches the low 16 bits (see docs/quantize.md for the cost measurements behind one round).
  Same codes on every backend for the same seed.
* int8: ``codes`` int8 ``[N, M]``. int4: ``codes`` uint8 ``[N, ceil(M / 2)]``, element ``2j`` in
  the low nibble and ``2j + 1`` in the high nibble of byte ``j``, two's complement nibbles; odd
  ``M`` leaves the last high nibble 0. ``group_size`` must be even for int4 so groups never share
  a byte. int2 (``qmax`` 1: codes -1, 0, 1): ``codes`` uint8 ``[N, ceil(M / 4)]``, element
  ``4j + t`` in bits ``2t, 2t + 1`` of byte ``j`` (two's complement), unused pairs 0;
  ``group_size`` divisible by 4, default 32. ``scales`` float32 ``[N, G]``,
  ``G = ceil(M / group_size)`` (1 for per-row int8).
* Dequantize: ``fl(code * scale)`` in float32, then rounded to nearest-even into the output dtype.
* Non-finite input raises ``ValueError`` naming the first bad row (the kernels report it through
  a non-finite scale; ``out=`` buffers then hold unspecified values).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fsl_fast.ops import _backend, triton_ops

__all__ = [
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "quantize_reference",
    "dequantize_reference",
    "rng24_reference",
    "seed_key",
    "QMAX",
    "QuantPlan",
    "quant_plan",
    "DEFAULT_INT4_GROUP",
    "TINY_ABSMAX",
]

QMAX = {8: 127, 4: 7, 2: 1}
DEFAULT_INT4_GROUP = 32
DEFAULT_INT2_GROUP = 32
# Groups whose absmax is below this are zero groups. 2**-95 keeps scale (>= 2**-102) and inv
# (<= 127 * 2**95) normal floats, so flush-to-zero (CUDA --use_fast_math, Triton's libdevice) and
# IEEE backends agree: a subnormal |x| then gives m * 2**24 < 1, i.e. code 0 either way.
TINY_ABSMAX = 2.0**-95
_TINY_BITS = 0x10000000  # float32 bit pattern of 2**-95
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers (the definition every backend copies)


def _fmix32_int(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def seed_key(seed: int) -> int:
    """The 32-bit key all backends derive from ``seed`` (0 <= seed < 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"quantize: seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"quantize: seed must be in [0, 2**64), got {seed}")
    return _fmix32_int((seed & _M32) ^ _fmix32_int((seed >> 32) ^ 0x9E3779B9))


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 for int64 h in [0, 2**32): split c in 16-bit halves so that no int64
    # product overflows (signed overflow would be undefined behaviour in the CPU kernels).
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def rng24_reference(index: torch.Tensor, key: int) -> torch.Tensor:
    """24-bit random integers ``k`` (int64) for flat element indices ``index`` under ``key``:
    ``fmix32`` without its final xorshift, top 24 bits."""
    h = (index.to(torch.int64) & _M32) ^ key
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h >> 8


# ---------------------------------------------------------------------------------------------
# The quantized container


@dataclass
class QuantizedTensor:
    """Codes and scales of a quantized activation, plus what is needed to undo it.

    codes: int8 ``[N, M]`` (bits=8), uint8 ``[N, ceil(M/2)]`` (bits=4, packed) or uint8
    ``[N, ceil(M/4)]`` (bits=2, packed);
    scales: float32 ``[N, G]``; shape/dtype: the original tensor's; group_size: None means per row
    (int8 only).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    group_size: int | None

    @property
    def nbytes(self) -> int:
        """Bytes sent on the wire: codes plus scales (shape/dtype metadata not counted)."""
        return (self.codes.numel() * self.codes.element_size()
                + self.scales.numel() * self.scales.element_size())

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def slice_rows(self, start: int) -> "QuantizedTensor":
        """Rows ``start:`` (samples) without decoding: codes and scales are per-row."""
        n = int(self.shape[0])
        if not 0 <= start <= n:
            raise ValueError(f"QuantizedTensor.slice_rows: start must be in [0, {n}], got {start}")
        return QuantizedTensor(self.codes[start:], self.scales[start:],
                               torch.Size((n - start, *self.shape[1:])), self.dtype, self.bits,
                               self.group_size)

    def state_dict(self) -> dict:
        """Plain tensors and numbers only (loads with ``torch.load(weights_only=True)``)."""
        return {"codes": self.codes, "scales": self.scales, "shape": list(self.shape),
                "dtype": str(self.dtype).replace("torch.", ""), "bits": self.bits,
                "group_size": -1 if self.group_size is None else int(self.group_size)}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "QuantizedTensor":
        dtype = getattr(torch, sd["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"QuantizedTensor.from_state_dict: unknown dtype {sd['dtype']!r}")
        gs = None if int(sd["group_size"]) < 0 else int(sd["group_size"])
        return cls(sd["codes"], sd["scales"], torch.Size(sd["shape"]), dtype, int(sd["bits"]), gs)


# ---------------------------------------------------------------------------------------------
# Argument checks and layout


@dataclass(frozen=True)
class QuantPlan:
    """How a tensor of a given shape is quantized: rows, values per row, bits, groups and code
    columns (:func:`quant_plan` checks the arguments and computes it)."""

    n: int
    m: int
    bits: int
    group_size: int | None  # as stored in QuantizedTensor
    gs: int  # effective group length handed to kernels (>= 1)
    groups: int
    code_cols: int


def quant_plan(shape, bits, group_size) -> QuantPlan:
    if isinstance(bits, bool) or bits not in QMAX:
        raise ValueError(f"quantize: bits must be 8, 4 or 2, got {bits!r}")
    if len(shape) < 1:
        raise ValueError("quantize: x must have at least one dimension (the sample dimension N); "
                         "got a 0-d tensor")
    n = int(shape[0])
    m = int(math.prod(shape[1:])) if len(shape) > 1 else 1
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"quantize: group_size must be an int or None, got "
                            f"{type(group_size).__name__}")
        if group_size <= 0:
            raise ValueError(f"quantize: group_size must be positive, got {group_size}")
    if bits in (4, 2):  # packed: 8 // bits codes per byte, and a group never shares a byte
        per_byte = 8 // bits
        if group_size is None:
            group_size = DEFAULT_INT4_GROUP if bits == 4 else DEFAULT_INT2_GROUP
        if group_size % per_byte:
            need = "an even group_size" if bits == 4 else "a group_size divisible by 4"
            raise ValueError(f"quantize: int{bits} needs {need} (groups must not share a packed byte), "
                             f"got {group_size}")
        return QuantPlan(n, m, bits, group_size, group_size, -(-m // group_size), -(-m // per_byte))
    if group_size is None:
        return QuantPlan(n, m, 8, None, max(m, 1), 1, m)
    return QuantPlan(n, m, 8, group_size, group_size, -(-m // group_size), m)


def _check_buffer(name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"quantize: {name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"quantize: {name} must be {dtype} of shape {tuple(shape)} on {device}, "
                         f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"quantize: {name} must be contiguous (it is written in place)")


def _codes_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits == 8 else torch.uint8


def _raise_nonfinite(scales: torch.Tensor, x_shape) -> None:
    bad = ~torch.isfinite(scales)
    rows = bad.any(dim=1).nonzero()
    row = int(rows[0, 0]) if rows.numel() else -1
    kind = "NaN" if torch.isnan(scales[row]).any() else "Inf"
    raise ValueError(f"quantize: x (shape {tuple(x_shape)}) contains {kind}; first non-finite "
                     f"value in sample (row) {row}")


# ---------------------------------------------------------------------------------------------
# Public API


def quantize(x: torch.Tensor, bits: int = 8, group_size: int | None = None,
             stochastic: bool = False, seed: int = 0, out=None,
             backend: str | None = None) -> QuantizedTensor:
    """Quantize activations ``x`` (N, ...) per row or per group; see the module docstring.

    ``out``: a QuantizedTensor (updated and returned) or a ``(codes, scales)`` tuple of
    contiguous buffers of the right dtype, shape and device, written in place.
    ``backend``: None (auto / FSL_FAST_BACKEND), "reference", "cpp", "cuda" or "triton".
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize: x must be float32, float16 or bfloat16, got {x.dtype} "
                        f"(shape {tuple(x.shape)})")
    p = quant_plan(x.shape, bits, group_size)
    key = seed_key(seed)
    x = x.detach()  # codes are not differentiable; no autograd graph for the reference either
    if stochastic and p.n * p.m >= 2**32:
        raise ValueError(f"quantize: stochastic rounding counts elements with 32 bits; x has "
                         f"{p.n * p.m} >= 2**32 elements (shape {tuple(x.shape)})")
    cdt = _codes_dtype(p.bits)
    if out is None:
        codes = torch.empty((p.n, p.code_cols), dtype=cdt, device=x.device)
        scales = torch.empty((p.n, p.groups), dtype=torch.float32, device=x.device)
    else:
        if isinstance(out, QuantizedTensor):
            codes, scales = out.codes, out.scales
        elif isinstance(out, (tuple, list)) and len(out) == 2:
            codes, scales = out
        else:
            raise TypeError("quantize: out must be a QuantizedTensor or a (codes, scales) tuple, "
                            f"got {type(out).__name__}")
        _check_buffer("out codes", codes, (p.n, p.code_cols), cdt, x.device)
        _check_buffer("out scales", scales, (p.n, p.groups), torch.float32, x.device)
    _name, impl = _backend.resolve("quantize", x.device, backend)
    if p.n and p.m:
        x2 = x.reshape(p.n, p.m)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        impl(x2, p.bits, p.gs, bool(stochastic), key, codes, scales)
        # Scales are >= 0 or NaN, and amax propagates NaN: one reduction and one host read
        # (2 us on CPU against 11 us for isfinite().all()).
        if scales.numel() and not math.isfinite(float(scales.amax())):
            _raise_nonfinite(scales, x.shape)
    else:
        scales.zero_()
    if isinstance(out, QuantizedTensor):
        out.shape, out.dtype, out.bits, out.group_size = x.shape, x.dtype, p.bits, p.group_size
        return out
    return QuantizedTensor(codes, scales, x.shape, x.dtype, p.bits, p.group_size)


def _check_q(q) -> QuantPlan:
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize: q must be a QuantizedTensor, got {type(q).__name__}")
    p = quant_plan(q.shape, q.bits, q.group_size)
    if q.group_size is None and q.bits in (4, 2):
        raise ValueError(f"dequantize: int{q.bits} QuantizedTensor needs its group_size")
    _check_buffer("q.codes", q.codes, (p.n, p.code_cols), _codes_dtype(p.bits), q.codes.device)
    _check_buffer("q.scales", q.scales, (p.n, p.groups), torch.float32, q.codes.device)
    return p


def dequantize(q: QuantizedTensor, out: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """Back to ``q.dtype`` and ``q.shape`` (or into ``out``: contiguous, shape ``q.shape``, any of
    float32/float16/bfloat16, on q's device)."""
    p = _check_q(q)
    dev = q.codes.device
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"dequantize: out must be a tensor, got {type(out).__name__}")
        if tuple(out.shape) != tuple(q.shape) or out.dtype not in _FLOAT_DTYPES \
                or out.device != dev or not out.is_contiguous():
            raise ValueError(f"dequantize: out must be a contiguous float32/float16/bfloat16 "
                             f"tensor of shape {tuple(q.shape)} on {dev}, got {out.dtype} of "
                             f"shape {tuple(out.shape)} on {out.device}"
                             + ("" if out.is_contiguous() else " (not contiguous)"))
    _name, impl = _backend.resolve("dequantize", dev, backend)
    if p.n and p.m:
        impl(q.codes, q.scales, p.bits, p.gs, out.view(p.n, p.m))
    return out


def quantize_reference(x, bits=8, group_size=None, stochastic=False, seed=0, out=None):
    """:func:`quantize` through the plain PyTorch reference (the ground truth of the tests)."""
    return quantize(x, bits, group_size, stochastic, seed, out, backend="reference")


def dequantize_reference(q, out=None):
    """:func:`dequantize` through the plain PyTorch reference."""
    return dequantize(q, out, backend="reference")


# ---------------------------------------------------------------------------------------------
# Backend implementations. Signature: (x2 [N, M] contiguous, bits, gs, stochastic, key, codes,
# scales) writing codes/scales in place; dequantize: (codes, scales, bits, gs, out2 [N, M]).


def _reference_quantize(x2, bits, gs, stochastic, key, codes, scales):
    n, m = x2.shape
    g = scales.shape[1]
    qmax = QMAX[bits]
    xf = x2.float()  # exact for float16 / bfloat16
    if g * gs != m:
        xf = torch.nn.functional.pad(xf, (0, g * gs - m))
    xg = xf.view(n, g, gs)
    amax_bits = (xg.view(torch.int32) & 0x7FFFFFFF).amax(dim=2)
    a = amax_bits.view(torch.float32)
    live = amax_bits >= _TINY_BITS  # NaN/Inf bit patterns are large: live, and flagged
    # Tensor-by-tensor divisions: torch implements ``scalar / t`` as ``t.reciprocal() * scalar``
    # (two roundings) and CUDA divides by a CPU scalar through its reciprocal, both off the
    # contract by an ulp.
    q_t = torch.full_like(a, float(qmax))
    a_safe = torch.where(live, a, torch.ones_like(a))
    scale = torch.where(live, a_safe / q_t, torch.zeros_like(a))
    inv = torch.where(live, q_t / a_safe, torch.zeros_like(a))
    mag_f = xg.abs() * inv.unsqueeze(2)
    if stochastic:
        y = (mag_f * 16777216.0).to(torch.int64)  # trunc == floor (non-negative), exact
        col = torch.arange(g * gs, device=x2.device, dtype=torch.int64)
        row = torch.arange(n, device=x2.device, dtype=torch.int64).unsqueeze(1) * m
        k = rng24_reference((row + col).view(n, g, gs), key)
        mag = (y + k) >> 24
    else:
        # IEEE round-half-even of m; the kernels get the same integer from Y = m * 2**24 (for
        # m >= 0.5, Y is exact), so the tests also check that equivalence.
        mag = torch.round(mag_f).to(torch.int64)
    mag = mag.clamp_(max=qmax)
    code = torch.where(xg < 0, -mag, mag).view(n, g * gs)
    scales.copy_(scale)
    if bits == 8:
        codes.copy_(code[:, :m])
    elif bits == 4:
        packed = (code[:, 0::2] & 0xF) | ((code[:, 1::2] & 0xF) << 4)
        codes.copy_(packed[:, : codes.shape[1]])
    else:  # four 2-bit two's complement codes per byte, element 4j + t at bits 2t..2t+1
        packed = ((code[:, 0::4] & 3) | ((code[:, 1::4] & 3) << 2) | ((code[:, 2::4] & 3) << 4)
                  | ((code[:, 3::4] & 3) << 6))
        codes.copy_(packed[:, : codes.shape[1]])


def _reference_dequantize(codes, scales, bits, gs, out2):
    n, m = out2.shape
    if bits == 8:
        c = codes.to(torch.int32)
    elif bits == 4:
        b = codes.to(torch.int32)
        lo = ((b & 0xF) ^ 8) - 8
        hi = ((b >> 4) ^ 8) - 8
        c = torch.stack((lo, hi), dim=2).view(n, -1)[:, :m]
    else:
        b = codes.to(torch.int32)
        c = torch.stack([(((b >> (2 * t)) & 3) ^ 2) - 2 for t in range(4)], dim=2).view(n, -1)[:, :m]
    s = scales.repeat_interleave(gs, dim=1)[:, :m]
    out2.copy_(c.to(torch.float32) * s)


def _cpp_quantize(x2, bits, gs, stochastic, key, codes, scales):
    torch.ops.fsl_fast.quantize_rows_(x2, bits, gs, stochastic, key, codes, scales)


def _cpp_dequantize(codes, scales, bits, gs, out2):
    torch.ops.fsl_fast.quantize_dequantize_(codes, scales, bits, gs, out2)


def _triton_quantize(x2, bits, gs, stochastic, key, codes, scales):
    triton_ops.ops().quantize_rows_(x2, int(bits), int(gs), bool(stochastic), int(key), codes, scales)


def _triton_dequantize(codes, scales, bits, gs, out2):
    triton_ops.ops().dequantize_rows_(codes, scales, int(bits), int(gs), out2)


_backend.register("quantize", reference=_reference_quantize, cpp=_cpp_quantize,
                  cuda=_cpp_quantize, triton=_triton_quantize)
_backend.register("dequantize", reference=_reference_dequantize, cpp=_cpp_dequantize,
                  cuda=_cpp_dequantize, triton=_triton_dequantize)
