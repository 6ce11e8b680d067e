"""docs/RESULTS.md section 4's bytes-per-round table is what ``python -m fsl_fast.comm`` prints
(the paper's CIFAR-10 / ResNet-18 setting, 11 rounds): every cell, every algorithm."""
from __future__ import annotations

from pathlib import Path

from fsl_fast.comm import main

ROOT = Path(__file__).resolve().parents[1]


def _table(text: str, header_start: str) -> list[str]:
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    out = []
    for line in lines[i:]:
        if not line.startswith("|"):
            break
        out.append(line.strip())
    return out


def test_bytes_per_round_table_matches_the_dry_run(capsys):
    assert main([]) == 0
    printed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    doc = _table((ROOT / "docs" / "RESULTS.md").read_text(), "| algorithm | bytes/round (paper) |")
    assert doc == printed, "docs/RESULTS.md section 4 differs from python -m fsl_fast.comm"
