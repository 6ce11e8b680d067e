"""Compile check of the CUDA kernels of the auxiliary head (no GPU needed: nvcc -c only)."""
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "csrc" / "aux_kernels.cu"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile-check csrc/aux_kernels.cu")
def test_aux_cuda_compiles_for_sm90(tmp_path):
    out = tmp_path / "aux_cuda.o"
    r = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-O3", "-Werror", "all-warnings", "-o",
                        str(out), str(SRC)], capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed:\n{r.stdout}\n{r.stderr}"
    assert out.stat().st_size > 0
