"""conv_pool_relu: the fused conv + bias + ReLU + max-pool block (csrc/conv.cpp) against torch.

Values and all three gradients are judged against float64 torch: the C++ kernel sums in another
order than oneDNN, so it may differ from fp32 torch by rounding, but its error against float64 must
stay within 2x torch's own fp32 error plus 1e-6 of the scale (as for the fused client layers in
test_layers.py). Where the pool routes gradient (argmax, ReLU mask) both must agree exactly.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsl_fast.ops import _backend
from fsl_fast.ops import layers as L

HAS_CPP = _backend.available("cpp", "cpu")[0]
needs_cpp = pytest.mark.skipif(
    not HAS_CPP, reason=f"C++ extension unavailable: {_backend.extension_error()}")


def _ref(x, w, b, pool):
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=w.shape[2] // 2)), *pool)


def _grads(fn, x, w, b, g, need_x):
    x = x.detach().clone().requires_grad_(need_x)
    w = w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    y = fn(x, w, b)
    ins = ([x] if need_x else []) + [w] + ([b] if b is not None else [])
    return y.detach(), torch.autograd.grad(y, ins, g)


# (N, Cin, Cout, K, H, W, pool) -- the cnn and simple_conv blocks, odd sizes, Cout not a multiple
# of 16, more than 4 channel chunks, K = 1 / 7, pools with padding and overlap
CASES = [
    (4, 1, 16, 3, 28, 28, (2, 2, 0)),
    (4, 16, 32, 3, 14, 14, (2, 2, 0)),
    (2, 3, 64, 5, 32, 32, (3, 2, 1)),
    (3, 5, 20, 3, 9, 11, (3, 2, 1)),
    (2, 2, 7, 1, 6, 5, (2, 2, 0)),
    (1, 4, 80, 3, 7, 7, (2, 2, 1)),
    (2, 3, 8, 7, 13, 10, (3, 3, 1)),
    (2, 21, 24, 3, 5, 30, (2, 1, 0)),
    (1, 1, 3, 3, 1, 1, (1, 1, 0)),
    # Cin of two 16-lane chunks with Cout padded to 32; row blocks of 7/8 positions do not
    # divide the width 18 (the padded-width blocks)
    (2, 32, 24, 3, 8, 20, (3, 2, 1)),
    (3, 16, 16, 3, 6, 18, (2, 2, 0)),
]


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n%dci%dco%dk%d-%dx%d-p%d%d%d" % (c[:6] + c[6]))
def test_matches_torch_float64(seed, case, bias):
    N, ci, co, k, h, w_, pool = case
    x = torch.randn(N, ci, h, w_)
    w = torch.randn(co, ci, k, k) / (ci * k * k) ** 0.5
    b = torch.randn(co) * 0.1 if bias else None
    y64 = _ref(x.double(), w.double(), None if b is None else b.double(), pool)
    g = torch.randn_like(y64).float()
    y64, grads64 = _grads(lambda *a: _ref(*a, pool), x.double(), w.double(),
                          None if b is None else b.double(), g.double(), True)
    y32, grads32 = _grads(lambda *a: _ref(*a, pool), x, w, b, g, True)
    y, grads = _grads(lambda *a: L.conv_pool_relu(*a, *pool, backend="cpp"), x, w, b, g, True)
    assert y.shape == y64.shape
    for name, a, t, r in [("y", y, y32, y64)] + list(zip(["x", "w", "b"], grads, grads32, grads64)):
        err, err_t = (a.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * err_t + 1e-6 * r.abs().max().item() + 1e-12, (name, err, err_t)
    # the same cells carry gradient (ReLU mask and argmax agree with torch's)
    assert torch.equal(y > 0, y32 > 0)


@needs_cpp
def test_weight_only_gradient_and_eval_forward(seed):
    """The first layer needs no input gradient (the backward skips it); no_grad forward works."""
    conv = nn.Conv2d(3, 16, 5, padding=2)
    x = torch.randn(2, 3, 12, 12)
    y = L.conv_pool_relu(x, conv.weight, conv.bias, 3, 2, 1)
    y.sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None
    with torch.no_grad():
        y2 = L.conv_pool_relu(x, conv.weight, conv.bias, 3, 2, 1)
    assert torch.equal(y.detach(), y2)


@needs_cpp
def test_ties_negative_windows_and_nan(seed):
    # a 1x1 conv with weight 1, bias 0 is the identity: ties and all-negative windows as in
    # test_layers' pool_relu cases, then a NaN: y NaN there and no gradient from that window
    w = torch.ones(1, 1, 1, 1)
    x = torch.randint(-2, 3, (1, 1, 8, 8)).float()
    x[0, 0, :2, :2] = -1.0
    x[0, 0, 2:4, 2:4] = 2.0
    x[0, 0, 6, 6] = float("nan")
    g = torch.randn(1, 1, 4, 4)
    xr = x.clone().requires_grad_(True)
    yr = F.max_pool2d(F.relu(xr), 2)
    (gxr,) = torch.autograd.grad(yr, xr, g)
    xf = x.clone().requires_grad_(True)
    yf = L.conv_pool_relu(xf, w, None, 2, 2, 0)
    (gxf,) = torch.autograd.grad(yf, xf, g)
    assert torch.equal(yf[~yf.isnan()], yr[~yr.isnan()]) and torch.equal(yf.isnan(), yr.isnan())
    assert torch.isnan(yf[0, 0, 3, 3])
    assert gxf[0, 0, 6:8, 6:8].abs().sum() == 0  # NaN window: no gradient (as pool_relu)
    keep = torch.ones_like(gxr, dtype=torch.bool)
    keep[0, 0, 6:8, 6:8] = False
    assert torch.equal(gxf[keep], gxr[keep])  # ties: first maximum in window order, like torch


@needs_cpp
def test_unsupported_shapes_fall_back_to_reference(seed):
    assert L.conv_pool_relu_supported(16, 3) and L.conv_pool_relu_supported(3, 5)
    assert not L.conv_pool_relu_supported(64, 5) and not L.conv_pool_relu_supported(3, 9)
    x = torch.randn(1, 64, 8, 8)
    w = torch.randn(8, 64, 5, 5) * 0.02
    torch.testing.assert_close(L.conv_pool_relu(x, w, None, 2, backend="cpp"), _ref(x, w, None, (2, 2, 0)))


def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"weight must be \[Cout, Cin=3, K, K\] with K odd"):
        L.conv_pool_relu(x, torch.randn(4, 3, 2, 2), None, 2)
    with pytest.raises(ValueError, match=r"weight must be \[Cout, Cin=3, K, K\]"):
        L.conv_pool_relu(x, torch.randn(4, 2, 3, 3), None, 2)
    with pytest.raises(ValueError, match=r"bias must be None or float32 \[4\]"):
        L.conv_pool_relu(x, torch.randn(4, 3, 3, 3), torch.randn(5), 2)
    with pytest.raises(TypeError, match="weight must be float32"):
        L.conv_pool_relu(x, torch.randn(4, 3, 3, 3).double(), None, 2)
    with pytest.raises(ValueError, match="padding must be at most kernel_size / 2"):
        L.conv_pool_relu(x, torch.randn(4, 3, 3, 3), None, 2, 2, 2)


@needs_cpp
def test_cpp_backward_takes_a_copy_of_the_padded_input():
    """The forward's xp carries slack the kernels read past; a copy of it (as torch's
    functionalization makes) lacks it and is given it again: same gradients, bit for bit."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    y, idx, xp = torch.ops.fsl_fast.conv_pool_relu_fwd(x, w, torch.empty(0), 2, 2, 0)
    gy = torch.randn_like(y)
    want = torch.ops.fsl_fast.conv_pool_relu_bwd(gy, idx, xp, w, True)
    got = torch.ops.fsl_fast.conv_pool_relu_bwd(gy, idx, xp.clone(), w, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_cpp
def test_thread_count_does_not_change_results(seed):
    x, w, b = torch.randn(6, 16, 14, 14), torch.randn(32, 16, 3, 3) * 0.1, torch.randn(32) * 0.1
    g = torch.randn(6, 32, 7, 7)
    old = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append(_grads(lambda *a: L.conv_pool_relu(*a, 2, backend="cpp"), x, w, b, g, True))
    finally:
        torch.set_num_threads(old)
    (y1, g1), (y2, g2) = out
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_rewriter_keeps_keys_and_values(seed):
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 8, 3, padding=1, stride=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten())
    fused = L.fuse_client_layers(net, backend="reference")
    kinds = [type(m).__name__ for m in fused]
    # the strided second conv is not a "same" stride-1 conv: only its ReLU+pool fuse
    assert kinds == ["ConvPoolReLU", "Identity", "Identity", "Conv2d", "Identity", "PoolReLU", "Flatten"]
    assert list(fused.state_dict()) == list(net.state_dict())
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(fused(x), net(x))
    assert fused[0].weight.data_ptr() != net[0].weight.data_ptr()


