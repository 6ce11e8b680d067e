"""The cross-run tables of docs/RESULTS.md sections 2-3, from studies made with
``python -m fsl_fast.compare --seeds ...`` (one directory per partition).

    python tools/study_tables.py [--target 0.95] NAME=DIR [NAME=DIR ...]
    e.g. python tools/study_tables.py iid=runs/study-iid dir1=runs/study-dir1 dir0.1=runs/study-dir0.1

Prints, per partition (mean ± sample sd over the seeds, rounds numbered from 0):

1. GiB to the target (and the round), with how many seeds reached it in the runs' rounds;
2. the communication ratio to the target of every baseline over FSL-SAGE, paired by seed;
3. which runs train identically (every round's test accuracy and loss equal, seed by seed);
4. stability: the lowest test accuracy after round 20 and the rounds below target - 2 points
   after round 20.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from codec_study import load_runs  # (tools/ is on sys.path when run as a script)

from fsl_fast.compare import mean_sd

GIB = 2 ** 30
RUN_ORDER = ("fsl_sage", "fsl_sage-int8", "cse_fsl", "splitfed_v1", "splitfed_v2", "fedavg", "fedavg-shared")


def load(study: Path) -> dict[str, dict[int, list[dict]]]:
    """{run: {seed: metrics}}, the section's runs first in their order."""
    runs = load_runs(study)
    return {n: runs[n] for n in RUN_ORDER if n in runs} | {n: r for n, r in runs.items() if n not in RUN_ORDER}


def reach(m: list[dict], target: float) -> tuple[float, int] | None:
    for r in m:
        if r["test_accuracy"] is not None and r["test_accuracy"] >= target:
            return r["comm_bytes_paper"] / GIB, r["round"]
    return None


def tables(studies: dict[str, Path], target: float) -> str:
    data = {name: load(p) for name, p in studies.items()}
    runs = [r for r in RUN_ORDER if any(r in d for d in data.values())]
    out = [f"GiB to {target} (round), mean ± sd over the seeds that reached it; reached/seeds\n",
           "| partition | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for part, d in data.items():
        cells = []
        for r in runs:
            hits = [reach(m, target) for m in d.get(r, {}).values()]
            got = [h for h in hits if h]
            cells.append(f"{mean_sd([g for g, _ in got])} (r{statistics.mean(t for _, t in got):.1f}) "
                         f"{len(got)}/{len(hits)}" if got else f"- 0/{len(hits)}")
        out.append(f"| {part} | " + " | ".join(cells) + " |")
    out += [f"\nCommunication to {target} over FSL-SAGE's, paired by seed (mean, min-max; seeds where both reached it)\n",
            "| partition | " + " | ".join(r for r in runs if r != "fsl_sage") + " |", "|---" * len(runs) + "|"]
    for part, d in data.items():
        cells = []
        base = d.get("fsl_sage", {})
        for r in runs:
            if r == "fsl_sage":
                continue
            ratios = []
            for s, m in d.get(r, {}).items():
                a, b = reach(m, target), reach(base.get(s, []), target)
                if a and b:
                    ratios.append(a[0] / b[0])
            cells.append(f"{statistics.mean(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, n={len(ratios)})"
                         if ratios else "-")
        out.append(f"| {part} | " + " | ".join(cells) + " |")
    out.append("\nIdentical training (every round's test accuracy and loss equal, in every seed)\n")
    for part, d in data.items():
        same = []
        names = list(d)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                seeds = sorted(set(d[a]) & set(d[b]))
                if seeds and all([(r["test_accuracy"], r["test_loss"]) for r in d[a][s]]
                                 == [(r["test_accuracy"], r["test_loss"]) for r in d[b][s]] for s in seeds):
                    same.append(f"{a} = {b} ({len(seeds)} seeds)")
        out.append(f"- {part}: " + ("; ".join(same) if same else "none"))
    out += [f"\nAfter round 20: lowest test accuracy, and rounds below {target - 0.02:.2f} (mean ± sd over seeds)\n",
            "| partition | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for part, d in data.items():
        cells = []
        for r in runs:
            ms_ = d.get(r, {}).values()
            low = [min(x["test_accuracy"] for x in m if x["round"] > 20) for m in ms_ if len(m) > 21]
            below = [sum(x["test_accuracy"] < target - 0.02 for x in m if x["round"] > 20) for m in ms_ if len(m) > 21]
            cells.append(f"{mean_sd(low, '.3f')} / {mean_sd(below, '.1f')}" if low else "-")
        out.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    target = 0.95
    if args[:1] == ["--target"]:
        target, args = float(args[1]), args[2:]
    studies = {}
    for a in args:
        name, sep, path = a.partition("=")
        if not sep or not Path(path).is_dir():
            print(f"study_tables: expected NAME=DIR with an existing DIR, got {a!r}", file=sys.stderr)
            return 2
        studies[name] = Path(path)
    if not studies:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print(tables(studies, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
