"""Flat-buffer FedAvg: the weighted average of K flat parameter buffers in one pass.

Contract of ``fedavg(buf, weights, out=None, broadcast=False, backend=None) -> out``:

- ``buf``: [K, P] float32 or bfloat16, unit column stride (row stride may exceed P);
- ``weights``: K non-negative finite numbers summing to 1 (|sum - 1| <= 1e-5), a 1-D tensor on
  any device or a sequence; they are rounded to float32 for the kernels;
- ``out``: [P] float32, contiguous, on buf's device, not overlapping buf (allocated if None);
- result ``out[p] = sum_k w[k] * buf[k, p]`` accumulated in float32; with ``broadcast=True`` the
  average is also written into every row of ``buf`` (rounded to nearest-even when bf16).

Numerics. The C++, CUDA and Triton kernels all sum in the order of the authors' per-key loop
(``acc = w0*x0; acc = acc + wk*xk`` for k = 1..K-1, every product and sum rounded to float32, no
fused multiply-add), so on float32 data they reproduce :func:`fedavg_state_dicts` bit for bit,
for any thread count (each column is summed by one thread; no atomics). The CUDA build uses
``--use_fast_math``, which flushes float32 denormals to zero: results can differ there only for
values below 1.2e-38. The ``reference`` backend is ``torch.mv`` (a BLAS reduction in its own order)
and agrees to float32 rounding (a few ulp), not bitwise.

Integer buffers (BatchNorm's ``num_batches_tracked``) are averaged apart by
:func:`fedavg_int_buffers`, reproducing what the authors' code stores: ``LongTensor * float``
promotes to float32, the weighted sum runs in float32 in client order, and ``load_state_dict``
copies it back into the int64 buffer, truncating toward zero. With equal counts n the result is n
or, when the float32 sum lands just below n (e.g. ten weights of 0.1), n - 1; we keep that
behaviour so that the fused and reference engines agree exactly.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fsl_fast.ops import _backend, triton_ops

__all__ = [
    "fedavg",
    "fedavg_reference",
    "fedavg_int_buffers",
    "fedavg_state_dicts",
    "validate_weights",
    "weighted_sum",
]

WEIGHT_SUM_TOL = 1e-5


def validate_weights(weights, k: int, what: str = "weights", normalized: bool = True) -> list[float]:
    """Check FedAvg weights and return them as Python floats (``normalized=False``: any sum).

    ``weights`` is a 1-D tensor (any device; a CUDA tensor costs one synchronization) or a
    sequence of numbers. It must have length ``k``, be finite and non-negative, and sum to 1
    within ``WEIGHT_SUM_TOL``. Raises ValueError naming the problem.
    """
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"{what} must be a 1-D tensor of length K={k}, "
                             f"got shape {tuple(weights.shape)}")
        if weights.is_complex() or weights.dtype == torch.bool:
            raise ValueError(f"{what} must be real numbers, got dtype {weights.dtype}")
        vals = weights.detach().to("cpu", torch.float64).tolist()
    else:
        if isinstance(weights, (str, bytes, Mapping)) or not hasattr(weights, "__iter__"):
            raise ValueError(f"{what} must be a 1-D tensor or a sequence of numbers, "
                             f"got {type(weights).__name__}")
        if getattr(weights, "ndim", 1) != 1:  # e.g. a 2-D numpy array
            raise ValueError(f"{what} must be 1-D of length K={k}, got shape {tuple(weights.shape)}")
        try:
            vals = [float(x) for x in weights]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} must contain numbers only ({e})") from None
    if len(vals) != k:
        raise ValueError(f"{what} has length {len(vals)} but there are K={k} clients (rows of buf)")
    for i, v in enumerate(vals):
        if not math.isfinite(v):
            raise ValueError(f"{what} must be finite, got {what}[{i}] = {v}")
        if v < 0:
            raise ValueError(f"{what} must be non-negative, got {what}[{i}] = {v}")
    s = math.fsum(vals)
    if normalized and abs(s - 1.0) > WEIGHT_SUM_TOL:
        raise ValueError(f"{what} must sum to 1 (within {WEIGHT_SUM_TOL:g}), got sum {s!r}")
    return vals


def _check_buf(buf) -> None:
    if not isinstance(buf, torch.Tensor):
        raise ValueError(f"fedavg: buf must be a torch.Tensor [K, P], got {type(buf).__name__}")
    if buf.dim() != 2:
        raise ValueError(f"fedavg: buf must be 2-D [K, P], got shape {tuple(buf.shape)}")
    if buf.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fedavg: buf must be float32 or bfloat16, got {buf.dtype} "
                         f"(shape {tuple(buf.shape)})")
    k, p = buf.shape
    if k < 1:
        raise ValueError(f"fedavg: buf must have at least one row, got shape {tuple(buf.shape)}")
    if p > 1 and buf.stride(1) != 1:
        raise ValueError(f"fedavg: buf must have unit column stride, got strides {buf.stride()} "
                         f"for shape {tuple(buf.shape)}")
    if k > 1 and buf.stride(0) < p:
        raise ValueError(f"fedavg: buf rows overlap (row stride {buf.stride(0)} < P={p})")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = t.data_ptr()
        hi = lo + (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        return lo, hi

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _prepare_out(buf: torch.Tensor, out) -> torch.Tensor:
    p = buf.shape[1]
    if out is None:
        return torch.empty(p, dtype=torch.float32, device=buf.device)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"fedavg: out must be a torch.Tensor [P], got {type(out).__name__}")
    if out.shape != (p,) or out.dtype != torch.float32:
        raise ValueError(f"fedavg: out must be float32 [P]=[{p}], got {out.dtype} {tuple(out.shape)}")
    if out.device != buf.device:
        raise ValueError(f"fedavg: out is on {out.device} but buf is on {buf.device}")
    if not out.is_contiguous():
        raise ValueError(f"fedavg: out must be contiguous, got stride {out.stride()}")
    if _overlaps(out, buf):
        raise ValueError("fedavg: out overlaps buf; pass a separate [P] float32 tensor")
    return out


# ---------------------------------------------------------------------------------------------
# Implementations: (buf, w32, out, broadcast) -> None, after validation. w32 is float32 [K] on
# buf's device.


def _impl_reference(buf, w32, out, broadcast):
    src = buf if buf.dtype == torch.float32 else buf.float()
    # [P, K] @ [K] -> [P]: one BLAS gemv over the flat buffer, into the preallocated out.
    torch.mv(src.t(), w32, out=out)
    if broadcast:
        buf.copy_(out.expand_as(buf))


def _impl_extension(buf, w32, out, broadcast):
    if broadcast:
        torch.ops.fsl_fast.fedavg_broadcast(buf, w32, out)
    else:
        torch.ops.fsl_fast.fedavg(buf, w32, out)


def _impl_triton(buf, w32, out, broadcast):
    triton_ops.ops().fedavg(buf, w32, out, bool(broadcast))


_backend.register(
    "fedavg",
    reference=_impl_reference,
    cpp=_impl_extension,
    cuda=_impl_extension,
    triton=_impl_triton,
)


def fedavg(buf: torch.Tensor, weights, out: torch.Tensor | None = None, broadcast: bool = False,
           backend: str | None = None) -> torch.Tensor:
    """Weighted average of the K rows of ``buf`` into ``out``; see the module docstring.

    Args:
        buf: [K, P] float32 or bfloat16 (CPU or CUDA), unit column stride.
        weights: K weights (1-D tensor or sequence), finite, >= 0, summing to 1 within 1e-5.
        out: [P] float32 on buf's device, or None to allocate one.
        broadcast: also write the average into every row of ``buf`` (in place).
        backend: None (auto, or ``FSL_FAST_BACKEND``), "cpp", "cuda", "triton" or "reference".

    Returns:
        ``out`` ([P] float32).
    """
    _check_buf(buf)
    k = buf.shape[0]
    vals = validate_weights(weights, k)
    out = _prepare_out(buf, out)
    _, impl = _backend.resolve("fedavg", buf.device, backend)
    w32 = torch.tensor(vals, dtype=torch.float32).to(buf.device)
    impl(buf, w32, out, bool(broadcast))
    return out


def weighted_sum(buf: torch.Tensor, weights, out: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """``out[p] = sum_k w[k] * buf[k, p]`` with the kernels of :func:`fedavg` (the same order and
    roundings) for weights that need not sum to 1: a partial FedAvg, e.g. one process's share of
    the clients, or a running sum carried in as a row of weight 1 (``1 * x`` is exact, so
    ``weighted_sum([acc; x_a; x_b], [1, w_a, w_b])`` continues the sum ``acc`` in client order)."""
    _check_buf(buf)
    vals = validate_weights(weights, buf.shape[0], normalized=False)
    out = _prepare_out(buf, out)
    _, impl = _backend.resolve("fedavg", buf.device, backend)
    impl(buf, torch.tensor(vals, dtype=torch.float32).to(buf.device), out, False)
    return out


def fedavg_reference(buf: torch.Tensor, weights, out: torch.Tensor | None = None,
                     broadcast: bool = False) -> torch.Tensor:
    """The plain PyTorch FedAvg (``torch.mv`` of the [K, P] buffer), same contract as fedavg."""
    return fedavg(buf, weights, out=out, broadcast=broadcast, backend="reference")


def fedavg_int_buffers(int_buf: torch.Tensor, weights) -> torch.Tensor:
    """FedAvg of integer buffers [K, Q] -> [Q] in int_buf's dtype, as the authors' code stores it.

    ``int_buf[0] * w0 + int_buf[1] * w1 + ...`` with Python-float weights (so the sum is float32,
    in client order), then cast back to the integer dtype (truncation toward zero, which is what
    ``load_state_dict`` does when it copies the float32 average into ``num_batches_tracked``).
    """
    if not isinstance(int_buf, torch.Tensor) or int_buf.dim() != 2:
        raise ValueError(f"fedavg_int_buffers: int_buf must be a 2-D tensor [K, Q], got "
                         f"{getattr(int_buf, 'shape', type(int_buf).__name__)}")
    if int_buf.is_floating_point() or int_buf.is_complex():
        raise ValueError(f"fedavg_int_buffers: int_buf must have an integer dtype, got {int_buf.dtype}")
    vals = validate_weights(weights, int_buf.shape[0])
    acc = int_buf[0] * vals[0]
    for i in range(1, len(vals)):
        acc += int_buf[i] * vals[i]
    return acc.to(int_buf.dtype)


def fedavg_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights,
                       cast_back: bool = True) -> dict[str, torch.Tensor]:
    """The authors' FedAvg: a weighted sum per state_dict key, in client order.

    ``avg[key] = sd0[key] * w0``, then ``avg[key] += sdi[key] * wi`` for i = 1..K-1, with
    Python-float weights (float32 arithmetic for float32 entries; integer entries are promoted to
    float32). With ``cast_back`` (default) every entry is cast back to the dtype of
    ``state_dicts[0][key]``, i.e. exactly what ``load_state_dict`` would store (integer entries
    truncate toward zero); with ``cast_back=False`` the raw sums are returned, as the authors' code
    holds them before loading.
    """
    if isinstance(state_dicts, Mapping) or not isinstance(state_dicts, Sequence) or not state_dicts:
        raise ValueError("fedavg_state_dicts: state_dicts must be a non-empty sequence of state dicts")
    vals = validate_weights(weights, len(state_dicts))
    keys = list(state_dicts[0].keys())
    for i, sd in enumerate(state_dicts[1:], start=1):
        if list(sd.keys()) != keys:
            missing = sorted(set(keys) - set(sd.keys()))
            extra = sorted(set(sd.keys()) - set(keys))
            raise ValueError(f"fedavg_state_dicts: state_dicts[{i}] keys differ from state_dicts[0] "
                             f"(missing {missing[:5]}, extra {extra[:5]}, or a different order)")
    avg = {}
    for key in keys:
        first = state_dicts[0][key]
        acc = first * vals[0]
        for i in range(1, len(vals)):
            acc += state_dicts[i][key] * vals[i]
        avg[key] = acc.to(first.dtype) if cast_back else acc
    return avg
