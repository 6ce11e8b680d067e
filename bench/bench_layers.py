"""pool_relu / lrn: torch vs the C++ kernels, fwd+bwd, 1 thread (bench/conftest.py pins it).

Run: OMP_NUM_THREADS=1 python -m pytest bench/bench_layers.py --benchmark-only -q
Each test checks correctness, then times C++ and torch alternately in the same process and
records both medians and the speedup (torch / C++) in extra_info.
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import pick
from fsl_fast import models
from fsl_fast import ops as backends
from fsl_fast.ops import layers as L

pytestmark = pytest.mark.skipif(
    not backends.available("cpp", "cpu")[0],
    reason=f"C++ extension unavailable: {backends.extension_error()}")


def _interleaved_ms(fast, slow, rounds, warmup=2):
    # Alternate the two variants round by round so both see the same background load (this
    # machine's 2 cores are shared; medians taken minutes apart differed by 2x).
    for _ in range(warmup):
        fast()
        slow()
    tf, ts = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        fast()
        tf.append(time.perf_counter() - t)
        t = time.perf_counter()
        slow()
        ts.append(time.perf_counter() - t)
    return ((statistics.median(tf) * 1e3, statistics.median(ts) * 1e3),
            (min(tf) * 1e3, min(ts) * 1e3))


def _fwd_bwd(f, x, g):
    def run():
        x.grad = None
        f(x).backward(g)
    return run


def _record(benchmark, fast, slow, rounds, **info):
    # pytest-benchmark's own stats are of the fast variant; the speedup comes from the
    # interleaved medians.
    benchmark.pedantic(fast, rounds=rounds, warmup_rounds=1)
    (t_fast, t_slow), (m_fast, m_slow) = _interleaved_ms(fast, slow, rounds)
    # The minimum is the less load-sensitive number on a shared machine; both are recorded.
    benchmark.extra_info.update(info, torch_ms=round(t_slow, 3), cpp_ms=round(t_fast, 3),
                                speedup=round(t_slow / t_fast, 2), torch_min_ms=round(m_slow, 3),
                                cpp_min_ms=round(m_fast, 3), speedup_min=round(m_slow / m_fast, 2))
    print(f"\n{info}: median torch {t_slow:.2f} ms, cpp {t_fast:.2f} ms, x{t_slow / t_fast:.1f}; "
          f"min torch {m_slow:.2f} ms, cpp {m_fast:.2f} ms, x{m_slow / m_fast:.1f}")


POOL_CASES = pick([((32, 16, 28, 28), 2, 2, 0, 20), ((64, 64, 32, 32), 3, 2, 1, 5),
                   ((64, 64, 16, 16), 3, 2, 1, 10)],
                  [((32, 16, 28, 28), 2, 2, 0, 3), ((16, 64, 16, 16), 3, 2, 1, 3)])


@pytest.mark.parametrize("shape,k,s,p,rounds", POOL_CASES,
                         ids=["%s-k%ds%dp%d" % ("x".join(map(str, c[0])), *c[1:4]) for c in POOL_CASES])
def test_pool_relu_fwd_bwd(benchmark, shape, k, s, p, rounds):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn_like(F.max_pool2d(x.detach(), k, s, p))
    ref = lambda t: F.max_pool2d(F.relu(t), k, s, p)  # noqa: E731 - the models' order
    fast = lambda t: L.pool_relu(t, k, s, p, backend="cpp")  # noqa: E731
    y0, (gx0,) = ref(x), torch.autograd.grad(ref(x), x, g)
    y1, (gx1,) = fast(x), torch.autograd.grad(fast(x), x, g)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    _record(benchmark, _fwd_bwd(fast, x, g), _fwd_bwd(ref, x, g), rounds,
            op="pool_relu", shape=list(shape), kernel=k, stride=s, padding=p, what="fwd+bwd")


LRN_CASES = pick([((64, 64, 32, 32), 3), ((64, 64, 16, 16), 8)], [((16, 64, 16, 16), 3)])


@pytest.mark.parametrize("shape,rounds", LRN_CASES, ids=["x".join(map(str, c[0])) for c in LRN_CASES])
def test_lrn_fwd_bwd(benchmark, shape, rounds):
    torch.manual_seed(0)
    args = (4, 0.001 / 9, 0.75, 1.0)  # simple_conv's LRN
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    ref = nn.LocalResponseNorm(*args)
    fast = lambda t: L.lrn(t, *args, backend="cpp")  # noqa: E731
    y0, (gx0,) = ref(x), torch.autograd.grad(ref(x), x, g)
    y1, (gx1,) = fast(x), torch.autograd.grad(fast(x), x, g)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    _record(benchmark, _fwd_bwd(fast, x, g), _fwd_bwd(ref, x, g), rounds,
            op="lrn", shape=list(shape), what="fwd+bwd")


CLIENTS = pick([("cnn", (1, 28, 28), 32, 20), ("simple_conv", (3, 32, 32), 64, 5)],
               [("cnn", (1, 28, 28), 32, 3), ("simple_conv", (3, 32, 32), 8, 2)])


@pytest.mark.parametrize("name,in_shape,batch,rounds", CLIENTS, ids=[c[0] for c in CLIENTS])
def test_client_fwd_bwd(benchmark, name, in_shape, batch, rounds):
    torch.manual_seed(0)
    orig = models.build_split_model(name, in_shape, 10).client
    fused = L.fuse_client_layers(orig, backend="cpp")
    x = torch.randn((batch,) + in_shape)
    out = orig(x)
    g = torch.randn_like(out)
    torch.testing.assert_close(fused(x), out, rtol=1e-5, atol=1e-6)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x).backward(g)
        return run

    _record(benchmark, step(fused), step(orig), rounds,
            op="client", model=name, batch=batch, what="forward+backward, param grads")
