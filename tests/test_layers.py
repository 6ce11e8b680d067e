"""pool_relu and lrn: C++ kernels against torch (forward and backward), and the model rewriter.

Pool values and pool gradients must be bit-equal to torch (a max selects, it does not round; the
gradient is one grad_y value, or a sum of them in the same order for overlapping windows).
LRN is compared in fp32 with rtol 1e-5: sqrt-based s^-0.75 differs from torch's pow by a few ulp.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsl_fast import models
from fsl_fast.ops import _backend
from fsl_fast.ops import layers as L

HAS_CPP = _backend.available("cpp", "cpu")[0]
needs_cpp = pytest.mark.skipif(
    not HAS_CPP, reason=f"C++ extension unavailable: {_backend.extension_error()}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pool_ref(x, k, s, p):
    # the models' order: ReLU first, then max-pool
    return F.max_pool2d(F.relu(x), k, s, p)


def _fwd_bwd(fn, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, g)
    return y.detach(), gx


def _pool_cfg_for(shape, cfg):
    k, s, p = cfg
    if shape[2] + 2 * p < k or shape[3] + 2 * p < k:
        pytest.skip(f"shape {shape} smaller than kernel {k} with padding {p}: torch rejects it too")
    return k, s, p


POOL_CFGS = [(2, 2, 0), (3, 2, 1), (3, 2, 0), (2, 2, 1), (3, 3, 1), (1, 1, 0), (4, 3, 2), (3, 1, 1)]
POOL_SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 3, 8, 8), (2, 4, 28, 28), (1, 2, 15, 17),
               (2, 3, 33, 31), (1, 1, 2, 40)]


@needs_cpp
@pytest.mark.parametrize("cfg", POOL_CFGS, ids=lambda c: "k%ds%dp%d" % c)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pool_relu_matches_torch(seed, shape, cfg):
    k, s, p = _pool_cfg_for(shape, cfg)
    x = torch.randn(shape)
    y0 = _pool_ref(x, k, s, p)
    g = torch.randn_like(y0)
    y_ref, gx_ref = _fwd_bwd(lambda t: _pool_ref(t, k, s, p), x, g)
    y, gx = _fwd_bwd(lambda t: L.pool_relu(t, k, s, p, backend="cpp"), x, g)
    assert y.shape == y_ref.shape
    assert torch.equal(y, y_ref), f"pool_relu cpp fwd {shape} k{k}s{s}p{p}"
    assert torch.equal(gx, gx_ref), f"pool_relu cpp bwd {shape} k{k}s{s}p{p}: " \
                                    f"max diff {(gx - gx_ref).abs().max().item()}"


# The C++ forward has three paths: even H, W with k2s2p0 / k3s2p1 (many planes per flat loop),
# other stride-2 k2/k3 (per plane), anything else (general scan). Shapes below hit all three.
TIE_SHAPES = [(3, 4, 13, 12), (3, 4, 12, 14), (2, 3, 16, 16)]


@needs_cpp
@pytest.mark.parametrize("cfg", [(2, 2, 0), (3, 2, 1), (3, 3, 0), (2, 2, 1)],
                         ids=lambda c: "k%ds%dp%d" % c)
@pytest.mark.parametrize("shape", TIE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pool_relu_ties_and_negative_windows(seed, cfg, shape):
    k, s, p = cfg
    # integers in [-2, 2]: many ties among positive maxima, zeros, and all-negative windows
    x = torch.randint(-2, 3, shape).float()
    x[0, 0] = -1.0  # a whole plane of negatives: y = 0, zero gradient
    x[0, 1] = 2.0  # a whole plane of ties
    g = torch.randn_like(_pool_ref(x, k, s, p))
    y_ref, gx_ref = _fwd_bwd(lambda t: _pool_ref(t, k, s, p), x, g)
    y, gx = _fwd_bwd(lambda t: L.pool_relu(t, k, s, p, backend="cpp"), x, g)
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref), "tie-breaking differs from torch's first-max rule"
    assert gx[0, 0].abs().sum() == 0
    # the ties plane: with non-overlapping windows each window routes to its first cell
    assert (gx[0, 1] != 0).sum() <= y_ref[0, 1].numel()


BF16_SHAPES = [(3, 5, 7, 9), (2, 3, 8, 8), (3, 37, 28, 28), (2, 3, 33, 31), (4, 64, 16, 16)]


@needs_cpp
@pytest.mark.parametrize("cfg", POOL_CFGS, ids=lambda c: "k%ds%dp%d" % c)
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pool_relu_bf16_equals_fp32_on_the_widened_input(seed, shape, cfg):
    # bf16 in, bf16 out: the same maxima and argmax as the fp32 kernel on the (exactly) widened
    # input, with ties and all-negative planes; the gradient is the fp32 kernel's gradient of the
    # widened grad_y rounded once to bf16 (overlapping windows sum in fp32 first)
    k, s, p = _pool_cfg_for(shape, cfg)
    x = torch.randn(shape).bfloat16()
    x[0, 0] = -1.0
    x[0, 1] = torch.randint(-2, 3, x[0, 1].shape).bfloat16()
    g = torch.randn(_pool_ref(x.float(), k, s, p).shape).bfloat16()
    y32, gx32 = _fwd_bwd(lambda t: L.pool_relu(t, k, s, p, backend="cpp"), x.float(), g.float())
    y, gx = _fwd_bwd(lambda t: L.pool_relu(t, k, s, p, backend="cpp"), x, g)
    assert y.dtype == gx.dtype == torch.bfloat16
    assert torch.equal(y.float(), y32), f"pool_relu bf16 fwd {shape} k{k}s{s}p{p}"
    assert torch.equal(gx, gx32.bfloat16()), f"pool_relu bf16 bwd {shape} k{k}s{s}p{p}"
    assert torch.equal(y, _pool_ref(x, k, s, p))  # torch's own bf16 pool picks the same values


@needs_cpp
@pytest.mark.parametrize("cfg", [(2, 2, 0), (3, 2, 1)], ids=lambda c: "k%ds%dp%d" % c)
def test_pool_relu_many_planes(seed, cfg):
    # more planes than one flat group (16K vertical maxima: 41 planes of 28x28), ragged last group
    k, s, p = cfg
    x = torch.randn(3, 37, 28, 28)
    g = torch.randn_like(_pool_ref(x, k, s, p))
    y_ref, gx_ref = _fwd_bwd(lambda t: _pool_ref(t, k, s, p), x, g)
    y, gx = _fwd_bwd(lambda t: L.pool_relu(t, k, s, p, backend="cpp"), x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


@needs_cpp
def test_pool_relu_equals_relu_after_pool(seed):
    # the argument that lets the op replace "ReLU then MaxPool": relu(maxpool(x)) == maxpool(relu(x))
    x = torch.randn(2, 3, 11, 10)
    g = torch.randn_like(F.max_pool2d(x, 3, 2, 1))
    y_a, gx_a = _fwd_bwd(lambda t: F.relu(F.max_pool2d(t, 3, 2, 1)), x, g)
    y_b, gx_b = _fwd_bwd(lambda t: _pool_ref(t, 3, 2, 1), x, g)
    y_c, gx_c = _fwd_bwd(lambda t: L.pool_relu(t, 3, 2, 1, backend="cpp"), x, g)
    assert torch.equal(y_a, y_b) and torch.equal(y_b, y_c)
    assert torch.equal(gx_a, gx_b) and torch.equal(gx_b, gx_c)


@needs_cpp
@pytest.mark.parametrize("cfg", [(2, 2, 0), (3, 2, 1), (3, 3, 0)], ids=lambda c: "k%ds%dp%d" % c)
@pytest.mark.parametrize("shape", [(1, 2, 9, 8), (1, 2, 10, 8)], ids=lambda s: "x".join(map(str, s)))
def test_pool_relu_nan_propagates_like_torch(seed, cfg, shape):
    k, s, p = cfg
    x = torch.randn(shape)
    x[0, 0, 3, 4] = float("nan")
    y_ref = _pool_ref(x, k, s, p)
    y = L.pool_relu(x, k, s, p, backend="cpp")
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y).any()
    m = ~torch.isnan(y_ref)
    assert torch.equal(y[m], y_ref[m])


@needs_cpp
def test_pool_relu_non_contiguous_input(seed):
    x = torch.randn(2, 9, 10, 3).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
    assert not x.is_contiguous()
    g = torch.randn(2, 3, 5, 5)
    y_ref, gx_ref = _fwd_bwd(lambda t: _pool_ref(t, 3, 2, 1), x, g)
    y, gx = _fwd_bwd(lambda t: L.pool_relu(t, 3, 2, 1, backend="cpp"), x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


LRN_PARAMS = [
    (0.001 / 9, 0.75, 1.0),  # simple_conv's
    (1e-4, 0.75, 2.0),  # AlexNet's
    (0.5, 0.5, 1.0),
    (0.3, 1.0, 0.5),
    (0.2, 0.6, 1.5),  # a general beta: the scalar powf path
]


@needs_cpp
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("params", LRN_PARAMS, ids=lambda p: "a%g-b%g-k%g" % p)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 9), (2, 8, 17, 19)],
                         ids=lambda s: "x".join(map(str, s)))
def test_lrn_matches_torch(seed, shape, size, params):
    alpha, beta, k = params
    x = torch.randn(shape) * 2
    g = torch.randn(shape)
    ref = nn.LocalResponseNorm(size, alpha, beta, k)
    y_ref, gx_ref = _fwd_bwd(ref, x, g)
    y, gx = _fwd_bwd(lambda t: L.lrn(t, size, alpha, beta, k, backend="cpp"), x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"lrn cpp fwd {shape} n={size} {params}: {m}")
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"lrn cpp bwd {shape} n={size} {params}: {m}")


@needs_cpp
def test_lrn_many_channels_and_blocks(seed):
    # C > window and H*W > one 256-pixel block, with a ragged last block; the models' parameters
    x = torch.randn(2, 64, 19, 21)
    g = torch.randn_like(x)
    ref = nn.LocalResponseNorm(4, alpha=0.001 / 9, beta=0.75, k=1.0)
    y_ref, gx_ref = _fwd_bwd(ref, x, g)
    y, gx = _fwd_bwd(L.LRN(4, alpha=0.001 / 9, beta=0.75, k=1.0, backend="cpp"), x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_double_backward_is_refused(seed):
    # the C++ backward is not itself differentiable: asking for it must fail, not give zeros
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    for f in (lambda t: L.pool_relu(t, 2, 2, 0, backend="cpp"),
              lambda t: L.lrn(t, 3, 0.1, 0.75, 1.0, backend="cpp")):
        (gx,) = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
        assert gx.requires_grad
        with pytest.raises(RuntimeError, match="once_differentiable"):
            gx.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_matches_torch(seed, device):
    # On CUDA tensors (or with backend="reference") torch's own kernels run.
    x = torch.randn(2, 6, 9, 9, device=device)
    assert torch.equal(L.pool_relu(x, 3, 2, 1, backend="reference"), _pool_ref(x, 3, 2, 1))
    assert torch.equal(L.lrn(x, 3, 0.1, 0.75, 1.0, backend="reference"),
                       F.local_response_norm(x, 3, 0.1, 0.75, 1.0))
    if device == "cuda":
        name, _ = _backend.resolve("pool_relu", x.device, None)
        assert name == "reference"


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"pool_relu: x must be float32 or bfloat16, got torch.float64"):
        L.pool_relu(x.double(), 2, 2, 0)
    with pytest.raises(ValueError, match=r"pool_relu: x must be 4-D .*got shape \(3, 8, 8\)"):
        L.pool_relu(x[0], 2, 2, 0)
    with pytest.raises(ValueError, match=r"padding must be at most kernel_size / 2"):
        L.pool_relu(x, 2, 2, 2)
    with pytest.raises(ValueError, match=r"smaller than kernel_size 9"):
        L.pool_relu(x, 9, 1, 0)
    with pytest.raises(ValueError, match=r"lrn: size must be an integer >= 1"):
        L.lrn(x, 0)
    with pytest.raises(TypeError, match=r"lrn: x must be float32, got torch.float16"):
        L.lrn(x.half(), 3)


@needs_cpp
def test_cpp_op_checks_its_own_inputs():
    # the C++ boundary rejects what the Python layer would have caught, with a clear message
    ops = (_backend.extension(), torch.ops.fsl_fast)[1]
    with pytest.raises(RuntimeError, match=r"pool_relu: x must be float32"):
        ops.pool_relu_fwd(torch.zeros(1, 1, 4, 4, dtype=torch.float64), 2, 2, 0)
    with pytest.raises(RuntimeError, match=r"lrn: x must be contiguous NCHW"):
        ops.lrn_fwd(torch.zeros(1, 4, 4, 3).permute(0, 3, 1, 2), 3, 1.0, 0.75, 1.0)


# ---------------------------------------------------------------------------------------------
# fuse_client_layers on the real client models


def _client(name, in_shape):
    return models.build_split_model(name, in_shape, 10).client


@needs_cpp
@pytest.mark.parametrize("name,in_shape,batch",
                         [("cnn", (1, 28, 28), 4), ("simple_conv", (3, 32, 32), 3),
                          ("simple_conv", (3, 28, 28), 2), ("resnet18", (3, 32, 32), 2)])
def test_fused_client_same_outputs_and_grads(seed, name, in_shape, batch):
    orig = _client(name, in_shape)
    fused = L.fuse_client_layers(orig)
    kinds = [type(m).__name__ for m in fused.modules()]
    if name == "simple_conv":
        # conv-ReLU-pool becomes ConvPoolReLU; in conv-ReLU-LRN-pool the conv and ReLU stay and
        # the pool becomes PoolReLU
        assert kinds.count("ConvPoolReLU") == 1 and kinds.count("Conv2d") == 1
        assert kinds.count("PoolReLU") == 1 and kinds.count("MaxPool2d") == 0
        assert kinds.count("ReLU") == 1
        assert kinds.count("LRN") == 2 and "LocalResponseNorm" not in kinds
    elif name == "cnn":
        assert kinds.count("ConvPoolReLU") == 2 and "Conv2d" not in kinds
        assert "ReLU" not in kinds and "MaxPool2d" not in kinds
    else:  # resnet18: the stem's relu + maxpool; the blocks' ReLUs are not in a Sequential pair
        assert kinds.count("PoolReLU") == 1 and "MaxPool2d" not in kinds
    x = torch.randn((batch,) + in_shape)
    out_o = orig(x)
    out_f = fused(x)
    torch.testing.assert_close(out_f, out_o, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out_o)
    grads_o = torch.autograd.grad(out_o, list(orig.parameters()), g)
    grads_f = torch.autograd.grad(out_f, list(fused.parameters()), g)
    # Weight gradients are long fp32 sums with cancellation, so a few-ulp LRN difference can show
    # as 1e-3 relative on small entries. Judge both fp32 runs against float64 (flash-attention's
    # rule): the fused error may be at most 2x torch's own fp32 error, plus 1e-6 of the scale.
    orig64 = copy.deepcopy(orig).double()
    out64 = orig64(x.double())
    grads64 = torch.autograd.grad(out64, list(orig64.parameters()), g.double())
    names = [n for n, _ in orig.named_parameters()]
    for n, a, b, r in zip(names, grads_f, grads_o, grads64):
        err_f = (a.double() - r).abs().max().item()
        err_o = (b.double() - r).abs().max().item()
        bound = 2 * err_o + 1e-6 * r.abs().max().item()
        print(f"{name} grad {n}: fused err {err_f:.3g}, torch fp32 err {err_o:.3g}")
        assert err_f <= bound, f"{name} grad {n}: fused err {err_f:.3g} > bound {bound:.3g}"
        if name == "resnet18":  # only the stem's pool is fused there: bit-equal
            assert torch.equal(a, b), f"resnet18 grad {n}"


@needs_cpp
def test_fuse_copies_and_keeps_state_dict_keys(seed):
    orig = _client("simple_conv", (3, 32, 32))
    fused = L.fuse_client_layers(orig)
    assert list(fused.state_dict()) == list(orig.state_dict())
    for (n, p), (_, q) in zip(orig.named_parameters(), fused.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    # nothing shared: training the copy leaves the original alone
    before = {n: p.clone() for n, p in orig.named_parameters()}
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(1.0)
    for n, p in orig.named_parameters():
        assert torch.equal(p, before[n]), n
    # state dicts load both ways
    orig.load_state_dict(fused.state_dict())
    for n, p in orig.named_parameters():
        assert torch.equal(p, before[n] + 1.0), n
    fresh = L.fuse_client_layers(_client("simple_conv", (3, 32, 32)))
    fresh.load_state_dict(orig.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), orig(x), rtol=1e-5, atol=1e-6)


@needs_cpp
def test_relu_lrn_pool_rule_is_exact(seed):
    # The rewriter's ReLU, LRN, MaxPool -> ReLU, LRN, PoolReLU rule: bit-equal values and input
    # gradients, including windows that are all zero after the ReLU (inputs mostly negative).
    x = torch.randn(2, 6, 12, 12) - 1.5
    torch_lrn = nn.LocalResponseNorm(4, alpha=0.001 / 9, beta=0.75, k=1.0)
    orig = nn.Sequential(nn.ReLU(), torch_lrn, nn.MaxPool2d(3, 2, 1))
    fused = nn.Sequential(nn.ReLU(), torch_lrn, L.PoolReLU(3, 2, 1, backend="cpp"))
    y0 = orig(x)
    assert (y0 == 0).any() and (y0 > 0).any()
    g = torch.randn_like(y0)
    y_a, gx_a = _fwd_bwd(orig, x, g)
    y_b, gx_b = _fwd_bwd(fused, x, g)
    assert torch.equal(y_a, y_b) and torch.equal(gx_a, gx_b)


def test_fuse_nested_and_unfusable():
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    model = nn.Sequential(inner, nn.ReLU(), nn.MaxPool2d((2, 3)), nn.ReLU(),
                          nn.MaxPool2d(2, ceil_mode=True), nn.LocalResponseNorm(3))
    model.append(nn.ReLU())
    model.append(nn.LocalResponseNorm(2))
    model.append(nn.MaxPool2d(3, 2, 1))
    fused = L.fuse_client_layers(model, backend="reference")
    assert [type(m).__name__ for m in fused[6:]] == ["ReLU", "LRN", "PoolReLU"]
    assert isinstance(fused[0][1], nn.Identity) and isinstance(fused[0][2], L.PoolReLU)
    assert isinstance(fused[2], nn.MaxPool2d)  # non-square window stays torch's
    assert isinstance(fused[4], nn.MaxPool2d)  # ceil_mode stays torch's
    assert isinstance(fused[5], L.LRN) and fused[5].size == 3
    assert isinstance(model[0][1], nn.ReLU)  # the input is untouched
    x = torch.randn(1, 3, 30, 30)
    torch.testing.assert_close(fused(x), model(x))
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        L.fuse_client_layers("cnn")


@needs_cpp
def test_two_threads_same_results(seed):
    # at::parallel_for chunking (flat pool groups, LRN pixel blocks) must not change results
    x = torch.randn(3, 50, 16, 16)
    g = torch.randn(3, 50, 8, 8)
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            yp, gp = _fwd_bwd(lambda t: L.pool_relu(t, 3, 2, 1, backend="cpp"), x, g)
            yl, gl = _fwd_bwd(lambda t: L.lrn(t, 4, 0.01, 0.75, 1.0, backend="cpp"), x, x)
            outs.append((yp, gp, yl, gl))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
