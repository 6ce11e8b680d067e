"""--fedavg-server shared: FedAvg as the FSL-SAGE authors' code runs it (one server half shared by
every client, stepped in turn, never averaged; only the client halves are averaged).

Its arithmetic is SplitFed v2's (client forward, the shared server's step returning the cut-layer
gradient, client backward and step; client halves averaged) without the per-iteration messages,
so every round's accuracy and losses equal SplitFed v2's, while the ledger is FedAvg's."""
from __future__ import annotations

import json

import pytest

from fsl_fast.config import Config, ConfigError
from fsl_fast.train import main

TINY = ["--dataset", "synthetic:1x28x28", "--clients", "4", "--batch-size", "32", "--threads", "1",
        "--no-progress", "--rounds", "3"]
NUMBERS = ("test_accuracy", "test_loss", "train_loss", "train_accuracy")


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("engine", [[], ["--fused"]], ids=["reference", "fused"])
@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_shared_server_trains_as_splitfed_v2_and_counts_as_fedavg(tmp_path, engine, schedule):
    args = TINY + engine + ["--schedule", schedule]
    runs = {}
    for name, extra in (("shared", ["--algorithm", "fedavg", "--fedavg-server", "shared"]),
                        ("v2", ["--algorithm", "splitfed_v2"]), ("copies", ["--algorithm", "fedavg"])):
        assert main(args + extra + ["--out", str(tmp_path / name)]) == 0
        runs[name] = _metrics(tmp_path / name)
    for s, v2, cp in zip(runs["shared"], runs["v2"], runs["copies"]):
        for key in NUMBERS[:2]:
            assert s[key] == v2[key], (s["round"], key, s[key], v2[key])
        byte_keys = [k for k in cp if k.startswith("bytes_")]
        assert byte_keys and all(s[k] == cp[k] for k in byte_keys), s["round"]
        assert s["bytes_up_server_model"] > 0 and s.get("bytes_up_smashed", 0) == 0
    # the per-client copies train differently (each client's own server half)
    assert runs["shared"][-1]["test_loss"] != runs["copies"][-1]["test_loss"]
    cfg = json.loads((tmp_path / "shared" / "config.json").read_text())
    assert cfg["fedavg_server"] == "shared"


def test_shared_server_resumes_exactly(tmp_path):
    args = TINY + ["--algorithm", "fedavg", "--fedavg-server", "shared", "--fused"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main([a if a != "3" else "2" for a in args] + ["--out", str(tmp_path / "b")]) == 0
    assert main(["--resume", str(tmp_path / "b"), "--rounds", "3", "--no-progress"]) == 0
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["test_loss"] for r in a] == [r["test_loss"] for r in b]


@pytest.mark.parametrize("kw,needle", [
    (dict(algorithm="splitfed_v2", fedavg_server="shared"), "an option of --algorithm fedavg"),
    (dict(algorithm="fedavg", fedavg_server="shared", distributed=True), "in-process runs only"),
    (dict(algorithm="fedavg", fedavg_server="one"), "unknown value 'one'"),
])
def test_bad_fedavg_server(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        Config(**kw).resolved()
