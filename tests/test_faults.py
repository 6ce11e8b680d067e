"""Faults end a run with one line, a documented exit status and a resumable run directory:
divergence (exit 3), run-directory write errors (exit 4), unreadable formats and unusable --out
(exit 2); metrics.jsonl / results.json / config.json are strict JSON."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsl_fast import faults
from fsl_fast.faults import Divergence, FiniteGuard
from fsl_fast.train import main

TINY = ["--dataset", "synthetic:1x28x28", "--clients", "3", "--batch-size", "32",
        "--align-epochs", "2", "--align-interval", "2", "--no-progress"]
ROOT = Path(__file__).resolve().parents[1]


def _strict_loads(text: str):
    def bad(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def _metrics(out: Path):
    return [_strict_loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _drop_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds_")} for r in rows]


def _check_strict_json(out: Path):
    for name in ("config.json", "results.json", "partition.json"):
        if (out / name).is_file():
            _strict_loads((out / name).read_text())
    _metrics(out)


# -- the guard itself ------------------------------------------------------------------------

def test_guard_names_the_first_bad_item_and_its_kind():
    g = FiniteGuard()
    g.round = 4
    g.add(0, "smashed data", torch.ones(3))
    g.add(1, "smashed data", torch.tensor([1.0, float("inf")]))
    g.add(2, "smashed data", torch.tensor([float("nan")]))
    with pytest.raises(Divergence) as e:
        g.verify("client forward")
    assert str(e.value) == "round 4, client 1, client forward: smashed data is Inf"
    g.verify("client forward")  # the queue was emptied
    g.add(None, "client model parameters", [torch.zeros(2), torch.tensor([0.0, float("nan")])])
    with pytest.raises(Divergence, match=r"^round 4, aggregation: client model parameters are NaN$"):
        g.verify("aggregation")


def test_guard_is_exact_when_a_sum_of_finite_values_overflows():
    g = FiniteGuard()
    big = torch.full((4,), 3e38)  # finite, but the sum overflows to inf
    assert not torch.isfinite(big.sum())
    g.add(0, "smashed data", big)
    g.verify("client forward")  # no error: every element is finite


def test_json_is_strict():
    assert faults.dumps({"a": float("nan"), "b": [1.0, float("-inf")], "c": 2}) == \
        '{"a": null, "b": [1.0, null], "c": 2}'


# -- divergence in a run ---------------------------------------------------------------------

def _poison_round(monkeypatch, round_, client, what="smashed"):
    """Make client ``client``'s smashed data NaN in round ``round_`` (every engine)."""
    from fsl_fast import algorithms

    orig = algorithms.Algorithm.client_forward

    def client_forward(self, ks, xs):
        if self._round != round_ or client not in ks:
            return orig(self, ks, xs)
        with self.phase("client"):
            zs = self.engine.client_forward(ks, xs)
        with torch.no_grad():
            zs[ks.index(client)].view(-1)[0] = float("nan")  # inside the engine's own tensor
        self.watch("smashed data", ks, zs)
        self.guard.verify("client forward")
        return zs

    monkeypatch.setattr(algorithms.Algorithm, "client_forward", client_forward)


