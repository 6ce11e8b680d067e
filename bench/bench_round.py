"""Seconds per training round, reference engine vs fused engine, one thread.

Cases (10 clients each): the embedded default (mnist5k, cnn), simple_conv and resnet18 (layer3
auxiliary) on 32x32 data (the bundled synthetic 3x32x32 set: 64 samples per client, batch 32,
so two local iterations per client). Timed rounds are ordinary rounds (no alignment); the
alignment round is timed separately. Both engines run interleaved in one process; the ratio
reference/fused is in extra_info and printed, with where the fused round spends its time.

Quick mode (``FSL_FAST_BENCH_QUICK=1``): the same cases and checks with one timed round per engine,
four clients on the 32x32 sets and two alignment epochs in the warm-up round.

Peak memory (RSS of a fresh process running one round) for 10 and 100 clients:
``python -m bench.bench_round --memory``.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time

import pytest

from bench.common import QUICK, pick
from fsl_fast.config import Config
from fsl_fast.runner import Run

CASES = {
    "mnist5k-cnn": dict(dataset="mnist5k"),
    "simple_conv-32x32": dict(dataset="synthetic:3x32x32", model="simple_conv", batch_size=32),
    "resnet18-32x32": dict(dataset="synthetic:3x32x32", model="resnet18", aux="layer3", batch_size=32),
}


def _cfg(case, algorithm="fsl_sage", **kw):
    base = dict(algorithm=algorithm, clients=10, schedule="parallel", threads=1, align_interval=1000,
                seed=0)
    if QUICK:  # round 0 (warm-up) aligns: keep it short; fewer clients on the slow 32x32 cases
        base.update(align_epochs=2, clients=10 if case == "mnist5k-cnn" else 4)
    base.update(CASES[case])
    base.update(kw)
    return Config(**base).resolved()


def _phases(run):
    return {k[8:]: round(v, 4) for k, v in run.metrics[-1].items() if k.startswith("seconds_")}


def _interleaved(cfg, reps):
    ref, fused = Run(cfg), Run(dataclasses.replace(cfg, fused=True))
    ref.step()  # round 0 (alignment round for fsl_sage): warm-up
    fused.step()
    # correctness before speed, on round 0 (later rounds drift apart chaotically on the small
    # synthetic sets; tests/test_fused_parity.py bounds the drift properly)
    # (resnet18: BatchNorm and Adam amplify last-bit differences, e.g. the fused Adam step's
    # rounding, into ~1e-3 of the loss within round 0's alignment; the elementwise parity tests in
    # tests/test_fused_parity.py are the correctness gate, this is a smoke check)
    a, b = ref.metrics[0], fused.metrics[0]
    assert a["comm_bytes"] == b["comm_bytes"]
    tol = 5e-3 if cfg.model == "resnet18" else 1e-3
    assert abs(a["test_loss"] - b["test_loss"]) <= tol * a["test_loss"], (a["test_loss"], b["test_loss"])
    tr, tf = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        ref.step()
        tr.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fused.step()
        tf.append(time.perf_counter() - t0)
    return ref, fused, statistics.median(tr), statistics.median(tf)


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2", "fedavg"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_seconds(benchmark, case, algorithm):
    if case == "resnet18-32x32" and algorithm != "fsl_sage":
        pytest.skip("resnet18 timed for fsl_sage only (keeps the suite short)")
    cfg = _cfg(case, algorithm)
    reps = pick(2 if case != "mnist5k-cnn" else 5, 1)
    ref, fused, t_ref, t_fused = _interleaved(cfg, reps)
    benchmark.pedantic(fused.step, rounds=1, iterations=1)
    ratio = t_ref / t_fused
    benchmark.extra_info.update(reference_s=t_ref, fused_s=t_fused, speedup=ratio,
                                fused_phases=_phases(fused), reference_phases=_phases(ref))
    print(f"\n[{case} {algorithm}] reference {t_ref:.3f} s/round, fused {t_fused:.3f} s/round, "
          f"speedup {ratio:.2f}x\n  reference phases {_phases(ref)}\n  fused phases     {_phases(fused)}")


@pytest.mark.parametrize("case", ["mnist5k-cnn", "resnet18-32x32"])
def test_alignment_round_seconds(benchmark, case):
    """Round 0 of fsl_sage aligns every client's auxiliary (100 epochs on its buffer)."""
    cfg = _cfg(case, align_interval=1, align_epochs=pick(100 if case == "mnist5k-cnn" else 5, 2))
    out = {}
    for fused in (False, True):
        run = Run(dataclasses.replace(cfg, fused=fused))
        run.step()  # fills the buffers (round 0 aligns on its first upload)
        t0 = time.perf_counter()
        run.step()
        out[fused] = (time.perf_counter() - t0, _phases(run))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(reference_s=out[False][0], fused_s=out[True][0],
                                speedup=out[False][0] / out[True][0],
                                reference_align_s=out[False][1].get("align"), fused_align_s=out[True][1].get("align"))
    print(f"\n[{case} alignment round] reference {out[False][0]:.3f} s (align {out[False][1].get('align')}), "
          f"fused {out[True][0]:.3f} s (align {out[True][1].get('align')}), "
          f"speedup {out[False][0] / out[True][0]:.2f}x")


