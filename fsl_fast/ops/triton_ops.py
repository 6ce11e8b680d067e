"""The Triton kernels (fsl_fast.kernels) as torch.library ops of their own, in the
``fsl_fast_triton`` namespace: ``FSL_FAST_BACKEND=triton`` (or ``backend="triton"``) runs these
ops, the default backends run ``torch.ops.fsl_fast`` (C++ on CPU tensors, CUDA on CUDA tensors, by
dispatch key). Each op has a schema, a fake kernel (shapes and dtypes without computing, for
FakeTensor / the meta device / torch.compile) and passes ``torch.library.opcheck``
(tests/triton/test_triton_ops.py, under ``TRITON_INTERPRET=1`` on a CPU).

The ops only launch: argument checks live in the public functions of fsl_fast.ops (quantize,
fedavg, topk, aux), which call them. Registered on first use (:func:`ops`), so that importing
fsl_fast never imports triton.
"""
from __future__ import annotations

import torch

NS = "fsl_fast_triton"
OPS = ("quantize_rows_", "dequantize_rows_", "topk_rows_", "fedavg", "aux_estimate", "aux_align")

_done: list = []


def _register() -> None:
    lib = torch.library

    @lib.custom_op(f"{NS}::quantize_rows_", mutates_args=("codes", "scales"))
    def quantize_rows_(x: torch.Tensor, bits: int, gs: int, stochastic: bool, key: int,
                       codes: torch.Tensor, scales: torch.Tensor) -> None:
        from fsl_fast.kernels import quantize as k

        k.quantize_rows(x, bits, gs, stochastic, key, codes, scales)

    @quantize_rows_.register_fake
    def _(x, bits, gs, stochastic, key, codes, scales):
        return None

    @lib.custom_op(f"{NS}::dequantize_rows_", mutates_args=("out",))
    def dequantize_rows_(codes: torch.Tensor, scales: torch.Tensor, bits: int, gs: int,
                         out: torch.Tensor) -> None:
        from fsl_fast.kernels import quantize as k

        k.dequantize_rows(codes, scales, bits, gs, out)

    @dequantize_rows_.register_fake
    def _(codes, scales, bits, gs, out):
        return None

    @lib.custom_op(f"{NS}::topk_rows_", mutates_args=("index", "values"))
    def topk_rows_(x: torch.Tensor, k: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Returns the int32 [N] flags of rows holding a non-finite value."""
        from fsl_fast.kernels import topk as kern

        return kern.topk_rows(x, k, index, values)

    @topk_rows_.register_fake
    def _(x, k, index, values):
        return x.new_empty((x.shape[0],), dtype=torch.int32)

    @lib.custom_op(f"{NS}::fedavg", mutates_args=("out", "buf"))
    def fedavg(buf: torch.Tensor, w: torch.Tensor, out: torch.Tensor, broadcast: bool) -> None:
        """out = w @ buf; with ``broadcast`` also every row of buf = out."""
        from fsl_fast.kernels.fedavg import fedavg_triton

        fedavg_triton(buf, w, out, broadcast)

    @fedavg.register_fake
    def _(buf, w, out, broadcast):
        return None

    @lib.custom_op(f"{NS}::aux_estimate", mutates_args=())
    def aux_estimate(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                     inv_spread: float, scale: float) -> torch.Tensor:
        from fsl_fast.kernels import aux as kern

        return kern.estimate(x, w, b, y, inv_spread, scale)

    @aux_estimate.register_fake
    def _(x, w, b, y, inv_spread, scale):
        return torch.empty_like(x)

    @lib.custom_op(f"{NS}::aux_align", mutates_args=())
    def aux_align(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                  spread: float, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from fsl_fast.kernels import aux as kern

        return kern.align(x, w, b, y, t, spread, scale)

    @aux_align.register_fake
    def _(x, w, b, y, t, spread, scale):
        K, C = w.shape[0], w.shape[1]
        return x.new_empty((K,)), torch.empty_like(w), x.new_empty((K, C))


def ops():
    """``torch.ops.fsl_fast_triton``, registered on the first call."""
    if not _done:
        _register()
        _done.append(True)
    return getattr(torch.ops, NS)
