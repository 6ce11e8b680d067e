"""Benchmarks pin one thread by default (PERF.md: two threads make medians jump under background
load; ``FSL_FAST_BENCH_THREADS=2`` sets another count) and print the quick mode they run in."""
import os
import platform
import subprocess

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FSL_FAST_BENCH_THREADS", "1")))

from bench.common import QUICK  # noqa: E402


def pytest_report_header(config):
    return (f"fsl_fast benchmarks: {torch.get_num_threads()} thread(s), "
            f"{'QUICK mode (FSL_FAST_BENCH_QUICK=1: small shapes, smoke numbers)' if QUICK else 'full mode'}")


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
            quick=QUICK,
        )
    yield


# -- a benchmark run that measures nothing is an error ------------------------------------------
# pytest exits 0 when every collected test is skipped; for the benchmark suite that would hide a
# broken collection or a missing extension. The run fails when CPU benchmarks were selected and
# none of them passed (GPU-only selections on a machine without CUDA are left alone).

_TALLY = {"cpu_selected": 0, "cpu_passed": 0, "cpu_skipped": 0}


def _is_gpu_case(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "gpu" in item.name.lower() or params.get("device") == "cuda"


def pytest_collection_finish(session):  # after -k/-m deselection
    for item in session.items:
        if "benchmark" in getattr(item, "fixturenames", ()) and not _is_gpu_case(item):
            item.user_properties.append(("fsl_fast_cpu_benchmark", True))
            _TALLY["cpu_selected"] += 1


def pytest_runtest_logreport(report):
    if ("fsl_fast_cpu_benchmark", True) not in report.user_properties:
        return
    if report.when == "call" and report.passed:
        _TALLY["cpu_passed"] += 1
    elif report.skipped:
        _TALLY["cpu_skipped"] += 1


def _measured_nothing() -> bool:
    return bool(_TALLY["cpu_selected"]) and not _TALLY["cpu_passed"]


def pytest_sessionfinish(session, exitstatus):
    if _measured_nothing() and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _measured_nothing():
        terminalreporter.write_line(
            f"bench: none of the {_TALLY['cpu_selected']} selected CPU benchmarks passed "
            f"({_TALLY['cpu_skipped']} skipped); a benchmark run that measures nothing fails", red=True)
