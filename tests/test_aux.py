"""Fused linear auxiliary head (fsl_fast.ops.aux) against the authors' autograd reference.

Metric: relative Frobenius error ||fast - ref|| / ||ref|| with the reference in float64. fp32
kernels must be within 1e-5, float64 kernels within 1e-11.
"""
import pytest
import torch
import torch.nn.functional as F

from fsl_fast.ops import _backend
from fsl_fast.ops import aux as A

KERNEL_BACKENDS = [("cpp", "cpu")]
if torch.cuda.is_available():
    KERNEL_BACKENDS.append(("cuda", "cuda"))
else:
    print("test_aux: CUDA backend not tested: torch.cuda.is_available() is False")

TOL = {torch.float32: 1e-5, torch.float64: 1e-11}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make(B, C, feat_shape, pool, K=None, dtype=torch.float64, device="cpu"):
    """feat [*(K,) B, *feat_shape], weight [*(K,) C, D], ... (float64 master copies)."""
    lead = (B,) if K is None else (K, B)
    feat = torch.randn(lead + tuple(feat_shape), dtype=torch.float64)
    D = feat_shape[0] if pool else int(torch.tensor(feat_shape).prod())
    wl = () if K is None else (K,)
    weight = torch.randn(wl + (C, D), dtype=torch.float64) / D ** 0.5
    bias = 0.1 * torch.randn(wl + (C,), dtype=torch.float64)
    labels = torch.randint(0, C, lead)
    # Targets of the size real ones have: gradients of a batch mean (1/B).
    target = torch.randn_like(feat) / B
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(feat), cast(weight), cast(bias), labels.to(device), cast(target)


def ref64(feat, weight, bias, labels, target, pool, grad_scale=1.0):
    d = lambda t: t.detach().double().cpu()  # noqa: E731
    g = A.aux_estimate_reference(d(feat), d(weight), d(bias), labels.cpu(), pool, grad_scale)
    out = A.aux_align_reference(d(feat), d(weight), d(bias), labels.cpu(), d(target), pool,
                                grad_scale)
    return g, out


FLAT = [(B, D, C) for B in (1, 3, 37) for D in (5, 129) for C in (2, 10, 100)]


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,D,C", FLAT)
def test_flat_matches_reference(seed, backend, device, dtype, B, D, C):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels compute in float32 only (float64 goes to the reference)")
    feat, w, b, y, t = make(B, C, (D,), False, dtype=dtype, device=device)
    g_ref, (l_ref, dW_ref, db_ref) = ref64(feat, w, b, y, t, False)
    g = A.aux_estimate(feat, w, b, y, backend=backend)
    loss, dW, db = A.aux_align(feat, w, b, y, t, backend=backend)
    assert g.shape == feat.shape and g.dtype == dtype and dW.shape == w.shape and db.shape == b.shape
    errs = {"g": rel(g, g_ref), "loss": rel(loss, l_ref), "dW": rel(dW, dW_ref), "db": rel(db, db_ref)}
    print(f"aux {backend} {dtype} B={B} D={D} C={C}: {errs}")
    assert max(errs.values()) <= TOL[dtype], errs


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pool,shape,B,C", [
    (True, (5, 3, 4), 3, 10),      # pooled: D = Cin = 5 over 12 positions
    (True, (129, 2, 2), 37, 2),    # pooled, odd Cin
    (True, (16, 1, 1), 1, 100),    # pooled over a single position
    (False, (4, 3, 3), 37, 10),    # 4-D input flattened: D = 36
    (False, (3, 43), 3, 100),      # 3-D input flattened: D = 129
])
def test_pooled_and_flattened_match_reference(seed, backend, device, dtype, pool, shape, B, C):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels compute in float32 only (float64 goes to the reference)")
    feat, w, b, y, t = make(B, C, shape, pool, dtype=dtype, device=device)
    g_ref, (l_ref, dW_ref, db_ref) = ref64(feat, w, b, y, t, pool)
    g = A.aux_estimate(feat, w, b, y, pool=pool, backend=backend)
    loss, dW, db = A.aux_align(feat, w, b, y, t, pool=pool, backend=backend)
    errs = {"g": rel(g, g_ref), "loss": rel(loss, l_ref), "dW": rel(dW, dW_ref), "db": rel(db, db_ref)}
    print(f"aux {backend} {dtype} pool={pool} {shape} B={B} C={C}: {errs}")
    assert g.shape == feat.shape
    assert max(errs.values()) <= TOL[dtype], errs


