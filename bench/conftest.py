"""Benchmarks pin one thread (PERF.md: two threads make medians jump under background load)."""
import os
import platform
import subprocess

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FSL_FAST_BENCH_THREADS", "1")))


def _git_sha():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


@pytest.fixture(autouse=True)
def _machine_info(request):
    bm = request.node.funcargs.get("benchmark") if hasattr(request.node, "funcargs") else None
    if bm is not None:
        bm.extra_info.update(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            cpu=platform.processor() or platform.machine(),
            cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            git=_git_sha(),
        )
    yield
