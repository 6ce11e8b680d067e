"""The top-k codec's encode + decode (fsl_fast/codec.py): the eager PyTorch reference
(``FSL_FAST_BACKEND=reference``: torch.topk threshold, tie mask, nonzero, gather) against the C++
selection (csrc/topk.cpp) with the C++ quantization, one process, same messages checked first.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_codec.py --benchmark-only -q

``extra_info``: ``ratio_vs_eager`` (this variant's speed-up over the reference, same shape and
spec, measured earlier in the process), ``gbps`` (bytes of the dense tensor read by the encoder
and written by the decoder, per call) and ``copy_gbps`` (a clone of the same tensor, for scale).
"""
import os
import sys
import time

import pytest
import torch

from bench.common import pick
from fsl_fast import codec as C
from fsl_fast import ops as backends

SHAPES = pick([(256, 8192), (256, 256, 2, 2)], [(64, 4096)])  # 8 MiB (the target's size), resnet18's cut
SPECS = ["topk:0.05", "topk:0.05,int4", "topk:0.01,int8"]
_EAGER: dict = {}
_ROWS: list = []


def _ids(s):
    return "x".join(map(str, s))


def _roundtrip(cod, z):
    return cod.decode(cod.encode(z, seed=7))


def _with_backend(name, fn):
    old = os.environ.get(backends.ENV_BACKEND)
    os.environ[backends.ENV_BACKEND] = name
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(backends.ENV_BACKEND, None)
        else:
            os.environ[backends.ENV_BACKEND] = old


def _copy_gbps(z):
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        z.clone()
        best = min(best, time.perf_counter() - t)
    return 2 * z.numel() * 4 / best / 1e9


@pytest.mark.parametrize("variant", ["eager", "cpp"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_topk_codec(benchmark, shape, spec, variant):
    if variant == "cpp" and not backends.available("cpp", "cpu")[0]:
        pytest.skip(f"C++ extension unavailable: {backends.available('cpp', 'cpu')[1]}")
    torch.manual_seed(0)
    z = torch.randn(shape)
    cod = C.Codec(C.parse(spec))
    backend = "reference" if variant == "eager" else "cpp"
    want = _with_backend("reference", lambda: _roundtrip(cod, z))
    got = _with_backend(backend, lambda: _roundtrip(cod, z))
    assert torch.equal(got, want), "the variants' messages differ"
    benchmark.pedantic(lambda: _with_backend(backend, lambda: _roundtrip(cod, z)), rounds=7, iterations=1,
                       warmup_rounds=1)
    med = benchmark.stats.stats.median
    key = (shape, spec)
    if variant == "eager":
        _EAGER[key] = med
    info = {"gbps": round(2 * z.numel() * 4 / med / 1e9, 2), "copy_gbps": round(_copy_gbps(z), 1)}
    if variant != "eager" and key in _EAGER:
        info["ratio_vs_eager"] = round(_EAGER[key] / med, 2)
    benchmark.extra_info.update(info)
    _ROWS.append((_ids(shape), spec, variant, med * 1e3, info.get("ratio_vs_eager", "")))


def teardown_module(module):
    if _ROWS:
        sys.stderr.write("\n| shape | spec | variant | encode+decode (ms) | vs eager |\n|---|---|---|---|---|\n")
        for r in _ROWS:
            sys.stderr.write(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]} |\n")


# ---------------------------------------------------------------------------------------------
# GPU (bench/gpu_check.sh): encode + decode with the CUDA and Triton selections and quantizers
# against the eager reference on the device, and the share of a device copy's bandwidth (the
# dense tensor read by the encoder plus written by the decoder; the target is >= 70% at 64 MiB).

GPU_SHAPES = [(256, 8192), (2048, 8192)]  # 8 and 64 MiB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU variants need "
                                                          "torch.cuda.is_available()")
@pytest.mark.parametrize("variant", ["eager", "cuda", "triton"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_ids)
def test_gpu_topk_codec(benchmark, shape, spec, variant):
    backend = "reference" if variant == "eager" else variant
    ok, why = backends.available(backend, "cuda")
    if not ok:
        pytest.skip(f"{backend} backend unavailable on cuda: {why}")
    torch.manual_seed(0)
    z = torch.randn(shape, device="cuda")
    cod = C.Codec(C.parse(spec))
    want = _with_backend("reference", lambda: _roundtrip(cod, z))
    got = _with_backend(backend, lambda: _roundtrip(cod, z))
    assert torch.equal(got, want), "the variants' messages differ"

    def fn():
        _with_backend(backend, lambda: _roundtrip(cod, z))
        torch.cuda.synchronize()

    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)
    med = benchmark.stats.stats.median
    dst = torch.empty_like(z)
    fn_copy = lambda: (dst.copy_(z), torch.cuda.synchronize())  # noqa: E731
    fn_copy()
    t = time.perf_counter()
    for _ in range(20):
        fn_copy()
    copy_gbps = 2 * z.numel() * 4 / ((time.perf_counter() - t) / 20) / 1e9
    key = ("gpu", shape, spec)
    if variant == "eager":
        _EAGER[key] = med
    gbps = 2 * z.numel() * 4 / med / 1e9
    info = {"gbps": round(gbps, 1), "copy_gbps": round(copy_gbps, 1), "pct_of_copy": round(100 * gbps / copy_gbps, 1),
            "gpu": torch.cuda.get_device_name(0)}
    if variant != "eager" and key in _EAGER:
        info["ratio_vs_eager"] = round(_EAGER[key] / med, 2)
    benchmark.extra_info.update(info)
    _ROWS.append((_ids(shape) + " (gpu)", spec, variant, med * 1e3,
                  f"{info.get('ratio_vs_eager', '')} ({info['pct_of_copy']}% of copy)"))
