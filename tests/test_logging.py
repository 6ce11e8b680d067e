"""Per-round training loss/accuracy, --eval-every, --tensorboard."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from fsl_fast.config import ALGORITHMS, Config, ConfigError
from fsl_fast.runner import Run
from fsl_fast.train import main

BASE = dict(dataset="synthetic:1x12x12", clients=3, batch_size=32, align_epochs=2, align_interval=1,
            buffer_size=64, seed=2)
ARGS = ["--dataset", "synthetic:1x12x12", "--clients", "3", "--batch-size", "32", "--align-epochs", "2",
        "--no-progress"]


def _rows(d):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_train_statistics_by_hand_and_on_both_engines(algorithm):
    """train_loss / train_accuracy are over the batches the server trained on: with q = 1 every
    batch; the count is the samples of the round; both engines agree."""
    cfg = Config(algorithm=algorithm, server_update_interval=1, **BASE).resolved()
    ref, fused = Run(cfg), Run(dataclasses.replace(cfg, fused=True))
    a, b = ref.step(), fused.step()
    n = sum(len(p) for p in ref.parts)
    assert a["train_samples"] == b["train_samples"] == n
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1.5 / n)
    assert 0 < a["train_loss"] < 10 and 0 <= a["train_accuracy"] <= 1


def test_train_statistics_count_only_uploads_with_q():
    cfg = Config(algorithm="fsl_sage", server_update_interval=2, **BASE).resolved()
    run = Run(cfg)
    rec = run.step()
    # every second local iteration uploads: per client ceil(iterations / 2) batches of <= 32
    want = 0
    for p in run.parts:
        sizes = [min(32, len(p) - i) for i in range(0, len(p), 32)]
        want += sum(s for j, s in enumerate(sizes) if j % 2 == 0)
    assert rec["train_samples"] == want


def test_record_train_sums_by_hand():
    """The engine's per-client sums: cross-entropy summed, argmax hits, samples."""
    run = Run(Config(algorithm="fsl_sage", **BASE).resolved())
    eng = run.engine
    eng.reset_train_stats()
    out = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [0.5, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    eng.record_train([2, 0], out, y)  # rows 0-1 for client 2, 2-3 for client 0
    st = eng.train_stats()
    ce = F.cross_entropy(out, y, reduction="none").double()
    assert torch.allclose(st[2], torch.tensor([ce[0] + ce[1], 1.0, 2.0], dtype=torch.float64))
    assert torch.allclose(st[0], torch.tensor([ce[2] + ce[3], 1.0, 2.0], dtype=torch.float64))
    assert st[1].abs().sum() == 0
    eng.record_train([1], torch.log_softmax(out[:2], 1), y[:2], logp=True)
    assert torch.allclose(eng.train_stats()[1], torch.tensor([ce[0] + ce[1], 1.0, 2.0], dtype=torch.float64))


def test_eval_every(tmp_path):
    out = tmp_path / "r"
    assert main(ARGS + ["--rounds", "5", "--eval-every", "2", "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["test_accuracy"] is not None for r in rows] == [False, True, False, True, True]
    assert all(r["test_loss"] is None and r["seconds_eval"] == 0.0 for r in rows if r["test_accuracy"] is None)
    res = json.loads((out / "results.json").read_text())
    assert res["final_test_accuracy"] == rows[-1]["test_accuracy"] and res["final_test_round"] == 4
    assert res["best_test_accuracy"] == max(r["test_accuracy"] for r in rows if r["test_accuracy"] is not None)
    # the evaluated rounds hold what an every-round run logs (evaluation changes nothing)
    full = tmp_path / "full"
    assert main(ARGS + ["--rounds", "5", "--out", str(full)]) == 0
    for a, b in zip(rows, _rows(full)):
        assert a["train_loss"] == b["train_loss"]
        if a["test_accuracy"] is not None:
            assert a["test_accuracy"] == b["test_accuracy"]
    # a comm budget's round is evaluated even off the N grid
    bud = tmp_path / "bud"
    per_round = _rows(full)[0]["comm_bytes_paper"] / 2 ** 30
    assert main(ARGS + ["--rounds", "9", "--eval-every", "5", "--comm-budget-gib", str(per_round * 2.5),
                        "--out", str(bud)]) == 0
    rb = _rows(bud)
    assert len(rb) == 3 and rb[-1]["test_accuracy"] is not None and rb[0]["test_accuracy"] is None
    with pytest.raises(ConfigError, match="--eval-every"):
        Config(eval_every=0).resolved()


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the [test] extra has it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    assert main(ARGS + ["--rounds", "3", "--eval-every", "2", "--tensorboard", "--out", str(out)]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"test/accuracy", "test/loss", "train/loss", "train/accuracy", "comm/gib_paper",
            "seconds/round"} <= tags
    rows = _rows(out)
    got = [(e.step, e.value) for e in acc.Scalars("test/accuracy")]
    assert got == [(r["round"], pytest.approx(r["test_accuracy"])) for r in rows if r["test_accuracy"] is not None]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in rows])


def test_tensorboard_missing_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "r"
    assert main(ARGS + ["--rounds", "1", "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tensorboard: the tensorboard package is not installed" in err[0]
    assert not out.exists()
