"""Paired analysis of a codec study made with ``python -m fsl_fast.compare --seeds ... --codec ...``
(docs/RESULTS.md section 5): for every codec variant, per seed against the same algorithm's
uncompressed run of that seed, the difference in final test accuracy (mean and sample standard
deviation over the seeds, in points) and the smashed-data bytes of the whole run (uncompressed /
variant), then the largest compression whose mean difference is within one point.

    python tools/codec_study.py runs/codecs-iid [runs/codecs-dir0.1 ...]
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load_runs(study: Path) -> dict[str, dict[int, list[dict]]]:
    out: dict[str, dict[int, list[dict]]] = {}
    for run in sorted(p for p in study.iterdir() if p.is_dir()):
        for seed_dir in sorted(run.glob("seed-*")):
            f = seed_dir / "metrics.jsonl"
            if f.is_file():
                out.setdefault(run.name, {})[int(seed_dir.name.split("-")[1])] = [
                    json.loads(line) for line in f.read_text().splitlines()]
    return out


def analyse(study: Path) -> list[dict]:
    runs = load_runs(study)
    rows = []
    for name, seeds in runs.items():
        algo = name.split("-")[0]
        base = runs.get(algo)
        if base is None:
            continue
        common = sorted(s for s in seeds if s in base)
        diff = [100 * (seeds[s][-1]["test_accuracy"] - base[s][-1]["test_accuracy"]) for s in common]
        ratio = [sum(r["bytes_up_smashed"] for r in base[s]) / sum(r["bytes_up_smashed"] for r in seeds[s])
                 for s in common]
        rows.append({"run": name, "algorithm": algo, "seeds": len(common),
                     "final": statistics.mean(seeds[s][-1]["test_accuracy"] for s in common),
                     "diff": statistics.mean(diff), "diff_sd": statistics.stdev(diff) if len(diff) > 1 else 0.0,
                     "ratio": statistics.mean(ratio)})
    return rows


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for study in paths:
        rows = analyse(study)
        print(f"\n{study}\n")
        print("| run | seeds | final acc (mean) | paired difference (points) | smashed data: fp32 / this |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['run']} | {r['seeds']} | {r['final']:.4f} | {r['diff']:+.2f} ± {r['diff_sd']:.2f} | "
                  f"{r['ratio']:.1f}x |")
        for algo in sorted({r["algorithm"] for r in rows}):
            ok = [r for r in rows if r["algorithm"] == algo and r["run"] != algo and r["diff"] >= -1.0]
            best = max(ok, key=lambda r: r["ratio"], default=None)
            print(f"\n{algo}: largest compression within 1 point on average: "
                  + (f"{best['run']} ({best['ratio']:.1f}x, {best['diff']:+.2f} points)" if best else "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
