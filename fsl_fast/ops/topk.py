"""Per-row top-k selection, the first stage of the ``topk`` codec (fsl_fast/codec.py).

``topk_rows(x, k)`` for x float32 ``[N, M]`` returns ``(index, values)``: per row the positions
of the k largest magnitudes in ascending order, ties going to the lower position (int64
``[N, k]``), and x at those positions (float32 ``[N, k]``). A NaN or an infinity in x is a
``ValueError`` naming the first row that has one.

Backends, all the same selection bit for bit:

- ``reference``: PyTorch, the k-th largest magnitude by ``torch.topk``, then every position above
  it and the lowest positions equal to it;
- ``cpp`` (csrc/topk.cpp): a histogram of the magnitudes' top bits, ``std::nth_element`` inside the
  bucket holding the k-th largest, one ordered pass to write;
- ``cuda`` (csrc/topk_kernels.cu): one block per row, a 4-digit radix select of the k-th largest
  bit pattern, block prefix sums for the ordered write;
- ``triton`` (kernels/topk.py): one program per row, the threshold bit by bit, prefix sums for the
  ordered write.
"""
from __future__ import annotations

import torch

from fsl_fast.ops import _backend, triton_ops


def _nonfinite(x2: torch.Tensor, row: int) -> ValueError:
    return ValueError(f"topk_rows: x of shape {tuple(x2.shape)} has non-finite values (first in row {row})")


def topk_reference(x2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, m = x2.shape
    finite = torch.isfinite(x2).all(dim=1)
    if not bool(finite.all()):
        raise _nonfinite(x2, int((~finite).nonzero()[0, 0]))
    a = x2.abs()
    if k >= m:
        index = torch.arange(m, device=x2.device).expand(n, m).contiguous()
    else:
        thr = torch.topk(a, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        above = a > thr
        need = k - above.sum(dim=1, keepdim=True)
        tied = a == thr
        keep = above | (tied & (tied.cumsum(dim=1) <= need))
        index = keep.nonzero()[:, 1].view(n, k)
    return index, torch.gather(x2, 1, index).float()


def _outputs(x2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' output buffers: index int64 [N, k] and values float32 [N, k] on x2's device."""
    n = x2.shape[0]
    return (torch.empty((n, k), dtype=torch.int64, device=x2.device),
            torch.empty((n, k), dtype=torch.float32, device=x2.device))


def _topk_cpp(x2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x2.dtype != torch.float32:
        return topk_reference(x2, k)
    _backend.extension()
    index, values = _outputs(x2, k)
    try:
        torch.ops.fsl_fast.topk_rows_(x2.contiguous(), k, index, values)
    except RuntimeError as e:
        if "non-finite value in row" not in str(e):
            raise
        raise _nonfinite(x2, int(str(e).split("non-finite value in row ")[1].split()[0])) from None
    return index, values


def _topk_triton(x2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x2.float().contiguous()
    index, values = _outputs(x2, k)
    bad = triton_ops.ops().topk_rows_(x2, int(k), index, values)
    if bool(bad.any()):
        raise _nonfinite(x2, int(bad.nonzero()[0, 0]))
    return index, values


_backend.register("topk", reference=topk_reference, cpp=_topk_cpp, cuda=_topk_cpp, triton=_topk_triton)


def topk_rows(x2: torch.Tensor, k: int, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module doc. ``backend``: None (auto / FSL_FAST_BACKEND), "reference", "cpp", "cuda"
    or "triton"."""
    if x2.dim() != 2:
        raise ValueError(f"topk_rows: x must be 2-D [N, M], got shape {tuple(x2.shape)}")
    n, m = x2.shape
    if not isinstance(k, int) or not 1 <= k <= max(m, 1) or m == 0:
        raise ValueError(f"topk_rows: k must be in [1, M = {m}], got {k!r}")
    _name, impl = _backend.resolve("topk", x2.device, backend)
    return impl(x2, k)