@needs_cpp
def test_grouped_weights_equal_per_group_calls(seed):
    """G clients in one call (the fused engine's client batching) == G separate calls, exactly:
    every sample sees only its own group's weights, gradients come back per group."""
    G, B = 3, 4
    x = torch.randn(G * B, 16, 14, 14)
    w = torch.randn(G, 32, 16, 3, 3) * 0.1
    b = torch.randn(G, 32) * 0.1
    g = torch.randn(G * B, 32, 7, 7)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
    yg = L.conv_pool_relu_grouped(xg, wg, bg, 2, 2, 0)
    yg.backward(g)
    for k in range(G):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x[k * B:(k + 1) * B], w[k], b[k]))
        ys = L.conv_pool_relu(xs, ws, bs, 2, 2, 0, backend="cpp")
        ys.backward(g[k * B:(k + 1) * B])
        assert torch.equal(yg[k * B:(k + 1) * B].detach(), ys.detach())
        assert torch.equal(xg.grad[k * B:(k + 1) * B], xs.grad)
        assert torch.equal(wg.grad[k], ws.grad) and torch.equal(bg.grad[k], bs.grad)
    with pytest.raises(ValueError, match="G dividing the batch 12"):
        L.conv_pool_relu_grouped(x, torch.randn(5, 32, 16, 3, 3), None, 2, 2, 0)


