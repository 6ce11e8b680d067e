"""Compile check of csrc/fedavg_kernels.cu with nvcc (no GPU needed), plus the PTX properties the
numerics rely on: no fused multiply-add and no flush-to-zero in the averaging arithmetic, even with
the build's --use_fast_math."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "csrc" / "fedavg_kernels.cu"
NVCC = shutil.which("nvcc")
FLAGS = ["-arch=sm_90", "-O3", "--use_fast_math"]  # as setup.py compiles it

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: cannot compile-check CUDA")


def test_nvcc_compiles_fedavg_cuda(tmp_path):
    res = subprocess.run([NVCC, "-c", *FLAGS, "-o", str(tmp_path / "fedavg_kernels.o"), str(SRC)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc failed on {SRC.name}:\n{res.stderr}"
    assert (tmp_path / "fedavg_kernels.o").stat().st_size > 0


def test_ptx_keeps_products_and_sums_separately_rounded(tmp_path):
    ptx = tmp_path / "fedavg_kernels.ptx"
    res = subprocess.run([NVCC, "-ptx", *FLAGS, "-o", str(ptx), str(SRC)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc -ptx failed on {SRC.name}:\n{res.stderr}"
    text = ptx.read_text()
    ops = [m.group(0) for m in re.finditer(r"\b(?:fma|mul|add)(?:\.[a-z0-9]+)*\.f32\b", text)]
    assert ops, "no float32 arithmetic found in the PTX"
    assert not [o for o in ops if o.startswith("fma")], f"FMA found: {sorted(set(ops))}"
    assert not [o for o in ops if ".ftz" in o], f"flush-to-zero arithmetic found: {sorted(set(ops))}"
    assert "mul.rn.f32" in ops and "add.rn.f32" in ops
    assert "ld.global.nc.v4.f32" in text, "expected 16-byte vector loads for float32 rows"
