"""tools/codec_study.py: paired differences and byte ratios by hand on a made-up study."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("codec_study", ROOT / "tools" / "codec_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(d: Path, accs, smashed):
    d.mkdir(parents=True)
    rows = [{"round": i, "test_accuracy": a, "bytes_up_smashed": b} for i, (a, b) in enumerate(zip(accs, smashed))]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paired_analysis_by_hand(tmp_path, capsys):
    study = tmp_path / "s"
    for seed, (base_acc, codec_acc) in enumerate([(0.90, 0.89), (0.80, 0.82), (0.70, 0.65)]):
        _write(study / "fsl_sage" / f"seed-{seed}", [0.5, base_acc], [400, 400])
        _write(study / "fsl_sage-topk0.1" / f"seed-{seed}", [0.5, codec_acc], [10, 10 * (seed + 1)])
    rows = {r["run"]: r for r in _tool().analyse(study)}
    r = rows["fsl_sage-topk0.1"]
    assert r["seeds"] == 3
    assert r["diff"] == pytest.approx((-1.0 + 2.0 - 5.0) / 3)
    assert r["ratio"] == pytest.approx((800 / 20 + 800 / 30 + 800 / 40) / 3)
    assert rows["fsl_sage"]["diff"] == 0.0
    assert _tool().main([str(study)]) == 0
    out = capsys.readouterr().out
    assert "largest compression within 1 point on average: fsl_sage-topk0.1" not in out  # -1.33 points
    assert "fsl_sage: largest compression within 1 point on average: none" in out