def test_pooled_estimate_is_spread_evenly(seed):
    feat, w, b, y, _ = make(4, 10, (6, 3, 2), True, dtype=torch.float32)
    g = A.aux_estimate(feat, w, b, y, pool=True, backend="cpp")
    # every spatial position of a channel carries the same value
    assert torch.equal(g, g[..., :1, :1].expand_as(g))


def test_reference_matches_closed_form_formulas(seed):
    """The autograd reference against PERF.md's closed form written independently in torch."""
    feat, w, b, y, t = make(37, 10, (129,), False)
    l_ref, dW_ref, db_ref = A.aux_align_reference(feat, w, b, y, t)
    B = feat.shape[0]
    loss, dW, db = A.closed_form_align(feat[None], w[None], b[None], y[None], t[None], 1.0, 1.0 / B)
    assert rel(loss[0], l_ref) < 1e-13 and rel(dW[0], dW_ref) < 1e-13 and rel(db[0], db_ref) < 1e-13


def test_gradients_match_finite_differences(seed):
    """dW/db of the C++ kernel (float64) against central differences of the reference loss."""
    feat, w, b, y, t = make(5, 3, (7,), False)
    _, dW, db = A.aux_align(feat, w, b, y, t, backend="cpp")
    h = 1e-6

    def loss_at(w_, b_):
        return A.aux_align_reference(feat, w_, b_, y, t)[0].item()

    for (c, d) in [(0, 0), (1, 3), (2, 6)]:
        wp, wm = w.clone(), w.clone()
        wp[c, d] += h
        wm[c, d] -= h
        fd = (loss_at(wp, b) - loss_at(wm, b)) / (2 * h)
        assert abs(fd - dW[c, d].item()) <= 1e-6 * max(1.0, abs(fd)), (c, d, fd, dW[c, d].item())
    for c in range(3):
        bp, bm = b.clone(), b.clone()
        bp[c] += h
        bm[c] -= h
        fd = (loss_at(w, bp) - loss_at(w, bm)) / (2 * h)
        assert abs(fd - db[c].item()) <= 1e-6 * max(1.0, abs(fd)), (c, fd, db[c].item())


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [("reference", "cpu")])
@pytest.mark.parametrize("pool,shape", [(False, (129,)), (True, (5, 2, 2))])
def test_batched_equals_separate_calls(seed, backend, device, pool, shape):
    K, B, C = 3, 37, 10
    feat, w, b, y, t = make(B, C, shape, pool, K=K, dtype=torch.float32, device=device)
    g = A.aux_estimate(feat, w, b, y, pool=pool, backend=backend)
    loss, dW, db = A.aux_align(feat, w, b, y, t, pool=pool, backend=backend)
    assert loss.shape == (K,) and dW.shape == w.shape and db.shape == b.shape and g.shape == feat.shape
    for k in range(K):
        gk = A.aux_estimate(feat[k], w[k], b[k], y[k], pool=pool, backend=backend)
        lk, dWk, dbk = A.aux_align(feat[k], w[k], b[k], y[k], t[k], pool=pool, backend=backend)
        # same kernel, same per-client order of operations: identical bits
        assert torch.equal(g[k], gk) and torch.equal(loss[k], lk)
        assert torch.equal(dW[k], dWk) and torch.equal(db[k], dbk)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_grad_scale(seed, backend, device):
    """grad_scale multiplies g_hat (ALGORITHM.md §2: predictions carry 1/N_buf by construction)."""
    feat, w, b, y, t = make(37, 10, (129,), False, dtype=torch.float32, device=device)
    s = 37 / 1000
    g_ref, (l_ref, dW_ref, db_ref) = ref64(feat, w, b, y, t, False, grad_scale=s)
    g = A.aux_estimate(feat, w, b, y, backend=backend, grad_scale=s)
    loss, dW, db = A.aux_align(feat, w, b, y, t, backend=backend, grad_scale=s)
    assert max(rel(g, g_ref), rel(loss, l_ref), rel(dW, dW_ref), rel(db, db_ref)) <= 1e-5
    # the scaled estimate equals the CE-sum gradient divided by the buffer size
    x = feat.detach().double().requires_grad_()
    ce_sum = F.cross_entropy(F.linear(x, w.double(), b.double()), y, reduction="sum")
    (g_sum,) = torch.autograd.grad(ce_sum, x)
    assert rel(g, g_sum / 1000) <= 1e-5


