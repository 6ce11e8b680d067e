"""python -m fsl_fast.compare: the tables agree with the runs' metrics, finished runs are reused,
a run of another configuration is refused, and the summary numbers follow their definitions."""
import csv
import json

import pytest

from fsl_fast import compare, runner
from fsl_fast.config import ALGORITHMS
from fsl_fast.ledger import GIB

TINY = ["--dataset", "synthetic:1x28x28", "--clients", "2", "--rounds", "2", "--align-epochs", "2",
        "--align-interval", "2", "--threads", "1", "--no-progress"]


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _csv(out):
    with open(out / "summary.csv") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def _expected(m, target, budget_gib):
    """Prepare: the definitions, computed here independently of fsl_fast.compare."""
    accs = [r["test_accuracy"] for r in m]
    hit = [r for r in m if r["test_accuracy"] >= target]
    within = [r for r in m if r["comm_bytes_paper"] / GIB <= budget_gib]
    return {
        "best": max(accs),
        "final": accs[-1],
        "gib_to_target": hit[0]["comm_bytes_paper"] / GIB if hit else None,
        "round_to_target": hit[0]["round"] if hit else None,
        "acc_at_budget": within[-1]["test_accuracy"] if within else None,
        "total_gib": m[-1]["comm_bytes_paper"] / GIB,
        "wall": sum(r["seconds_round"] for r in m),
    }


def _check_tables(out, runs, target, budget_gib):
    rows = _csv(out)
    md = (out / "summary.md").read_text()
    assert set(rows) == set(runs)
    for name in runs:
        m = _metrics(out / name)
        e = _expected(m, target, budget_gib)
        r = rows[name]
        assert int(r["rounds"]) == len(m) == 2
        assert float(r["best_test_accuracy"]) == e["best"]
        assert float(r["final_test_accuracy"]) == e["final"]
        assert float(r["total_gib"]) == pytest.approx(e["total_gib"], rel=1e-12)
        assert float(r["wall_seconds"]) == pytest.approx(e["wall"], abs=1e-3)
        assert float(r["budget_gib"]) == pytest.approx(budget_gib, rel=1e-12)
        if e["acc_at_budget"] is None:
            assert r["acc_at_budget"] == ""
        else:
            assert float(r["acc_at_budget"]) == e["acc_at_budget"]
        if e["gib_to_target"] is None:
            assert r["reached_target"] == "False" and r["gib_to_target"] == ""
        else:
            assert r["reached_target"] == "True"
            assert float(r["gib_to_target"]) == pytest.approx(e["gib_to_target"], rel=1e-12)
            assert int(r["round_to_target"]) == e["round_to_target"]
        # the Markdown row shows the same numbers, rounded
        label = compare.LABELS[name.split("-")[0]] + (" (int8 uplink)" if name.endswith("-int8") else "")
        line = next(l for l in md.splitlines() if l.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "2"
        assert cells[2].startswith(f"{e['best']:.4f} (")
        assert cells[5] == ("not reached" if e["gib_to_target"] is None
                            else f"{e['gib_to_target']:.4f} ({e['round_to_target']})")
        assert cells[6] == f"{e['total_gib']:.4f}"
    png = out / "accuracy_vs_gib.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows


def test_compare_tiny_study(tmp_path, monkeypatch):
    out = tmp_path / "study"
    assert compare.main(["--out", str(out), "--quantize-sage", "--target", "0.5"] + TINY) == 0
    runs = list(ALGORITHMS) + ["fsl_sage-int8"]
    for name in runs:
        assert (out / name / "results.json").is_file(), name
    cfg = json.loads((out / "fsl_sage-int8" / "config.json").read_text())
    assert (cfg["quantize"], cfg["fused"], cfg["clients"], cfg["align_epochs"]) == ("int8", True, 2, 2)
    # default budget: the least total among the runs; that run's accuracy at the budget is its last
    totals = {n: _metrics(out / n)[-1]["comm_bytes_paper"] / GIB for n in runs}
    cheapest = min(totals, key=totals.get)
    rows = _check_tables(out, runs, 0.5, totals[cheapest])
    assert float(rows[cheapest]["acc_at_budget"]) == _metrics(out / cheapest)[-1]["test_accuracy"]
    # int8 uplink: a quarter of the smashed bytes plus per-row scales, so strictly less traffic
    assert float(rows["fsl_sage-int8"]["total_gib"]) < float(rows["fsl_sage"]["total_gib"])

    # Rerun with another target and budget: every run is reused (training would fail here).
    def no_training(*a, **k):
        raise AssertionError("compare retrained a finished run")

    monkeypatch.setattr(runner, "train", no_training)
    best = max(_metrics(out / n)[-1]["test_accuracy"] for n in runs)
    # a target above every run's accuracy (when some run is perfect, 1.0 is still checked)
    target = min(1.0, best + 1e-6)
    first = min(_metrics(out / n)[0]["comm_bytes_paper"] for n in runs) / GIB
    budget = first * 0.999  # below every run's round 0: no accuracy at the budget
    assert compare.main(["--out", str(out), "--quantize-sage", "--target", str(target),
                         "--budget-gib", str(budget)] + TINY) == 0
    rows = _check_tables(out, runs, target, budget)
    assert all(r["acc_at_budget"] == "" for r in rows.values())
    if best < 1.0:
        assert all(r["reached_target"] == "False" for r in rows.values())
        assert "not reached" in (out / "summary.md").read_text()


def test_compare_refuses_another_config(tmp_path, capsys):
    out = tmp_path / "study"
    assert compare.main(["--out", str(out), "--algorithms", "splitfed_v2"] + TINY) == 0
    rc = compare.main(["--out", str(out), "--algorithms", "splitfed_v2", "--seed", "3"] + TINY)
    assert rc == 2
    assert "splitfed_v2 holds a run with other settings (seed)" in capsys.readouterr().err


def test_compare_continues_a_shorter_run(tmp_path):
    out = tmp_path / "study"
    one = [a if a != "2" or TINY[i - 1] != "--rounds" else "1" for i, a in enumerate(TINY)]
    assert compare.main(["--out", str(out), "--algorithms", "cse_fsl"] + one) == 0
    assert len(_metrics(out / "cse_fsl")) == 1
    assert compare.main(["--out", str(out), "--algorithms", "cse_fsl"] + TINY) == 0
    m = _metrics(out / "cse_fsl")
    assert [r["round"] for r in m] == [0, 1]
    assert int(_csv(out)["cse_fsl"]["rounds"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--algorithms", "fedavg,sgd"], "--algorithms"),
    (["--target", "1.5"], "--target"),
    (["--budget-gib", "0"], "--budget-gib"),
    (["--rounds-for", "fedavg"], "--rounds-for"),
    (["--algorithm", "fedavg"], "--algorithm"),
    (["--quantize", "int8"], "--quantize"),
    (["--algorithms", "fedavg", "--quantize-sage"], "--quantize-sage"),
])
def test_compare_bad_options(tmp_path, capsys, argv, message):
    assert compare.main(["--out", str(tmp_path / "s")] + argv + TINY) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "s").exists()