@needs_cpp
@pytest.mark.parametrize("co1", [16, 20])
@pytest.mark.parametrize("cin", [1, 2])
@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 2, 1)])
def test_channels_last_handoff_is_exact(seed, co1, cin, pool):
    """Block 1 writing channels-last and block 2 reading it (what the rewriter sets up for two
    consecutive conv blocks) gives bit-identical values and gradients to the NCHW hand-off. With
    one input channel, block 1's weight gradient then comes from the channels-last kernel
    (wgrad_cl_c1k3), which must add in the per-channel kernel's order; block 2 hands its input
    gradient back channels-last."""
    pk, ps, pp = pool
    x = torch.randn(3, cin, 12, 12)
    x[0, 0, 0, 0] = -50.0  # a window whose maximum is <= 0 in some channels
    w1, b1 = torch.randn(co1, cin, 3, 3) * 0.3, torch.randn(co1) * 0.1
    w2, b2 = torch.randn(24, co1, 3, 3) * 0.1, torch.randn(24) * 0.1
    ho = (12 + 2 * pp - pk) // ps + 1
    ho = (ho + 2 * pp - pk) // ps + 1
    g = torch.randn(3, 24, ho, ho)
    out = []
    for cl in (False, True):
        ts = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
        h = L.conv_pool_relu(ts[0], ts[1], ts[2], pk, ps, pp, backend="cpp", channels_last_out=cl)
        assert h.is_contiguous(memory_format=torch.channels_last) == cl
        y = L.conv_pool_relu(h, ts[3], ts[4], pk, ps, pp, backend="cpp")
        h.retain_grad()
        y.backward(g)
        out.append([y.detach(), h.grad] + [t.grad for t in ts])
    for a, b in zip(*out):
        assert torch.equal(a, b)


@needs_cpp
@pytest.mark.parametrize("co", [16, 21, 32])
@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 2, 1), (2, 1, 0)])
@pytest.mark.parametrize("groups", [1, 3])
def test_channels_last_backward_op_is_exact(seed, co, pool, groups):
    """The op itself: the forward saves idx in y's layout; the backward from channels-last idx
    and grad_y (the one-channel kernel) equals the backward from NCHW copies bit for bit, and a
    channels-last grad_x request returns the same values in channels-last memory."""
    ops = torch.ops.fsl_fast
    x = torch.randn(6, 1, 11, 12)
    w = torch.randn(groups, co, 1, 3, 3) * 0.5
    b = torch.randn(groups, co) * 0.1
    y, idx, xp = ops.conv_pool_relu_fwd(x, w, b, *pool, True, True)
    y0, idx0, _ = ops.conv_pool_relu_fwd(x, w, b, *pool, False, True)
    assert idx.is_contiguous(memory_format=torch.channels_last) and torch.equal(idx, idx0)
    assert torch.equal(y, y0)
    gy = torch.randn(y.shape).contiguous(memory_format=torch.channels_last)
    gx, gw, gb = ops.conv_pool_relu_bwd(gy, idx, xp, w, True, *pool, True)
    gx0, gw0, gb0 = ops.conv_pool_relu_bwd(gy.contiguous(), idx0, xp, w, True, *pool, False)
    assert torch.equal(gw, gw0) and torch.equal(gb, gb0) and torch.equal(gx, gx0)
    assert gx.is_contiguous(memory_format=torch.channels_last) and gx0.is_contiguous()
    # NCHW grad_y with channels-last idx is converted, same result
    gx1, gw1, gb1 = ops.conv_pool_relu_bwd(gy.contiguous(), idx, xp, w, False, *pool)
    assert torch.equal(gw1, gw0) and torch.equal(gb1, gb0) and gx1.numel() == 0


def test_rewriter_marks_channels_last_between_conv_blocks():
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    fused = L.fuse_client_layers(net)
    assert fused[0].channels_last_out and not fused[3].channels_last_out
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(fused(x), net(x))


@needs_cpp
def test_no_grad_forward_skips_the_saved_argmax(seed):
    x, w, b = torch.randn(2, 3, 10, 10), torch.randn(8, 3, 3, 3), torch.randn(8)
    y_full, idx, _ = torch.ops.fsl_fast.conv_pool_relu_fwd(x, w, b, 2, 2, 0, False, True)
    y_eval, idx_eval, _ = torch.ops.fsl_fast.conv_pool_relu_fwd(x, w, b, 2, 2, 0, False, False)
    assert torch.equal(y_full, y_eval) and idx.numel() == y_full.numel() and idx_eval.numel() == 0
    with torch.no_grad():
        y = L.conv_pool_relu(x, w.requires_grad_(True), b, 2)
    assert y.grad_fn is None and torch.equal(y, y_full)
