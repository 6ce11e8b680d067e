"""Distributed runtime on loopback (gloo, one thread per process) on the embedded default
(mnist5k, cnn, 10 clients, FSL-SAGE, parallel schedule):

- seconds per round with 1 and with 2 client ranks (2 and 3 processes), next to the in-process
  run, after checking that both distributed runs give the in-process metrics;
- bytes per round on the wire with and without the int8 uplink (SplitFed v2, which uploads every
  iteration, so the uplink is most of its traffic).

Each launch is one torchrun subprocess; the benchmark times the whole launch (startup included)
and reports the per-round seconds the run itself measured in ``extra_info``.
Run: ``python -m pytest bench/bench_distributed.py -q -s`` (about 2 minutes on 2 cores).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from bench.common import pick

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = pick(4, 2)  # round 0 aligns (align interval 10); the later rounds are the steady state
BASE = ["--schedule", "parallel", "--threads", "1", "--no-progress"] + pick([], ["--align-epochs", "5"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(args, out: Path, nproc: int | None):
    if nproc is None:  # in-process
        cmd = [sys.executable, "-m", "fsl_fast.train"] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "fsl_fast.train", "--distributed", "--dist-timeout", "120"] + args
    proc = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_same(dist_m, local_m):
    # The default (ordered) distributed FedAvg adds in the in-process order: equal to the bit.
    for rd, rl in zip(dist_m, local_m, strict=True):
        for key in ("test_accuracy", "test_loss", "comm_bytes"):
            assert rd[key] == rl[key], (rd["round"], key, rd[key], rl[key])


def _steady(m):
    return sum(r["seconds_round"] for r in m[1:]) / len(m[1:])


def test_seconds_per_round_1_vs_2_client_ranks(benchmark, tmp_path):
    args = ["--rounds", str(ROUNDS)] + BASE
    local = _launch(args, tmp_path / "local", None)
    one = _launch(args, tmp_path / "one", 2)
    _check_same(one, local)
    two = benchmark.pedantic(_launch, args=(args, tmp_path / "two", 3), rounds=1, iterations=1)
    _check_same(two, local)
    s_local, s_one, s_two = _steady(local), _steady(one), _steady(two)
    benchmark.extra_info.update(
        setting="mnist5k cnn fsl_sage parallel, 10 clients, 1 thread per process",
        cpus=os.cpu_count(),
        seconds_per_round_in_process=s_local,
        seconds_per_round_1_client_rank=s_one,
        seconds_per_round_2_client_ranks=s_two,
        speedup_2_vs_1_client_ranks=s_one / s_two,
        overhead_1_client_rank_vs_in_process=s_one / s_local,
        seconds_round0_with_alignment={"in_process": local[0]["seconds_round"], "1": one[0]["seconds_round"],
                                       "2": two[0]["seconds_round"]},
    )
    print(json.dumps(benchmark.extra_info, indent=1))


def test_wire_bytes_per_round_int8_uplink(benchmark, tmp_path):
    args = ["--algorithm", "splitfed_v2", "--rounds", "2"] + BASE
    fp32 = _launch(args, tmp_path / "fp32", 3)
    int8 = benchmark.pedantic(_launch, args=(args + ["--quantize", "int8"], tmp_path / "int8", 3),
                              rounds=1, iterations=1)
    for m in (fp32, int8):
        for r in m:  # per-client messages on the wire are exactly the ledger's bytes
            assert r["wire_up_smashed"] == r["bytes_up_smashed"] and r["wire_sent_bytes"] == r["wire_received_bytes"]
    f, q = fp32[-1], int8[-1]
    benchmark.extra_info.update(
        setting="mnist5k cnn splitfed_v2 parallel, 10 clients over 2 client ranks",
        wire_bytes_per_round_fp32=f["wire_sent_bytes"],
        wire_bytes_per_round_int8=q["wire_sent_bytes"],
        uplink_smashed_bytes_fp32=f["wire_up_smashed"],
        uplink_smashed_bytes_int8=q["wire_up_smashed"],
        uplink_ratio=f["wire_up_smashed"] / q["wire_up_smashed"],
        total_ratio=f["wire_sent_bytes"] / q["wire_sent_bytes"],
        ledger_round_bytes_fp32=f["round_bytes"],
        ledger_round_bytes_int8=q["round_bytes"],
        test_accuracy_fp32=f["test_accuracy"],
        test_accuracy_int8=q["test_accuracy"],
    )
    print(json.dumps(benchmark.extra_info, indent=1))
