"""Triton quantize/dequantize against the PyTorch reference: identical codes, scales and values.

Runs under TRITON_INTERPRET=1 on CPU (tiny shapes; float32/float16 only: the interpreter of
triton 3.9 gets bfloat16 arithmetic wrong) or on a GPU (bfloat16 added, larger rows).
"""
import pytest
import torch

from fsl_fast.ops.quantize import dequantize, quantize


def _dtypes():
    base = [torch.float32, torch.float16]
    return base + ([torch.bfloat16] if torch.cuda.is_available() else [])


# (2, 9000) per-row int8 goes through the looped kernel (groups longer than TILE_MAX = 8192).
SHAPES = [(1, 7), (3, 129), (2, 5, 3, 3), (2, 9000)]
CONFIGS = [(8, None), (8, 5), (4, None), (4, 6), (4, 9000), (2, None), (2, 12), (2, 9008)]


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"int{c[0]}-g{c[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(triton_ok, shape, cfg, stochastic, seed):
    dev = triton_ok
    bits, gs = cfg
    for dtype in _dtypes():
        x = (torch.randn(shape) * 3).to(dtype)
        where = f"triton {shape} {dtype} bits={bits} group={gs} stochastic={stochastic}"
        ref = quantize(x, bits, gs, stochastic, seed=seed + 2**31, backend="reference")
        got = quantize(x.to(dev), bits, gs, stochastic, seed=seed + 2**31, backend="triton")
        assert torch.equal(got.scales.cpu(), ref.scales), f"scales differ: {where}"
        diff = (got.codes.cpu().to(torch.int32) - ref.codes.to(torch.int32)).abs()
        assert torch.equal(got.codes.cpu(), ref.codes), \
            f"codes differ at {int((diff > 0).sum())} places: {where}"
        back = dequantize(got, backend="triton")
        assert back.dtype == dtype and back.shape == x.shape
        assert torch.equal(back.cpu(), dequantize(ref, backend="reference")), where


def test_triton_zero_rows_nonfinite_and_out(triton_ok):
    dev = triton_ok
    x = torch.randn(3, 10, device=dev)
    x[1] = 0.0
    codes = torch.full((3, 5), 0x55, dtype=torch.uint8, device=dev)
    scales = torch.full((3, 2), -1.0, device=dev)
    q = quantize(x, 4, 6, out=(codes, scales), backend="triton")
    assert q.codes.data_ptr() == codes.data_ptr()
    ref = quantize(x.cpu(), 4, 6, backend="reference")
    assert torch.equal(codes.cpu(), ref.codes) and torch.equal(scales.cpu(), ref.scales)
    assert float(scales[1].abs().max()) == 0.0 and int(codes[1].max()) == 0
    out = torch.full((3, 10), 5.0, device=dev)
    dequantize(q, out=out, backend="triton")
    assert float(out[1].abs().max()) == 0.0
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"contains NaN.*row\) 2"):
        quantize(x, backend="triton")
    x[2, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"contains Inf.*row\) 2"):
        quantize(x, 8, 4, backend="triton")