def test_summary_definitions_by_hand():
    """Prepare three rounds by hand; the budget picks the last round within it, the target the
    first round reaching it; ties keep the first best round."""
    m = [{"round": 0, "test_accuracy": 0.5, "comm_bytes_paper": 1 * GIB, "seconds_round": 1.0},
         {"round": 1, "test_accuracy": 0.9, "comm_bytes_paper": 2 * GIB, "seconds_round": 2.0},
         {"round": 2, "test_accuracy": 0.9, "comm_bytes_paper": 3 * GIB, "seconds_round": 3.0}]
    s = compare.summarize_run(compare.Variant("fedavg"), m, target=0.8, budget_gib=2.5)
    assert (s.best_acc, s.best_round, s.final_acc) == (0.9, 1, 0.9)
    assert (s.acc_at_budget, s.acc_at_budget_round) == (0.9, 1)
    assert (s.gib_to_target, s.round_to_target) == (2.0, 1)
    assert (s.total_gib, s.wall_seconds, s.rounds) == (3.0, 6.0, 3)
    s = compare.summarize_run(compare.Variant("fedavg"), m, target=0.95, budget_gib=2.0)
    assert s.gib_to_target is None and (s.acc_at_budget, s.acc_at_budget_round) == (0.9, 1)
    s = compare.summarize_run(compare.Variant("fedavg"), m, target=0.5, budget_gib=0.5)
    assert s.acc_at_budget is None and (s.gib_to_target, s.round_to_target) == (1.0, 0)


