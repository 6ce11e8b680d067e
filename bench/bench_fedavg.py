"""FedAvg benchmarks: the authors' per-key state_dict loop vs torch._foreach vs one flat buffer
(torch.mv reference, C++ kernel; CUDA, Triton and a device-to-device copy when a GPU is present).

Cases (float32):
- resnet18: K=10 clients x P=11,181,642 (the parameter shapes of ResNet-18 with a 7x7 stem and
  10 classes; BatchNorm without running statistics so that P is exactly the parameter count);
- simple_conv: K=100 clients x P=107,328 (client part of simple_conv: conv5x5 3->64 and
  conv5x5 64->64 with biases).

Run: ``OMP_NUM_THREADS=1 python -m pytest bench/bench_fedavg.py --benchmark-only -s``
(bench/conftest.py pins one thread; ``-k gpu`` runs only the GPU part, which prints the % of
device-to-device copy bandwidth). Every variant is checked against the authors' loop before it
is timed. ``extra_info`` holds GB/s of the minimal traffic (K*P*4 bytes read + P*4 written) and,
in ``test_ratios``, medians of all CPU variants timed interleaved in one process.
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
from torch import nn

from bench.common import pick
from fsl_fast.flat import FlatClients
from fsl_fast.ops import available
from fsl_fast.ops.fedavg import fedavg

# ---------------------------------------------------------------------------------------------
# Models (only their tensor shapes matter; forward is never called)


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, track_running_stats=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, track_running_stats=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout, track_running_stats=False))


class ResNet18Shapes(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, track_running_stats=False)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_Block(cin, cout, stride), _Block(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)


class SimpleConvClient(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 5)
        self.conv2 = nn.Conv2d(64, 64, 5)


CASES = {  # quick mode: the same models, fewer clients
    "resnet18": (ResNet18Shapes, pick(10, 2), 11_181_642),
    "simple_conv": (SimpleConvClient, pick(100, 10), 107_328),
}


# ---------------------------------------------------------------------------------------------
# The compared implementations


def authors_per_key(models, weights):
    """The authors' aggregation: deepcopy the first model, then a weighted sum per state_dict key
    with ``state_dict()`` taken inside the loops, then load the sums into the copy."""
    aggregated = copy.deepcopy(models[0])
    sums = aggregated.state_dict()
    for key in sums:
        sums[key] = models[0].state_dict()[key] * weights[0]
    for i in range(1, len(models)):
        for key in sums:
            sums[key] += models[i].state_dict()[key] * weights[i]
    aggregated.load_state_dict(sums)
    return aggregated


def authors_per_key_broadcast(models, weights):
    """The authors' full aggregation step: average, then load the average into every client."""
    aggregated = authors_per_key(models, weights)
    state = aggregated.state_dict()
    for m in models:
        m.load_state_dict(state)
    return aggregated


def foreach_average(tensor_lists, weights):
    acc = torch._foreach_mul(tensor_lists[0], weights[0])
    for i in range(1, len(tensor_lists)):
        torch._foreach_add_(acc, tensor_lists[i], alpha=weights[i])
    return acc


# ---------------------------------------------------------------------------------------------
# Fixtures


class Setup:
    def __init__(self, case: str):
        cls, k, p = CASES[case]
        torch.manual_seed(0)
        self.case, self.k = case, k
        base = cls()
        self.models = []
        for _ in range(k):
            m = copy.deepcopy(base)
            with torch.no_grad():
                for t in m.parameters():
                    t.normal_()
            self.models.append(m)
        self.stack = FlatClients(base, num_clients=k)
        assert self.stack.layout.numel == p, f"{case}: P={self.stack.layout.numel}, expected {p}"
        for i, m in enumerate(self.models):
            self.stack.store(i, m)
        self.p = p
        w = torch.rand(k, dtype=torch.float64) + 0.5
        self.weights = (w / w.sum()).tolist()
        self.out = torch.empty(p)
        self.lists = [[t.detach() for t in m.state_dict().values()] for m in self.models]
        # Ground truth: the authors' loop, flattened.
        self.expected = self.stack.layout.flatten(authors_per_key(self.models, self.weights))

    @property
    def min_bytes(self) -> int:
        return (self.k + 1) * self.p * 4


@pytest.fixture(scope="module", params=list(CASES))
def setup(request):
    s = Setup(request.param)
    yield s
    del s


def _gbps(benchmark, nbytes):
    med = benchmark.stats.stats.median
    benchmark.extra_info["median_ms"] = med * 1e3
    benchmark.extra_info["GB/s_min_traffic"] = nbytes / med / 1e9


# ---------------------------------------------------------------------------------------------
# CPU variants (one benchmark each, correctness first)

CPU_VARIANTS = ["per_key_loop", "foreach", "flat_mv", "cpp"]


