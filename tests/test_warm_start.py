"""--warm-start RUN: the models of a finished run start a new one (both engines either way);
optimizers, schedule and round counter start fresh; a source that does not fit is one line."""
import json

import pytest
import torch

from fsl_fast.config import Config, ConfigError
from fsl_fast.runner import Run, load_checkpoint, warm_start
from fsl_fast.train import main

ARGS = ["--dataset", "synthetic:1x12x12", "--clients", "3", "--batch-size", "32", "--align-epochs", "2",
        "--align-interval", "1", "--buffer-size", "64", "--no-progress"]


def _source(tmp_path, fused, algorithm="fsl_sage", extra=()):
    out = tmp_path / f"src-{algorithm}-{int(fused)}"
    assert main(ARGS + ["--algorithm", algorithm, "--rounds", "2", "--out", str(out)]
                + (["--fused"] if fused else []) + list(extra)) == 0
    return out


def _cfg(**kw):
    d = dict(dataset="synthetic:1x12x12", clients=3, batch_size=32, align_epochs=2, align_interval=1,
             buffer_size=64)
    return Config(**{**d, **kw}).resolved()


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("src_fused,dst_fused", [(False, True), (True, False), (True, True)])
def test_models_are_loaded_and_the_rest_is_fresh(tmp_path, src_fused, dst_fused):
    src_dir = _source(tmp_path, src_fused)
    src = Run(_cfg(fused=src_fused))
    load_checkpoint(src, src_dir / "checkpoints/last.pt")
    want = src.engine.named_state()
    run = Run(_cfg(fused=dst_fused, algorithm="fsl_sage", optimizer="sgd", lr=0.01))
    rec = warm_start(run, str(src_dir))
    assert rec["parts"] == ["client", "server", "aux"] and rec["rounds_completed"] == 2
    got = run.engine.named_state()
    for part in want:
        _equal(want[part], got[part])
    eng = run.engine
    if dst_fused:  # every client row and the global buffer hold the loaded client
        rows = eng.clients.flat.buffer
        assert torch.equal(rows, eng.clients.flat.global_buffer.expand_as(rows))
        assert eng.clients.opt.steps == [0, 0, 0]
    else:
        for c in eng.clients:
            _equal(c.state_dict(), want["client"])
        assert all(not o.state for o in eng.client_opts)
    assert run.next_round == 0 and run.ledger.state_dict() == Run(_cfg()).ledger.state_dict()
    # the warm-started run trains on from there
    rec0 = run.step()
    assert rec0["round"] == 0


def test_cli_record_survives_resume_and_aux_is_skipped_when_absent(tmp_path):
    src = _source(tmp_path, True, algorithm="splitfed_v2")  # no auxiliaries there
    out = tmp_path / "warm"
    assert main(ARGS + ["--fused", "--rounds", "1", "--warm-start", str(src / "checkpoints/last.pt"),
                        "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["warm_start"] == {"from": str(src), "rounds_completed": 2, "algorithm": "splitfed_v2",
                                 "parts": ["client", "server"]}
    assert json.loads((out / "config.json").read_text())["warm_start"] == str(src / "checkpoints/last.pt")
    assert main(["--resume", str(out), "--rounds", "2", "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["warm_start"] == res["warm_start"]
    # a warm start beats a cold start of the same seed after one round on this data
    cold = tmp_path / "cold"
    assert main(ARGS + ["--fused", "--rounds", "1", "--out", str(cold)]) == 0
    first = lambda d: json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["test_loss"]
    assert first(out) < first(cold)


@pytest.mark.parametrize("how,needle", [
    ("missing", "no checkpoint at"),
    ("other_model", "the server model of"),
    ("garbage", "--warm-start: cannot read checkpoint"),
])
def test_bad_sources_are_one_line(tmp_path, capsys, how, needle):
    if how == "missing":
        src = tmp_path / "nothing"
    else:
        src = _source(tmp_path, False, algorithm="cse_fsl",
                      extra=["--dataset", "synthetic:1x16x16"] if how == "other_model" else [])
        if how == "garbage":
            (src / "checkpoints/last.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "w"
    assert main(ARGS + ["--rounds", "1", "--warm-start", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_distributed_refuses_warm_start():
    with pytest.raises(ConfigError, match="--warm-start: in-process runs only"):
        _cfg(distributed=True, warm_start="x")