def test_cpp_is_deterministic_across_runs_and_threads(seed):
    feat, w, b, y, t = make(1000, 10, (129,), False, dtype=torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = A.aux_align(feat, w, b, y, t, backend="cpp")
        torch.set_num_threads(2)
        c = A.aux_align(feat, w, b, y, t, backend="cpp")
        d = A.aux_align(feat, w, b, y, t, backend="cpp")
    finally:
        torch.set_num_threads(old)
    for u, v, z in zip(a, c, d):
        assert torch.equal(u, v) and torch.equal(v, z)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_autograd_function_matches_reference(seed, backend, device):
    feat, w0, b0, y, t = make(37, 10, (3, 2, 2), True, dtype=torch.float32, device=device)
    w = w0.clone().requires_grad_()
    b = b0.clone().requires_grad_()
    loss = A.AuxAlign.apply(w, b, feat, y, t, True, 1.0, backend)
    (3.0 * loss).backward()  # a non-unit upstream gradient scales the result
    _, (l_ref, dW_ref, db_ref) = ref64(feat, w0, b0, y, t, True)
    assert rel(loss, l_ref) <= 1e-5
    assert rel(w.grad, 3 * dW_ref) <= 1e-5 and rel(b.grad, 3 * db_ref) <= 1e-5
    # batched: each client's loss backpropagates into its own slice
    fK, wK0, bK0, yK, tK = make(37, 10, (129,), False, K=2, dtype=torch.float32, device=device)
    wK = wK0.clone().requires_grad_()
    bK = bK0.clone().requires_grad_()
    lK = A.AuxAlign.apply(wK, bK, fK, yK, tK, False, 1.0, backend)
    (lK * torch.tensor([1.0, 2.0], device=device)).sum().backward()
    for k, s in ((0, 1.0), (1, 2.0)):
        _, (_, dWr, dbr) = ref64(fK[k], wK0[k], bK0[k], yK[k], tK[k], False)
        assert rel(wK.grad[k], s * dWr) <= 1e-5 and rel(bK.grad[k], s * dbr) <= 1e-5


def test_align_step_grads_drives_an_optimizer_like_the_reference(seed):
    """One Adam step from align_step_grads equals the authors' autograd step."""
    B, D, C = 37, 129, 10
    feat, _, _, y, t = make(B, C, (D,), False, dtype=torch.float32)
    ref_head = torch.nn.Linear(D, C)
    fast_head = torch.nn.Linear(D, C)
    fast_head.load_state_dict(ref_head.state_dict())
    opt_ref = torch.optim.Adam(ref_head.parameters(), lr=1e-3)
    opt_fast = torch.optim.Adam(fast_head.parameters(), lr=1e-3)
    for _ in range(2):
        opt_ref.zero_grad()
        z = feat.clone().requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(ref_head(z), y), z, create_graph=True)
        ref_loss = F.mse_loss(g, t, reduction="sum")
        ref_loss.backward()
        opt_ref.step()
        opt_fast.zero_grad()
        loss = A.align_step_grads(fast_head, feat, y, t)
        opt_fast.step()
        assert rel(loss, ref_loss) <= 1e-5
    assert rel(fast_head.weight, ref_head.weight) <= 1e-5 and rel(fast_head.bias, ref_head.bias) <= 1e-5