@pytest.mark.parametrize("engine", ["reference", "fused"])
@pytest.mark.parametrize("algorithm,schedule", [("fsl_sage", "parallel"), ("splitfed_v2", "sequential")])
def test_divergence_stops_with_exit_3_and_resumes_exactly(tmp_path, monkeypatch, capsys, engine,
                                                          algorithm, schedule):
    args = ["--algorithm", algorithm, "--schedule", schedule] + TINY + (["--fused"] if engine == "fused" else [])
    clean = tmp_path / "clean"
    assert main(args + ["--rounds", "3", "--out", str(clean)]) == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _poison_round(m, 1, 2)
        assert main(args + ["--rounds", "3", "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: round 1, client 2, client forward: smashed data is NaN;"), err
    assert "checkpoint is intact" in err[0] and f"--resume {out}" in err[0]
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ck["next_round"] == 1 and ck["format_version"] == faults.FORMAT_VERSION
    assert len(_metrics(out)) == 1 and not list(out.rglob("*.tmp"))
    # the same settings again: identical to the run that never diverged
    assert main(["--resume", str(out), "--rounds", "3", "--no-progress"]) == 0
    assert _drop_timing(_metrics(out)) == _drop_timing(_metrics(clean))
    _check_strict_json(out)


def test_real_divergence_then_resume_with_a_lower_lr(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--fused", "--quantize", "int8", "--rounds", "2", "--out", str(out)]
    assert main(args[:-2] + ["--lr", "1e30", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: round 0, client 0, ") and "Traceback" not in err
    assert main(["--resume", str(out), "--lr", "1e-3", "--no-progress"]) == 0
    cfg = _strict_loads((out / "config.json").read_text())
    assert cfg["lr"] == 1e-3 and cfg["format_version"] == faults.FORMAT_VERSION
    res = _strict_loads((out / "results.json").read_text())
    assert res["config_changes"] == [{"round": 0, "changes": {"lr": {"old": 1e30, "new": 1e-3}}}]
    fresh = tmp_path / "fresh"
    assert main(args[:-2] + ["--lr", "1e-3", "--out", str(fresh)]) == 0
    assert _drop_timing(_metrics(out)) == _drop_timing(_metrics(fresh))
    _check_strict_json(out)


@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_lr_change_on_resume_reaches_the_optimizers(tmp_path, engine):
    """--resume DIR --lr X after round 1 equals a run whose optimizers got lr X from round 1 on."""
    from fsl_fast.config import Config
    from fsl_fast.runner import Run

    extra = ["--fused"] if engine == "fused" else []
    out = tmp_path / "run"
    assert main(TINY + extra + ["--rounds", "1", "--out", str(out)]) == 0
    assert main(["--resume", str(out), "--rounds", "2", "--lr", "0.01", "--weight-decay", "0",
                 "--no-progress"]) == 0
    cfg = Config(dataset="synthetic:1x28x28", clients=3, batch_size=32, align_epochs=2, align_interval=2,
                 fused=engine == "fused", rounds=2).resolved()
    run = Run(cfg)
    run.step()
    run.engine.set_hyperparameters(0.01, 0.0, cfg.aux_lr)
    rec = run.step()
    got = _metrics(out)[1]
    assert got["test_loss"] == rec["test_loss"] and got["test_accuracy"] == rec["test_accuracy"]


def test_resume_cannot_change_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--rounds", "1", "--out", str(out)]) == 0
    assert main(["--resume", str(out), "--clients", "4"]) == 2
    assert "cannot change clients" in capsys.readouterr().err


# -- I/O faults ------------------------------------------------------------------------------

def test_out_under_a_regular_file_is_exit_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(TINY + ["--rounds", "1", "--out", str(f / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --out: cannot use ") and "Not a directory" in err


def _full_disk_after(monkeypatch, n_ok: int, target: str):
    """Let the first ``n_ok`` writes of ``target`` ("checkpoint" or "metrics") succeed, then fail
    with ENOSPC after a partial write (what a full disk does)."""
    calls = {"n": 0}
    if target == "checkpoint":
        real = torch.save

        def save(obj, f, *a, **kw):
            calls["n"] += 1
            if calls["n"] > n_ok:
                f.write(b"PK partial bytes")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(obj, f, *a, **kw)

        monkeypatch.setattr(faults.torch, "save", save)
    else:
        real_append = faults.append_line

        def append_line(path, line):
            calls["n"] += 1
            if calls["n"] > n_ok:
                with open(path, "a") as fh:  # half a line reaches the file, then the disk is full
                    fh.write(line[: len(line) // 2])
                with open(path, "a") as fh:
                    start = fh.tell() - len(line) // 2
                    fh.truncate(start)
                raise faults.RunIOError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            return real_append(path, line)

        monkeypatch.setattr(faults, "append_line", append_line)


@pytest.mark.parametrize("target", ["checkpoint", "metrics"])
def test_write_error_mid_run_is_exit_4_and_resumable(tmp_path, monkeypatch, capsys, target):
    args = TINY + ["--fused", "--rounds", "3"]
    clean = tmp_path / "clean"
    assert main(args + ["--out", str(clean)]) == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _full_disk_after(m, 1, target)
        assert main(args + ["--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device (ENOSPC)" in err and "Traceback" not in err
    assert f"cannot write {out}" in err
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
    rows = _metrics(out)
    if target == "checkpoint":  # round 1's checkpoint failed: round 0 on disk, no partial file
        assert ck["next_round"] == 1 and len(rows) == 1
        assert not list(out.rglob("*.tmp"))
    else:  # round 1 checkpointed, its metrics row not written: never a row past the checkpoint
        assert ck["next_round"] == 2 and len(rows) == 1
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert _drop_timing(_metrics(out)) == _drop_timing(_metrics(clean))


def test_full_tmpfs(tmp_path):
    """A real tiny file system, sized so that round 0's checkpoint fits and round 1's does not
    (the new checkpoint is written beside the old one before it replaces it)."""
    args = TINY + ["--fused", "--threads", "1"]
    probe = tmp_path / "probe"
    assert main(args + ["--rounds", "1", "--out", str(probe)]) == 0
    size_kb = int(1.5 * (probe / "checkpoints/last.pt").stat().st_size / 1024) + 16
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()[:120]})")
    try:
        out = mnt / "run"
        proc = subprocess.run([sys.executable, "-m", "fsl_fast.train", "--rounds", "3", "--out", str(out)]
                              + args, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 4, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr[-2000:]
        ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
        assert ck["next_round"] == 1 and len(_metrics(out)) == 1
        assert not list(out.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# -- formats ---------------------------------------------------------------------------------

def test_unknown_versions_are_refused_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--rounds", "1", "--out", str(out)]) == 0
    ck_path = out / "checkpoints/last.pt"
    ck = torch.load(ck_path, weights_only=True)
    # unversioned (written before versioning): read as version 1
    del ck["format_version"]
    torch.save(ck, ck_path)
    assert main(["--resume", str(out), "--rounds", "2", "--no-progress"]) == 0
    capsys.readouterr()
    ck = torch.load(ck_path, weights_only=True)
    ck["format_version"] = 99
    torch.save(ck, ck_path)
    assert main(["--resume", str(out), "--rounds", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "format version 99 (written by a newer fsl_fast)" in err
    assert "reads version 1" in err
    cfg = _strict_loads((out / "config.json").read_text())
    cfg["format_version"] = "x"
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["--resume", str(out), "--rounds", "3", "--no-progress"]) == 2
    assert "run configuration of format version 'x'" in capsys.readouterr().err
    (out / "config.json").write_text("{not json")
    assert main(["--resume", str(out)]) == 2
    ck_path.write_bytes(b"garbage")
    cfg["format_version"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["--resume", str(out), "--rounds", "3", "--no-progress"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err

