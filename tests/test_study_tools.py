"""tools/client_memory.py and tools/alignment_study.py (docs/RESULTS.md): the memory table's
parameter counts by hand and its saved-activation count on a model small enough to count by
hand; the alignment study's runs, reuse and summary on two short rounds."""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import alignment_study  # noqa: E402
import client_memory  # noqa: E402


def test_saved_bytes_counts_each_storage_once():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(16, 8)
    # each x @ w saves x (w's gradient needs it; x needs none, so w is not saved): one storage
    # counted once; relu saves its output
    got = client_memory._saved_bytes(lambda: torch.relu(x @ w + (x @ w)).sum().backward())
    assert got == x.nbytes + 16 * 4 * 4


def test_client_memory_rows_by_hand():
    from fsl_fast.models import build_split_model

    rows = {r["algorithm"]: r for r in client_memory.measure("cnn", "default", (1, 28, 28), 8)}
    split = build_split_model("cnn", (1, 28, 28), 10)
    pc, ps, pa = (sum(p.numel() * 4 for p in m.parameters()) for m in (split.client, split.server, split.aux))
    assert rows["FedAvg"]["params"] == pc + ps and rows["FedAvg"]["moments"] == 2 * (pc + ps)
    assert rows["FSL-SAGE"]["params"] == pc + pa and rows["FSL-SAGE"]["moments"] == 2 * pc
    assert rows["CSE-FSL"]["moments"] == 2 * (pc + pa)
    assert rows["SplitFed v1 / v2"]["activations"] < rows["FSL-SAGE"]["activations"] < rows["FedAvg"]["activations"]


def test_alignment_study_runs_reuses_and_summarizes(tmp_path, monkeypatch):
    monkeypatch.setattr(alignment_study, "COMMON", alignment_study.COMMON + [
        "--dataset", "synthetic:1x28x28", "--clients", "2", "--align-interval", "1", "--align-epochs", "2"])
    argv = ["--out", str(tmp_path), "--seeds", "0", "--rounds", "2", "--partitions", "iid"]
    assert alignment_study.main(argv) == 0
    text = (tmp_path / "summary.md").read_text()
    for name in alignment_study.VARIANTS:
        assert f"| {name} |" in text
        m = [json.loads(x) for x in (tmp_path / "iid" / name / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        assert len(m) == 2 and all("client_update_norm" in r for r in m)
    cfg = json.loads((tmp_path / "iid" / "buffer-96" / "seed-0" / "config.json").read_text())
    assert cfg["buffer_size"] == 96
    assert json.loads((tmp_path / "iid" / "hold-norm" / "seed-0" / "config.json").read_text())["hold_estimate_norm"]
    stamp = (tmp_path / "iid" / "buffer-1000" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns
    assert alignment_study.main(argv) == 0  # finished runs are reused
    assert (tmp_path / "iid" / "buffer-1000" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns == stamp


def _write(study, run, seed, accs, gib_per_round):
    d = study / run / f"seed-{seed}"
    d.mkdir(parents=True)
    rows = [{"round": t, "test_accuracy": a, "test_loss": 1 - a, "comm_bytes_paper": (t + 1) * gib_per_round * 2 ** 30}
            for t, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_study_tables_by_hand(tmp_path):
    import study_tables

    accs = [0.5, 0.9, 0.96] + [0.97] * 20 + [0.90, 0.97]
    for s in (0, 1):
        _write(tmp_path, "fsl_sage", s, accs, 0.01)
        _write(tmp_path, "splitfed_v1", s, accs, 0.05)
        _write(tmp_path, "fedavg", s, accs, 0.02)
    _write(tmp_path, "cse_fsl", 0, [0.5] * 25, 0.01)
    text = study_tables.tables({"iid": tmp_path}, 0.95)
    assert "| iid | 0.0300 ± 0.0000 (r2.0) 2/2 |" in text  # reached in round 2: 3 rounds x 0.01 GiB
    assert "- 0/1" in text  # cse_fsl never reaches it
    assert "| 5.00x (5.00-5.00, n=2) | 2.00x (2.00-2.00, n=2) |" in text
    assert "splitfed_v1 = fedavg (2 seeds)" in text and "fsl_sage = splitfed_v1 (2 seeds)" in text
    assert "0.900 ± 0.000 / 1.0 ± 0.0" in text  # one round below 0.93 after round 20
