"""FlatAdam and its fused step (op ``adam_step``) against torch.optim.Adam."""
import pytest
import torch

from fsl_fast.ops import _backend
from fsl_fast.ops.adam import adam_step_reference
from fsl_fast.optim import FlatAdam

needs_cpp = pytest.mark.skipif(not _backend.available("cpp", "cpu")[0],
                               reason="no C++ extension: " + str(_backend.available("cpp", "cpu")[1]))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_flat_adam_rows_match_torch_adam(backend, wd):
    torch.manual_seed(0)
    K, P, width = 3, 1000, 1300  # rows are views into a wider buffer (parameters before buffers)
    buf = torch.randn(K, width)
    gbuf = torch.zeros(K, width)
    opt = FlatAdam(buf[:, :P], gbuf[:, :P], lr=3e-3, weight_decay=wd, backend=backend)
    assert opt.backend == backend
    refs = [buf[k, :P].clone().requires_grad_(True) for k in range(K)]
    topts = [torch.optim.Adam([r], lr=3e-3, weight_decay=wd) for r in refs]
    tail = buf[:, P:].clone()
    for it in range(6):
        rows = [0, 1, 2] if it % 3 else [0, 2]  # uneven step counts, a non-contiguous subset
        for k in rows:
            g = torch.randn(P) * (k + 1)
            gbuf[k, :P] = g
            refs[k].grad = g.clone()
            topts[k].step()
        opt.step(rows)
    for k in range(K):
        torch.testing.assert_close(buf[k, :P], refs[k].detach(), rtol=2e-6, atol=1e-7)
    assert torch.equal(buf[:, P:], tail), "buffers past the parameter part must not move"
    assert opt.steps == [6, 4, 6]


@needs_cpp
def test_cpp_step_matches_reference_elementwise():
    torch.manual_seed(1)
    p = torch.randn(2, 5000)
    g, m, v = torch.randn(2, 5000), torch.randn(2, 5000) * 0.1, torch.rand(2, 5000) * 0.01
    a = [t.clone() for t in (p, g, m, v)]
    b = [t.clone() for t in (p, g, m, v)]
    adam_step_reference(a[0], a[1], a[2], a[3], 1e-3, 0.9, 0.999, 1e-8, 0.01, 7)
    torch.ops.fsl_fast.adam_step(b[0], b[1], b[2], b[3], 1e-3, 0.9, 0.999, 1e-8, 0.01, 7)
    # atol: about one float32 ulp of the operands (~0.1): a build without FMA (the portable
    # x86-64-v2 module) rounds the moment updates' products separately (measured 9.5e-9)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1.5e-8)


@needs_cpp
def test_cpp_step_rejects_bad_operands():
    p = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="exp_avg has shape"):
        torch.ops.fsl_fast.adam_step(p, p.clone(), torch.zeros(4, 7), p.clone(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        torch.ops.fsl_fast.adam_step(p, p.clone(), p.clone(), p.clone(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        q = torch.zeros(8, 4).t()
        torch.ops.fsl_fast.adam_step(q, q, q, q, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
