"""The default build is two extension modules (fsl_fast/buildflags.py): the portable fsl_fast._C
(x86-64-v2) and fsl_fast._C_avx512, which an AVX-512 CPU loads. The rest of the suite runs on the
module this CPU loads; here the portable one runs the op-level tests too."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsl_fast import buildflags

ROOT = Path(__file__).resolve().parents[1]
OP_TESTS = ["tests/test_layers.py", "tests/test_conv_pool.py", "tests/test_fedavg.py", "tests/test_aux.py",
            "tests/test_quantize.py", "tests/test_optim.py"]


def test_this_cpu_loads_the_best_build_it_runs():
    from fsl_fast import ops

    if ops.extension() is None:
        pytest.skip(f"no extension module: {ops.extension_error()}")
    names = buildflags.module_names()
    if "FSL_FAST_EXT_MODULE" not in os.environ:
        assert names[-1] == "fsl_fast._C"
        assert ("fsl_fast._C_avx512" in names) == buildflags.cpu_has_avx512()
    present = [n for n in names if importlib.util.find_spec(n) is not None]
    assert present and ops.extension_origin() == f"prebuilt {present[0]}"


def test_portable_module_passes_the_op_tests():
    both = all(importlib.util.find_spec(n) is not None for n in ("fsl_fast._C", "fsl_fast._C_avx512"))
    if not both:
        pytest.skip("one extension module only (FSL_FAST_MARCH was set at build time, or no x86-64): "
                    "the suite already ran on it")
    env = {**os.environ, "FSL_FAST_EXT_MODULE": "fsl_fast._C", "FSL_FAST_JIT": "0"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *OP_TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    check = subprocess.run([sys.executable, "-c", "from fsl_fast import ops; print(ops.extension_origin())"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "prebuilt fsl_fast._C", check.stdout + check.stderr


def test_build_targets():
    old = os.environ.pop("FSL_FAST_MARCH", None)
    try:
        if buildflags._x86():
            assert buildflags.variants() == [("", buildflags.PORTABLE), ("_avx512", buildflags.AVX512)]
        os.environ["FSL_FAST_MARCH"] = "native"
        assert buildflags.variants() == [("", ["-march=native"])]
        assert buildflags.cxx() == buildflags.BASE + ["-march=native"]
        os.environ["FSL_FAST_MARCH"] = ""
        assert buildflags.variants() == [("", [])]
    finally:
        os.environ.pop("FSL_FAST_MARCH", None)
        if old is not None:
            os.environ["FSL_FAST_MARCH"] = old
