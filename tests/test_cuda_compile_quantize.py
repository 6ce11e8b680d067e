"""The CUDA kernels of quantize compile for sm_90 (nothing CUDA runs on the dev machines), and the
generated PTX keeps the arithmetic the contract needs for bit-exact codes under --use_fast_math:
IEEE divisions (div.rn), no approximate reciprocal/division and no fused multiply-add."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CU = Path(__file__).resolve().parents[1] / "csrc" / "quantize_cuda.cu"
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: cannot compile-check "
                                                     "csrc/quantize_cuda.cu")
# setup.py's nvcc flags for the CUDA build.
FLAGS = ["-O3", "--use_fast_math", "-arch=sm_90"]


def _nvcc(args, tmp_path):
    proc = subprocess.run([NVCC, *FLAGS, *args, str(CU)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    return proc


def test_quantize_cu_compiles_for_sm90(tmp_path):
    obj = tmp_path / "quantize_cuda.o"
    proc = _nvcc(["-c", "-o", str(obj)], tmp_path)
    assert obj.stat().st_size > 0
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]


def test_quantize_ptx_uses_exact_rounding(tmp_path):
    ptx = tmp_path / "quantize_cuda.ptx"
    _nvcc(["-ptx", "-o", str(ptx)], tmp_path)
    text = ptx.read_text()
    ops = set(re.findall(r"\b((?:div|rcp|fma|mul|cvt)\.[a-z0-9.]+)", text))
    assert any(o.startswith("div.rn") for o in ops), sorted(ops)
    bad = sorted(o for o in ops if o.startswith(("div.approx", "div.full", "rcp.approx", "fma.")))
    assert not bad, f"approximate or fused float ops in the quantize kernels: {bad}"
    for kernel in ("quant_warp_kernel", "quant_block_kernel", "dequant_kernel"):
        assert kernel in text