_MEM = """
import json, resource, sys, torch
from fsl_fast.config import Config
from fsl_fast.runner import Run
cfg = Config(**json.loads(sys.argv[1])).resolved()
run = Run(cfg); run.step(); run.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_memory_table():
    """Peak RSS of a fresh process running two fsl_sage rounds: the reference engine (fp32) and
    the fused engine in fp32 and bf16, 10 and 100 clients."""
    rows = []
    for case in ("mnist5k-cnn", "resnet18-32x32"):
        for clients in (10, 100):
            for fused, prec in ((False, "fp32"), (True, "fp32"), (True, "bf16")):
                kw = dict(CASES[case], algorithm="fsl_sage", clients=clients, fused=fused, threads=1,
                          align_epochs=2, schedule="parallel", precision=prec)
                if case != "mnist5k-cnn":
                    kw["dataset"] = "synthetic:3x32x32"
                    if clients == 100:
                        kw["batch_size"] = 6
                mb = float(subprocess.check_output([sys.executable, "-c", _MEM, json.dumps(kw)], text=True))
                engine = "fused" if fused else "reference"
                rows.append((case, clients, engine, prec, mb))
                print(f"| {case} | {clients} | {engine} | {prec} | {mb:.0f} |", flush=True)
    return rows


if __name__ == "__main__":
    if "--memory" in sys.argv:
        print("| case | clients | engine | precision | peak RSS (MiB) |\n|---|---|---|---|---|")
        peak_memory_table()


PRECISION_CASES = {  # --precision: the fp32 reference engine vs the fused engine in fp32 and bf16
    "resnet18-32x32-b64": dict(dataset="synthetic:3x32x32", model="resnet18", aux="layer3", batch_size=64),
    "simple_conv-32x32": dict(dataset="synthetic:3x32x32", model="simple_conv", batch_size=32),
    "mnist5k-cnn": dict(dataset="mnist5k"),
}


@pytest.mark.parametrize("case", list(PRECISION_CASES))
def test_round_seconds_fp32_vs_bf16(benchmark, case):
    """Ordinary fsl_sage rounds: reference (fp32), fused fp32, fused bf16, interleaved; seconds
    per round, speedups over the reference and training images per second. The embedded cnn runs
    on the fused engine's fp32 C++ kernels in either precision (README: what bf16 changes)."""
    import torch

    kw = dict(algorithm="fsl_sage", clients=pick(10 if case == "mnist5k-cnn" else 4, 4), schedule="parallel",
              threads=torch.get_num_threads(), align_interval=1000, align_epochs=pick(5, 1), seed=0)
    kw.update(PRECISION_CASES[case])
    cfg = Config(**kw).resolved()
    runs = {"reference_fp32": Run(cfg), "fused_fp32": Run(dataclasses.replace(cfg, fused=True)),
            "fused_bf16": Run(dataclasses.replace(cfg, fused=True, precision="bf16"))}
    for r in runs.values():
        r.step()  # round 0 (aligns): warm-up
    assert len({r.metrics[0]["comm_bytes"] for r in runs.values()}) == 1  # bf16 leaves the wire as is
    times = {k: [] for k in runs}
    for _ in range(pick(3, 1)):
        for k, r in runs.items():
            t0 = time.perf_counter()
            r.step()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    images = sum(len(p) for p in runs["reference_fp32"].parts) * cfg.local_epochs
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    info = {f"{k}_s": v for k, v in med.items()}
    info.update({f"{k}_speedup": med["reference_fp32"] / v for k, v in med.items()},
                **{f"{k}_images_per_s": images / v for k, v in med.items()},
                fused_bf16_phases=_phases(runs["fused_bf16"]), fused_fp32_phases=_phases(runs["fused_fp32"]),
                threads=torch.get_num_threads())
    benchmark.extra_info.update(info)
    print(f"\n[{case}, {torch.get_num_threads()} thread(s)] " + ", ".join(
        f"{k} {v:.3f} s ({med['reference_fp32'] / v:.2f}x, {images / v:.0f} img/s)" for k, v in med.items())
        + f"\n  fused bf16 phases {_phases(runs['fused_bf16'])}")


