"""Dispatch: one place decides; a forced backend that cannot run fails loudly with the original
error; a missing extension never breaks `import fsl_fast` and falls back to the references."""
import os
import subprocess
import sys

import pytest
import torch

from fsl_fast.ops import _backend as B
from fsl_fast.ops import quantize as Q  # noqa: F401  (registers quantize/dequantize)


def test_forced_backend_unavailable_fails_loudly(monkeypatch):
    monkeypatch.setenv("FSL_FAST_BACKEND", "cuda")
    with pytest.raises(B.BackendUnavailable, match="quantize: backend 'cuda' .* unavailable on cpu"):
        Q.quantize(torch.randn(4, 8))
    monkeypatch.setenv("FSL_FAST_BACKEND", "nope")
    with pytest.raises(B.BackendUnavailable, match="unknown backend 'nope'"):
        Q.quantize(torch.randn(4, 8))


def test_auto_prefers_cpp_on_cpu_and_argument_overrides_env(monkeypatch):
    name, _ = B.resolve("quantize", "cpu")
    assert name == ("cpp" if B.extension() is not None else "reference")
    monkeypatch.setenv("FSL_FAST_BACKEND", "cuda")
    assert B.resolve("quantize", "cpu", backend="reference")[0] == "reference"


def test_report_names_every_op():
    import fsl_fast.env as env

    env._load_ops()
    ops = {r["op"] for r in B.report(["cpu"])}
    assert {"quantize", "dequantize", "fedavg", "aux_estimate", "aux_align", "pool_relu", "lrn"} <= ops
    for r in B.report(["cpu"]):
        assert r["backend"] in B.BACKENDS and r["why"]


_NO_EXT = r"""
import sys
sys.modules["fsl_fast._C"] = None          # the prebuilt extension is absent (both builds)
sys.modules["fsl_fast._C_avx512"] = None
import os
os.environ["FSL_FAST_JIT"] = "0"           # and no JIT build
import torch, fsl_fast
from fsl_fast.ops import quantize as Q, _backend as B
q = Q.quantize(torch.randn(3, 5))          # auto: falls back to the reference
print("fallback", B.resolve("quantize", "cpu")[0])
try:
    Q.quantize(torch.randn(3, 5), backend="cpp")
except B.BackendUnavailable as e:
    print("forced:", e)
"""


def test_missing_extension_falls_back_and_forced_backend_carries_the_error():
    out = subprocess.run([sys.executable, "-c", _NO_EXT], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "fallback reference" in out.stdout
    assert "forced: quantize: backend 'cpp' (from argument) unavailable on cpu" in out.stdout
    assert "fsl_fast._C failed to import" in out.stdout and "JIT disabled" in out.stdout


def test_env_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "fsl_fast.env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "quantize" in out.stdout and "fedavg" in out.stdout and "backend" in out.stdout