def test_compare_stop_at_budget(tmp_path, monkeypatch):
    """The authors' protocol: each run stops at the first round reaching the budget; --rounds caps."""
    out = tmp_path / "study"
    argv = ["--out", str(out), "--algorithms", "splitfed_v2,fsl_sage", "--budget-gib", "0.01",
            "--stop-at-budget"] + TINY + ["--rounds", "50"]
    assert compare.main(argv) == 0
    rows = _csv(out)
    for name in ("splitfed_v2", "fsl_sage"):
        m = _metrics(out / name)
        first = next(i for i, r in enumerate(m) if r["comm_bytes_paper"] >= 0.01 * GIB)
        assert first == len(m) - 1 < 49, name  # stopped by the budget, not the round cap
        assert int(rows[name]["rounds"]) == len(m)
        assert json.loads((out / name / "results.json").read_text())["stopped_by"] == "comm_budget"
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("retrained a run stopped by the budget"))
    assert compare.main(argv) == 0
    assert compare.main(argv[:2] + ["--algorithms", "fsl_sage", "--budget-gib", "0.001"] + TINY) == 0
    assert int(_csv(out)["fsl_sage"]["rounds"]) == 2  # --rounds 2 of the longer run, no budget stop
    assert compare.main(["--out", str(tmp_path / "x"), "--stop-at-budget"] + TINY) == 2


