"""The flat Adam step (fsl_fast.optim.FlatAdam: op ``adam_step``, C++ kernel csrc/adam.cpp) against
torch's own Adam on the CPU, one thread: is the project's kernel worth keeping?

Cases (float32, every row at the same step count, weight decay 1e-4 as the paper's clients):
- resnet18-server: K=1 x P=10,498,570 (the shared server);
- resnet18-clients: K=10 x P=683,072;
- simple_conv-clients: K=100 x P=107,328.

Variants: ``flat_cpp`` (FlatAdam with the C++ kernel, one pass over the [K, P] rows),
``flat_eager`` (FlatAdam's eager reference), ``torch_fused_rows`` (``torch.optim.Adam(fused=True)``
over K row tensors, what per-client optimizers would do), ``torch_fused_flat`` (fused Adam over the
whole [K, P] as one parameter: possible only when all rows step together) and
``torch_foreach_rows``. Every variant is checked against ``torch.optim.Adam`` (single tensor)
after one step before it is timed; the variants are timed interleaved, ``steps`` steps each, and
``test_adam_ratios`` prints the medians and the ratios to ``flat_cpp``.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from bench.common import pick
from fsl_fast.optim import FlatAdam

CASES = pick({"resnet18-server": (1, 10_498_570), "resnet18-clients": (10, 683_072),
              "simple_conv-clients": (100, 107_328)},
             {"resnet18-server": (1, 400_000), "simple_conv-clients": (8, 20_000)})
STEPS = pick(15, 3)
LR, WD = 1e-3, 1e-4
VARIANTS = ("flat_cpp", "flat_eager", "torch_fused_rows", "torch_fused_flat", "torch_foreach_rows")


def _make(variant, K, P, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(K, P, generator=g)
    grad = torch.randn(K, P, generator=g) * 1e-2
    if variant.startswith("flat_"):
        opt = FlatAdam(p, grad.clone(), lr=LR, weight_decay=WD,
                       backend="cpp" if variant == "flat_cpp" else "reference")
        return p, (lambda: opt.step())
    if variant == "torch_fused_flat":
        prm = torch.nn.Parameter(p)
        prm.grad = grad
        opt = torch.optim.Adam([prm], lr=LR, weight_decay=WD, fused=True)
        return prm.data, opt.step
    rows = [torch.nn.Parameter(p[k].clone()) for k in range(K)]
    for k, r in enumerate(rows):
        r.grad = grad[k].clone()
    kw = {"fused": True} if variant == "torch_fused_rows" else {"foreach": True}
    opt = torch.optim.Adam(rows, lr=LR, weight_decay=WD, **kw)
    return rows, opt.step


def _params(obj):
    return torch.stack([r.data for r in obj]) if isinstance(obj, list) else obj


@pytest.fixture(scope="module")
def timings():
    return {}


@pytest.mark.parametrize("case", list(CASES))
def test_adam_variants(benchmark, case, timings):
    from fsl_fast.ops import available

    K, P = CASES[case]
    if not available("cpp", "cpu")[0]:
        pytest.skip("no C++ extension: the question is about its kernel")
    # correctness: one step of every variant against torch.optim.Adam (single tensor)
    ref, _ = _make("torch_foreach_rows", K, P)
    ref_rows = [torch.nn.Parameter(r.data.clone()) for r in ref]
    g = torch.Generator().manual_seed(0)
    torch.randn(K, P, generator=g)
    grad = torch.randn(K, P, generator=g) * 1e-2
    for k, r in enumerate(ref_rows):
        r.grad = grad[k].clone()
    torch.optim.Adam(ref_rows, lr=LR, weight_decay=WD, foreach=False).step()
    want = torch.stack([r.data for r in ref_rows])
    made = {}
    for v in VARIANTS:
        params, step = _make(v, K, P)
        step()
        torch.testing.assert_close(_params(params), want, rtol=1e-5, atol=1e-6, msg=v)
        made[v] = step
    times = {v: [] for v in VARIANTS}
    for _ in range(STEPS):  # interleaved
        for v in VARIANTS:
            t0 = time.perf_counter()
            made[v]()
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    timings[case] = med
    benchmark.pedantic(made["flat_cpp"], rounds=3, iterations=1)
    benchmark.extra_info.update({f"{v}_ms": med[v] * 1e3 for v in VARIANTS})
    benchmark.extra_info.update({f"{v}_vs_flat_cpp": med[v] / med["flat_cpp"] for v in VARIANTS})


def test_adam_ratios(benchmark, timings):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    if not timings:
        pytest.skip("no case ran")
    print("\n| case | " + " | ".join(f"{v} (ms)" for v in VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for case, med in timings.items():
        cells = [f"{med[v] * 1e3:.2f}" + ("" if v == "flat_cpp" else f" ({med[v] / med['flat_cpp']:.2f}x)")
                 for v in VARIANTS]
        print(f"| {case} | " + " | ".join(cells) + " |")