# -- the paper's shapes ----------------------------------------------------------------------------
# synthetic sets sized like the paper's per-client shares: resnet18 10 x 500 at B=256 (two local
# iterations per client), simple_conv 10 x 1,000 at B=128; the cnn default as everywhere.
PAPER_CASES = {
    "resnet18-paper": dict(dataset=f"synthetic:3x32x32:{pick(5000, 1000)}", model="resnet18", aux="layer3",
                           batch_size=pick(256, 128)),
    "simple_conv-paper": dict(dataset=f"synthetic:3x32x32:{pick(10000, 1000)}", model="simple_conv",
                              batch_size=pick(128, 64)),
    "mnist5k-cnn": dict(dataset="mnist5k"),
}


def bf16_gemm_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured FLOP/s of an n x n x n bf16 matrix product here (AMX through oneDNN on this CPU)."""
    import torch

    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


_CONV_OPS = ("convolution", "_convolution", "convolution_backward")


def _round_flops(run) -> tuple[float, float]:
    """(all, convolutions only) FLOPs of one ordinary round as torch's flop registry sees them
    (convolutions, their backward, matrix products; the C++ conv blocks of the fused cnn are not
    counted, so that case reads ~0)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import flop_registry

    # torch's FlopCounterMode tracks modules with backward hooks that autograd.grad (the
    # auxiliary's estimate) does not support; this mode counts the same registry per aten call
    total = [0, 0]

    def shape(t):
        return t.shape if isinstance(t, torch.Tensor) else t

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            f = flop_registry.get(func._overloadpacket)
            if f is not None:
                n = f(*tree_map(shape, args), **tree_map(shape, kwargs), out_val=tree_map(shape, out))
                total[0] += n
                if func._overloadpacket.__name__ in _CONV_OPS:
                    total[1] += n
            return out

    with _Count():
        run.step()
    return float(total[0]), float(total[1])


