"""Triton kernels of the linear auxiliary head vs the float64 autograd reference (tiny shapes,
fp32; run with TRITON_INTERPRET=1 on CPU, or on a GPU)."""
import pytest
import torch

from fsl_fast.ops import aux as A


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("B,C,shape,pool,K", [
    (1, 2, (5,), False, None),
    (3, 10, (129,), False, None),
    (37, 100, (20,), False, None),
    (5, 10, (6, 3, 5), True, None),
    (17, 10, (4, 2, 2), False, None),   # 4-D flattened; B over one row block
    (7, 10, (33,), False, 2),           # batched K form
])
def test_triton_matches_reference(seed, triton_device, B, C, shape, pool, K):
    lead = (B,) if K is None else (K, B)
    wl = () if K is None else (K,)
    feat = torch.randn(lead + shape, dtype=torch.float64)
    D = shape[0] if pool else int(torch.tensor(shape).prod())
    w = torch.randn(wl + (C, D), dtype=torch.float64) / D ** 0.5
    b = 0.1 * torch.randn(wl + (C,), dtype=torch.float64)
    y = torch.randint(0, C, lead)
    t = torch.randn_like(feat) / B
    g_ref = A.aux_estimate_reference(feat, w, b, y, pool)
    l_ref, dW_ref, db_ref = A.aux_align_reference(feat, w, b, y, t, pool)
    dev = lambda v: v.to(device=triton_device, dtype=torch.float32)  # noqa: E731
    yd = y.to(triton_device)
    g = A.aux_estimate(dev(feat), dev(w), dev(b), yd, pool=pool, backend="triton")
    loss, dW, db = A.aux_align(dev(feat), dev(w), dev(b), yd, dev(t), pool=pool, backend="triton")
    errs = {"g": rel(g, g_ref), "loss": rel(loss, l_ref), "dW": rel(dW, dW_ref), "db": rel(db, db_ref)}
    print(f"aux triton B={B} C={C} {shape} pool={pool} K={K}: {errs}")
    assert g.shape == feat.shape and dW.shape == w.shape and loss.shape == ((K,) if K else ())
    assert max(errs.values()) <= 1e-5, errs


def test_triton_rejects_float64(triton_device):
    x = torch.randn(1, 3, 5, dtype=torch.float64, device=triton_device)
    w = torch.randn(1, 2, 5, dtype=torch.float64, device=triton_device)
    b = torch.zeros(1, 2, dtype=torch.float64, device=triton_device)
    y = torch.zeros(1, 3, dtype=torch.int64, device=triton_device)
    from fsl_fast.kernels import aux as kern

    with pytest.raises(TypeError, match="x must be float32"):
        kern.estimate(x, w, b, y, 1.0, 1.0)
