"""CLI smoke runs of every algorithm and schedule, bad input, run directory, and exact resume."""
import json
import subprocess
import sys

import pytest
import torch

from fsl_fast.config import ALGORITHMS
from fsl_fast.train import main

TINY = ["--dataset", "synthetic:1x28x28", "--clients", "2", "--batch-size", "32",
        "--align-epochs", "2", "--align-interval", "2", "--no-progress"]


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_smoke_every_algorithm(tmp_path, algorithm, schedule):
    out = tmp_path / "run"
    assert main(["--algorithm", algorithm, "--schedule", schedule, "--rounds", "2", "--out", str(out)] + TINY) == 0
    for f in ("config.json", "partition.json", "metrics.jsonl", "results.json",
              "accuracy_vs_comm.png", "accuracy_vs_round.png", "checkpoints/last.pt"):
        assert (out / f).is_file(), f
    m = _metrics(out)
    assert [r["round"] for r in m] == [0, 1]
    for key in ("test_accuracy", "test_loss", "comm_bytes", "comm_bytes_paper", "bytes_up_smashed",
                "bytes_down_client_model", "seconds_client", "seconds_eval"):
        assert key in m[0], key
    assert m[1]["comm_bytes"] > m[0]["comm_bytes"] > m[0]["comm_bytes_paper"] > 0
    assert 0.0 <= m[1]["test_accuracy"] <= 1.0
    part = json.loads((out / "partition.json").read_text())
    assert sum(c["samples"] for c in part["clients"]) == 640
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ck["next_round"] == 2


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v1", "cse_fsl"])
def test_resume_gives_the_uninterrupted_metrics(tmp_path, algorithm):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--algorithm", algorithm, "--partition", "dirichlet", "--alpha", "0.5"] + TINY
    assert main(args + ["--rounds", "3", "--out", str(full)]) == 0
    assert main(args + ["--rounds", "1", "--out", str(part)]) == 0
    assert main(["--resume", str(part), "--rounds", "3", "--no-progress"]) == 0
    a, b = _metrics(full), _metrics(part)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        ra = {k: v for k, v in ra.items() if not k.startswith("seconds_")}
        rb = {k: v for k, v in rb.items() if not k.startswith("seconds_")}
        assert ra == rb


@pytest.mark.parametrize("argv,needle", [
    (["--clients", "-1"], "--clients"),
    (["--rounds", "0"], "--rounds"),
    (["--algorithm", "nope"], "invalid choice"),
    (["--model", "vgg"], "vgg"),
    (["--dataset", "cifar10", "--data-dir", "/does/not/exist"], "/does/not/exist"),
    (["--clients", "5000"], "clients"),
    (["--partition", "dirichlet"], "--alpha"),
    (["--lr", "-1"], "--lr"),
    (["--quantize", "int4", "--quantize-group-size", "3"], "even"),
])
def test_bad_values_exit_with_one_line(tmp_path, argv, needle):
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "fsl_fast.train", "--out", str(out), "--no-progress"] + argv,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing half-written


def test_refuses_to_overwrite_and_to_change_a_resumed_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--rounds", "1", "--out", str(out)] + TINY) == 0
    assert main(["--rounds", "1", "--out", str(out)] + TINY) == 2
    assert main(["--resume", str(out), "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "cannot change seed" in err