def test_auto_dispatch_and_dtypes(seed):
    feat, w, b, y, t = make(3, 10, (5,), False, dtype=torch.float32)
    assert _backend.resolve("aux_align", "cpu")[0] == "cpp"
    # float16 has no kernel: auto dispatch falls back to the reference, explicit cpp fails loudly
    h = [v.half() for v in (feat, w, b, t)]
    loss, dW, db = A.aux_align(h[0], h[1], h[2], y, h[3])
    assert dW.dtype == torch.float16
    with pytest.raises(_backend.BackendUnavailable, match="float16"):
        A.aux_align(h[0], h[1], h[2], y, h[3], backend="cpp")


@pytest.mark.parametrize("bad,match", [
    (lambda f, w, b, y, t: (f, w, b, y.clamp(max=0) + 10, t), r"labels must lie in \[0, 10\)"),
    (lambda f, w, b, y, t: (f, w, b, y.clamp(max=0) - 1, t), r"labels must lie in \[0, 10\)"),
    (lambda f, w, b, y, t: (f, w[:, :-1], b, y, t), "expects D=4"),
    (lambda f, w, b, y, t: (f, w, b[:-1], y, t), r"bias must be \[10\]"),
    (lambda f, w, b, y, t: (f, w, b, y[:-1], t), r"labels must be \[3\]"),
    (lambda f, w, b, y, t: (f, w.double(), b, y, t), "weight dtype torch.float64"),
    (lambda f, w, b, y, t: (f, w, b, y.float(), t), "labels must be an integer tensor"),
    (lambda f, w, b, y, t: (f, w, b, y, t[:, :-1]), "target must have feat's shape"),
])
def test_bad_inputs_fail_clearly(seed, bad, match):
    args = make(3, 10, (5,), False, dtype=torch.float32)
    f, w, b, y, t = bad(*args)
    with pytest.raises((ValueError, TypeError), match=match):
        A.aux_align(f, w, b, y, t, backend="cpp")


def test_cpp_op_checks_its_own_inputs(seed):
    """The registered torch op validates too (it is public under torch.ops.fsl_fast)."""
    _backend.extension()
    x = torch.randn(1, 3, 5)
    with pytest.raises(RuntimeError, match="labels must lie in"):
        torch.ops.fsl_fast.aux_align(x, torch.randn(1, 4, 5), torch.zeros(1, 4),
                                     torch.tensor([[0, 1, 4]]), torch.randn(1, 3, 5), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.fsl_fast.aux_estimate(x, torch.randn(1, 4, 6), torch.zeros(1, 4),
                                        torch.tensor([[0, 1, 2]]), 1.0, 1.0)


def test_large_shape_fp32(seed):
    feat, w, b, y, t = make(256, 10, (2048,), False, dtype=torch.float32)
    g_ref, (l_ref, dW_ref, db_ref) = ref64(feat, w, b, y, t, False)
    g = A.aux_estimate(feat, w, b, y, backend="cpp")
    loss, dW, db = A.aux_align(feat, w, b, y, t, backend="cpp")
    assert max(rel(g, g_ref), rel(loss, l_ref), rel(dW, dW_ref), rel(db, db_ref)) <= 1e-5


def test_ops_pass_opcheck(seed):
    """Schema and fake-tensor (meta) kernels of the registered ops agree with the CPU kernels."""
    _backend.extension()
    x = torch.randn(2, 5, 7)
    w = torch.randn(2, 3, 7)
    b = torch.randn(2, 3)
    y = torch.randint(0, 3, (2, 5))
    t = torch.randn(2, 5, 7)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fsl_fast.aux_estimate.default, (x, w, b, y, 1.0, 0.2),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.fsl_fast.aux_align.default, (x, w, b, y, t, 1.0, 0.2),
                          test_utils=utils)


@pytest.mark.parametrize("pool,shape", [(False, (7,)), (True, (3, 2, 2))])
def test_auxalign_passes_gradcheck(seed, pool, shape):
    """torch.autograd.gradcheck (float64) of AuxAlign's closed-form backward (C++ kernel)."""
    feat, w, b, y, t = make(5, 4, shape, pool)
    w.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda W, Bias: A.AuxAlign.apply(W, Bias, feat, y, t, pool, 1.0, "cpp"), (w, b))