def _conv_seconds(run) -> float:
    """Seconds one ordinary round spends in oneDNN's convolutions, forward and backward (the
    profiler's self time of those ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.step()
    keys = ("aten::mkldnn_convolution", "aten::convolution_backward")
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in keys) / 1e6


@pytest.mark.parametrize("case", list(PAPER_CASES))
def test_paper_shape_round_seconds(benchmark, case):
    """Ordinary fsl_sage rounds at the paper's shapes: the fp32 reference engine, the fused
    engine in fp32 and in bf16, interleaved; seconds, speedups, images/s, and the FLOP rate of the
    fused bf16 round as a fraction of the measured bf16 GEMM peak."""
    import torch

    kw = dict(algorithm="fsl_sage", clients=pick(10, 2), schedule="parallel", threads=torch.get_num_threads(),
              align_interval=1000, align_epochs=pick(2, 1), seed=0)
    kw.update(PAPER_CASES[case])
    cfg = Config(**kw).resolved()
    runs = {"reference_fp32": Run(cfg), "fused_fp32": Run(dataclasses.replace(cfg, fused=True)),
            "fused_bf16": Run(dataclasses.replace(cfg, fused=True, precision="bf16"))}
    for r in runs.values():
        r.step()  # round 0 (a short alignment): warm-up; alignment is timed on its own below
    assert len({r.metrics[0]["comm_bytes"] for r in runs.values()}) == 1
    times = {k: [] for k in runs}
    for _ in range(pick(3, 1)):
        for k, r in runs.items():
            t0 = time.perf_counter()
            r.step()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    images = sum(len(p) for p in runs["reference_fp32"].parts) * cfg.local_epochs
    peak = bf16_gemm_peak(pick(2048, 512))
    flops, conv_flops = _round_flops(runs["fused_bf16"])
    frac = flops / med["fused_bf16"] / peak
    conv_s = _conv_seconds(runs["fused_bf16"])
    conv_frac = conv_flops / conv_s / peak if conv_s > 0 else 0.0
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    info = {f"{k}_s": v for k, v in med.items()}
    info.update({f"{k}_speedup": med["reference_fp32"] / v for k, v in med.items()},
                **{f"{k}_images_per_s": images / v for k, v in med.items()},
                fused_bf16_phases=_phases(runs["fused_bf16"]), fused_fp32_phases=_phases(runs["fused_fp32"]),
                reference_phases=_phases(runs["reference_fp32"]),
                bf16_gemm_peak_gflops=peak / 1e9, round_gflop=flops / 1e9, fused_bf16_peak_fraction=frac,
                conv_gflop=conv_flops / 1e9, conv_seconds=conv_s, conv_peak_fraction=conv_frac,
                executors=runs["fused_bf16"].engine.executor_record())
    benchmark.extra_info.update(info)
    print(f"\n[{case}, {cfg.clients} clients, B={cfg.batch_size}, {torch.get_num_threads()} thread(s)] " + ", ".join(
        f"{k} {v:.3f} s ({med['reference_fp32'] / v:.2f}x, {images / v:.0f} img/s)" for k, v in med.items())
        + f"\n  bf16 GEMM peak {peak / 1e9:.0f} GFLOP/s; fused bf16 round {flops / 1e9:.1f} GFLOP counted, "
        f"{flops / med['fused_bf16'] / 1e9:.0f} GFLOP/s = {frac:.1%} of it; its convolutions (profiled "
        f"round) {conv_flops / 1e9:.1f} GFLOP in {conv_s:.2f} s = "
        f"{conv_flops / max(conv_s, 1e-9) / 1e9:.0f} GFLOP/s = {conv_frac:.1%}"
        + f"\n  phases: reference {_phases(runs['reference_fp32'])}\n          fused fp32 {_phases(runs['fused_fp32'])}"
        f"\n          fused bf16 {_phases(runs['fused_bf16'])}")


@pytest.mark.parametrize("rows", [256, 1000])
def test_paper_shape_alignment_seconds(benchmark, rows):
    """One alignment of the paper's layer3 auxiliaries (10 clients, buffers of ``rows`` rows: 256
    is round 0's single upload at B=256, 1,000 a full buffer) through each engine's ``align``,
    reference fp32 / fused fp32 / fused bf16. A whole alignment is the targets (one server pass
    per buffer) and 100 epochs; both are timed, the targets by an ``align`` of 0 epochs and an
    epoch as (a few epochs - that) / their number, and the whole alignment is estimated as
    targets + 100 epochs (the speedups are of that estimate)."""
    import torch

    epochs = pick(3, 1)
    K = pick(10, 2)
    cfg = Config(algorithm="fsl_sage", model="resnet18", aux="layer3", dataset="synthetic:3x32x32",
                 clients=K, batch_size=32, align_epochs=epochs, threads=torch.get_num_threads(), seed=0).resolved()
    g = torch.Generator().manual_seed(0)
    ref = Run(cfg)
    with torch.no_grad():
        data = [(ref.engine.clients[0](torch.randn(pick(rows, 64), 3, 32, 32, generator=g)),
                 torch.randint(0, 10, (pick(rows, 64),), generator=g)) for _ in range(K)]
    kinds = {"reference_fp32": {}, "fused_fp32": dict(fused=True),
             "fused_bf16": dict(fused=True, precision="bf16")}
    runs = {k: ref if not kw else Run(dataclasses.replace(cfg, **kw)) for k, kw in kinds.items()}
    only_targets = {k: Run(dataclasses.replace(cfg, align_epochs=0, **kw)) for k, kw in kinds.items()}
    secs, targets = {}, {}
    for k, r in runs.items():
        t0 = time.perf_counter()
        only_targets[k].engine.align(list(range(K)), data)
        t1 = time.perf_counter()
        r.engine.align(list(range(K)), data)
        t2 = time.perf_counter()
        targets[k] = t1 - t0
        secs[k] = max(t2 - t1 - targets[k], 0.0) / epochs
    whole = {k: targets[k] + 100 * secs[k] for k in runs}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({f"{k}_s_per_epoch": v for k, v in secs.items()},
                                **{f"{k}_targets_s": v for k, v in targets.items()},
                                **{f"{k}_whole_alignment_s": v for k, v in whole.items()},
                                **{f"{k}_speedup": whole["reference_fp32"] / v for k, v in whole.items()},
                                alignment_executor=runs["fused_bf16"].engine.executors["alignment"]["executor"],
                                rows=rows, clients=K, epochs=epochs)
    print(f"\n[alignment, {K} clients x {pick(rows, 64)} rows, {torch.get_num_threads()} thread(s)] " + ", ".join(
        f"{k} targets {targets[k]:.2f} s + {secs[k]:.2f} s/epoch (targets + 100 epochs: {whole[k]:.0f} s, "
        f"{whole['reference_fp32'] / whole[k]:.2f}x)" for k in runs))
