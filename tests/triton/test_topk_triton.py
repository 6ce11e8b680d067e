"""Triton top-k selection against the PyTorch reference: the same positions and values, bit for
bit, over odd shapes, ties, zeros, subnormals, k = 1 and k = M; a non-finite row is the op's
ValueError. Runs under TRITON_INTERPRET=1 on CPU or on a GPU."""
import pytest
import torch

from fsl_fast.ops.topk import topk_rows


def _rows(kind, shape):
    g = torch.Generator().manual_seed(hash((kind, shape)) % 2**31)
    x = torch.randn(shape, generator=g)
    if kind == "ties":
        x = x.round()  # many equal magnitudes, of both signs
    elif kind == "zeros":
        x[:, ::3] = 0.0
        x[:, 1::3] = -0.0
    elif kind == "subnormal":
        x = x * 1e-39
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "subnormal"])
@pytest.mark.parametrize("shape,ks", [((1, 7), (1, 3, 7)), ((3, 129), (1, 7, 128)), ((2, 1500), (1, 75, 1499)),
                                      ((5, 16), (4, 16))], ids=["1x7", "3x129", "2x1500", "5x16"])
def test_triton_topk_matches_reference(triton_ok, kind, shape, ks):
    x = _rows(kind, shape)
    for k in ks:
        ri, rv = topk_rows(x, k, backend="reference")
        gi, gv = topk_rows(x.to(triton_ok), k, backend="triton")
        assert torch.equal(gi.cpu(), ri), f"positions differ: {kind} {shape} k={k}"
        assert torch.equal(gv.cpu(), rv), f"values differ: {kind} {shape} k={k}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_triton_topk_names_the_first_non_finite_row(triton_ok, bad):
    x = torch.randn(4, 20)
    x[2, 5] = bad
    x[3, 0] = bad
    with pytest.raises(ValueError, match=r"non-finite values \(first in row 2\)"):
        topk_rows(x.to(triton_ok), 3, backend="triton")
