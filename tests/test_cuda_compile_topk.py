"""The CUDA top-k kernel compiles for sm_90 without warnings (nothing CUDA runs on the dev
machines; its equality tests against the reference are in tests/test_codec.py and run where a GPU
is present). The bindings (csrc/*_cuda.cpp) are syntax-checked by tools/check_cuda_compile.sh."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: cannot compile-check csrc/topk_kernels.cu")


def test_topk_cu_compiles_for_sm90(tmp_path):
    obj = tmp_path / "topk.o"
    proc = subprocess.run([NVCC, "-O3", "--use_fast_math", "-arch=sm_90", "-c", "-o", str(obj),
                           str(ROOT / "csrc" / "topk_kernels.cu")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert obj.stat().st_size > 0 and "warning" not in proc.stderr.lower(), proc.stderr[-4000:]
