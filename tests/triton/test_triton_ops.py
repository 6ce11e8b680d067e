"""Every Triton op (torch.ops.fsl_fast_triton, fsl_fast/ops/triton_ops.py) passes
torch.library.opcheck (schema and mutation annotations, fake kernel, autograd registration, AOT
dispatch with dynamic shapes), and what it computes is what the backend="triton" functions return."""
from __future__ import annotations

import pytest
import torch

from fsl_fast.ops import triton_ops


def _cases(dev):
    x = torch.randn(3, 10, device=dev)
    q8 = (torch.empty(3, 10, dtype=torch.int8, device=dev), torch.empty(3, 1, device=dev))
    q4 = (torch.empty(3, 4, dtype=torch.uint8, device=dev), torch.empty(3, 2, device=dev))
    return {
        "quantize_rows_": [(x, 8, 10, False, 0, *q8), (x, 4, 5, True, 7, *q4)],
        "dequantize_rows_": [(torch.randint(-127, 128, (3, 10), dtype=torch.int8, device=dev),
                              torch.rand(3, 1, device=dev), 8, 10, torch.empty(3, 10, device=dev))],
        "topk_rows_": [(x, 3, torch.empty(3, 3, dtype=torch.int64, device=dev), torch.empty(3, 3, device=dev))],
        "fedavg": [(torch.randn(4, 33, device=dev), torch.full((4,), 0.25, device=dev),
                    torch.empty(33, device=dev), False),
                   (torch.randn(4, 33, device=dev), torch.full((4,), 0.25, device=dev),
                    torch.empty(33, device=dev), True)],
        "aux_estimate": [(torch.randn(2, 5, 7, device=dev), torch.randn(2, 3, 7, device=dev),
                          torch.randn(2, 3, device=dev), torch.randint(0, 3, (2, 5), device=dev), 1.0, 0.2)],
        "aux_align": [(torch.randn(2, 5, 7, device=dev), torch.randn(2, 3, 7, device=dev),
                       torch.randn(2, 3, device=dev), torch.randint(0, 3, (2, 5), device=dev),
                       torch.randn(2, 5, 7, device=dev), 1.0, 0.2)],
    }


def test_every_op_has_a_case():
    assert set(_cases("cpu")) == set(triton_ops.OPS)


@pytest.mark.parametrize("op", triton_ops.OPS)
def test_opcheck(triton_ok, op):
    torch.manual_seed(0)
    fn = getattr(triton_ops.ops(), op)
    for args in _cases(triton_ok)[op]:
        torch.library.opcheck(fn, args)


def test_the_triton_backend_runs_these_ops(triton_ok, monkeypatch):
    """backend="triton" goes through the registered op (a wrapped op records the call)."""
    from fsl_fast.ops.quantize import quantize

    ns = triton_ops.ops()
    calls = []
    real = ns.quantize_rows_

    class Spy:
        def __getattr__(self, name):
            return getattr(ns, name)

        def quantize_rows_(self, *args):
            calls.append(args[1])
            return real(*args)

    monkeypatch.setattr(triton_ops, "ops", lambda: Spy())
    x = torch.randn(4, 12, device=triton_ok)
    q = quantize(x, bits=8, backend="triton")
    assert calls == [8] and q.codes.shape == (4, 12)