def _cpu_fn(setup, variant):
    if variant == "per_key_loop":
        return lambda: setup.stack.layout.flatten(authors_per_key(setup.models, setup.weights)), True
    if variant == "foreach":
        return lambda: torch.cat([t.reshape(-1) for t in foreach_average(setup.lists, setup.weights)]), False
    if variant == "flat_mv":
        return lambda: fedavg(setup.stack.buffer, setup.weights, out=setup.out, backend="reference"), False
    if variant == "cpp":
        ok, why = available("cpp", "cpu")
        if not ok:
            pytest.skip(f"cpp backend: {why}")
        return lambda: fedavg(setup.stack.buffer, setup.weights, out=setup.out, backend="cpp"), True
    raise ValueError(variant)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_cpu(benchmark, setup, variant):
    fn, exact = _cpu_fn(setup, variant)
    got = fn().clone()
    if exact:
        assert torch.equal(got, setup.expected), f"{variant} differs from the authors' loop"
    else:
        torch.testing.assert_close(got, setup.expected, rtol=1e-5, atol=1e-5)
    if variant == "per_key_loop":
        benchmark.pedantic(authors_per_key, args=(setup.models, setup.weights), rounds=pick(5, 2), iterations=1)
    elif variant == "foreach":
        benchmark.pedantic(foreach_average, args=(setup.lists, setup.weights), rounds=pick(10, 2), iterations=1)
    else:
        benchmark.pedantic(fn, rounds=pick(15, 3), iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(case=setup.case, K=setup.k, P=setup.p, variant=variant)
    _gbps(benchmark, setup.min_bytes)


def _interleaved(fns: dict, rounds: int) -> dict:
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def test_ratios(benchmark, setup):
    """All CPU variants interleaved in one loop (shared-machine drift hits them alike)."""
    ok, why = available("cpp", "cpu")
    if not ok:
        pytest.skip(f"cpp backend: {why}")
    s = setup
    fns = {
        "per_key_loop": lambda: authors_per_key(s.models, s.weights),
        "foreach": lambda: foreach_average(s.lists, s.weights),
        "flat_mv": lambda: fedavg(s.stack.buffer, s.weights, out=s.out, backend="reference"),
        "cpp": lambda: fedavg(s.stack.buffer, s.weights, out=s.out, backend="cpp"),
    }
    med = _interleaved(fns, rounds=pick(7, 2))
    # Broadcast variants write the average into every client; they overwrite the clients, so
    # they run on copies and are checked afterwards.
    buf_copy = s.stack.buffer.clone()
    models_copy = [copy.deepcopy(m) for m in s.models]
    bfns = {
        "per_key_loop+load_all": lambda: authors_per_key_broadcast(models_copy, s.weights),
        "flat_mv+copy_rows": lambda: fedavg(buf_copy, s.weights, out=s.out, broadcast=True,
                                            backend="reference"),
        "cpp_broadcast": lambda: fedavg(buf_copy, s.weights, out=s.out, broadcast=True, backend="cpp"),
    }
    bmed = _interleaved(bfns, rounds=pick(5, 2))
    assert torch.equal(buf_copy, buf_copy[0].expand_as(buf_copy))
    assert torch.equal(models_copy[-1].conv1.weight, models_copy[0].conv1.weight)
    benchmark.pedantic(fns["cpp"], rounds=5, iterations=1)
    info = {f"{n}_ms": v * 1e3 for n, v in {**med, **bmed}.items()}
    info.update({
        "speedup_cpp_vs_per_key_loop": med["per_key_loop"] / med["cpp"],
        "speedup_cpp_vs_foreach": med["foreach"] / med["cpp"],
        "speedup_cpp_vs_flat_mv": med["flat_mv"] / med["cpp"],
        "speedup_cpp_broadcast_vs_per_key_loop+load_all":
            bmed["per_key_loop+load_all"] / bmed["cpp_broadcast"],
        "speedup_cpp_broadcast_vs_mv+copy": bmed["flat_mv+copy_rows"] / bmed["cpp_broadcast"],
        "cpp_GB/s_min_traffic": s.min_bytes / med["cpp"] / 1e9,
        "flat_mv_GB/s_min_traffic": s.min_bytes / med["flat_mv"] / 1e9,
        "case": s.case, "K": s.k, "P": s.p,
    })
    benchmark.extra_info.update(info)
    print(f"\n[fedavg {s.case} K={s.k} P={s.p}] " +
          ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))


# ---------------------------------------------------------------------------------------------
# GPU variants (skipped with the reason when no GPU)

GPU_VARIANTS = ["cuda", "triton", "reference"]


def _cuda_events_median(fn, iters=20, reps=7):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(reps):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        res.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_gpu(benchmark, setup, variant):
    ok, why = available(variant, "cuda")
    if not ok:
        pytest.skip(f"{variant} backend on cuda: {why}")
    s = setup
    buf = s.stack.buffer.cuda()
    out = torch.empty(s.p, device="cuda")
    fn = lambda: fedavg(buf, s.weights, out=out, backend=variant)  # noqa: E731
    got = fn().cpu()
    if variant == "reference":
        torch.testing.assert_close(got, s.expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, s.expected), f"{variant} on GPU differs from the authors' loop"
    # Copy baseline of the same bytes: read K*P*4 and write K*P*4 (device-to-device).
    src = torch.empty(s.k * s.p, device="cuda")
    dst = torch.empty_like(src)
    t_copy = _cuda_events_median(lambda: dst.copy_(src))
    t_op = _cuda_events_median(fn)
    copy_bw = 2 * src.numel() * 4 / t_copy
    op_bw = s.min_bytes / t_op

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(
        case=s.case, K=s.k, P=s.p, variant=variant, event_median_us=t_op * 1e6,
        **{"GB/s_min_traffic": op_bw / 1e9, "copy_GB/s": copy_bw / 1e9,
           "pct_of_copy_bandwidth": 100 * op_bw / copy_bw})
    print(f"\n[fedavg gpu {s.case} {variant}] {t_op * 1e6:.1f} us, {op_bw / 1e9:.0f} GB/s, "
          f"copy {copy_bw / 1e9:.0f} GB/s, {100 * op_bw / copy_bw:.1f}% of copy")