def test_compare_over_seeds(tmp_path, monkeypatch):
    """--seeds: one run per seed per configuration; mean and sample sd by hand; reuse."""
    import math
    import statistics

    out = tmp_path / "seeds"
    argv = ["--out", str(out), "--algorithms", "fsl_sage,splitfed_v2", "--seeds", "0,3,5", "--target", "0.3"] + TINY
    assert compare.main(argv) == 0
    for name in ("fsl_sage", "splitfed_v2"):
        for s in (0, 3, 5):
            cfg = json.loads((out / name / f"seed-{s}" / "config.json").read_text())
            assert cfg["seed"] == s and cfg["algorithm"] == name
    with open(out / "summary.csv") as f:
        agg = {r["run"]: r for r in csv.DictReader(f)}
    for name in ("fsl_sage", "splitfed_v2"):
        ms = [_metrics(out / name / f"seed-{s}") for s in (0, 3, 5)]
        best = [max(r["test_accuracy"] for r in m) for m in ms]
        final = [m[-1]["test_accuracy"] for m in ms]
        assert float(agg[name]["best_mean"]) == pytest.approx(statistics.mean(best))
        assert float(agg[name]["best_sd"]) == pytest.approx(statistics.stdev(best))
        assert float(agg[name]["final_mean"]) == pytest.approx(statistics.mean(final))
        hit = [next((r["comm_bytes_paper"] / GIB for r in m if r["test_accuracy"] >= 0.3), None) for m in ms]
        got = [h for h in hit if h is not None]
        assert int(agg[name]["reached_target"]) == len(got)
        if got:
            assert float(agg[name]["gib_to_target_mean"]) == pytest.approx(statistics.mean(got))
    with open(out / "summary_per_seed.csv") as f:
        per = {r["run"] for r in csv.DictReader(f)}
    assert per == {f"{n}/seed-{s}" for n in ("fsl_sage", "splitfed_v2") for s in (0, 3, 5)}
    md = (out / "summary.md").read_text()
    assert "FSL-SAGE, seed 3" in md and "±" in md
    assert (out / "accuracy_vs_gib.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(runner, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert compare.main(argv) == 0  # everything reused
    assert compare.spread([1.0, None, 3.0]) == {"mean": 2.0, "sd": math.sqrt(2.0), "min": 1.0, "max": 3.0, "n": 2}
    assert compare.spread([None]) is None


@pytest.mark.parametrize("extra,msg", [(["--seeds", "0,0"], "distinct"), (["--seeds", "a"], "integers"),
                                       (["--seeds", "0,1", "--seed", "2"], "either --seed or --seeds")])
def test_compare_bad_seeds(tmp_path, capsys, extra, msg):
    assert compare.main(["--out", str(tmp_path / "x")] + TINY + extra) == 2
    assert msg in capsys.readouterr().err


def test_compare_reads_training_options_from_a_config_file(tmp_path, capsys):
    f = tmp_path / "opts.toml"
    f.write_text('dataset = "synthetic:1x28x28"\nclients = 2\nalign_epochs = 2\nalign_interval = 2\nthreads = 1\n')
    out = tmp_path / "study"
    assert compare.main(["--out", str(out), "--algorithms", "cse_fsl", "--rounds", "1", "--config", str(f),
                         "--clients", "3", "--no-progress"]) == 0
    cfg = json.loads((out / "cse_fsl" / "config.json").read_text())
    assert (cfg["dataset"], cfg["clients"], cfg["align_epochs"]) == ("synthetic:1x28x28", 3, 2)
    f.write_text('algorithm = "fedavg"\n')  # compare owns the algorithm
    assert compare.main(["--out", str(tmp_path / "x"), "--config", str(f), "--no-progress"]) == 2
    assert "--algorithm: not a per-study training option" in capsys.readouterr().err


def test_compare_codec_variants(tmp_path):
    """--codec ALGO=SPEC: an uplink codec as another variant of the algorithm (its own run, its
    own row), less smashed data than the uncompressed run."""
    out = tmp_path / "codecs"
    argv = ["--out", str(out), "--algorithms", "fsl_sage,splitfed_v2", "--target", "0.3",
            "--codec", "fsl_sage=topk:0.1,int4", "--codec", "splitfed_v2=int2", "--codec", "fsl_sage=int8"] + TINY
    assert compare.main(argv) == 0
    names = ["fsl_sage", "fsl_sage-topk0.1-int4", "fsl_sage-int8", "splitfed_v2", "splitfed_v2-int2"]
    for name in names:
        assert (out / name / "results.json").is_file(), name
    cfg = json.loads((out / "fsl_sage-topk0.1-int4" / "config.json").read_text())
    assert (cfg["uplink"], cfg["quantize"]) == ("topk:0.1,int4", "none")
    assert json.loads((out / "fsl_sage-int8" / "config.json").read_text())["quantize"] == "int8"
    with open(out / "summary.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == names
    smashed = {n: sum(r["bytes_up_smashed"] for r in _metrics(out / n)) for n in names}
    assert smashed["fsl_sage-topk0.1-int4"] * 8 < smashed["fsl_sage"]
    assert smashed["splitfed_v2-int2"] * 8 < smashed["splitfed_v2"]
    md = (out / "summary.md").read_text()
    assert "FSL-SAGE (topk:0.1,int4 uplink)" in md and "SplitFed v2 (int2 uplink)" in md


def test_compare_fedavg_shared_variant(tmp_path, capsys):
    """--fedavg-shared: FedAvg with the authors' shared server half as its own run and row, next to
    the per-client copies; it needs fedavg in the study."""
    out = tmp_path / "fa"
    argv = ["--out", str(out), "--algorithms", "fedavg,splitfed_v2", "--fedavg-shared", "--target", "0.3"] + TINY
    assert compare.main(argv) == 0
    with open(out / "summary.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["splitfed_v2", "fedavg", "fedavg-shared"]
    assert json.loads((out / "fedavg-shared" / "config.json").read_text())["fedavg_server"] == "shared"
    assert json.loads((out / "fedavg" / "config.json").read_text())["fedavg_server"] == "copies"
    shared, v2 = _metrics(out / "fedavg-shared"), _metrics(out / "splitfed_v2")
    assert [r["test_loss"] for r in shared] == [r["test_loss"] for r in v2]
    assert "FedAvg (shared server)" in (out / "summary.md").read_text()
    assert compare.main(["--out", str(tmp_path / "y"), "--algorithms", "fsl_sage", "--fedavg-shared"] + TINY) == 2
    assert "--fedavg-shared: needs fedavg" in capsys.readouterr().err


@pytest.mark.parametrize("codec,msg", [("fedavg=int8", "ALGO in --algorithms"), ("fsl_sage", "ALGO=SPEC"),
                                       ("fsl_sage=topk:7", "topk:F needs"), ("fsl_sage=int8", "already in")])
def test_compare_bad_codec(tmp_path, capsys, codec, msg):
    extra = ["--quantize-sage"] if codec == "fsl_sage=int8" else []
    assert compare.main(["--out", str(tmp_path / "x"), "--algorithms", "fsl_sage", "--codec", codec]
                        + extra + TINY) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
