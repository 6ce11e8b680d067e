"""The alignment regime of FSL-SAGE on the embedded data (docs/RESULTS.md, "The alignment regime").

Three variants of FSL-SAGE per partition and seed, all with ``--log-estimate-quality``:

- ``buffer-1000``: the default 1,000-row alignment buffer, which on MNIST-5k holds about ten rounds
  of uploads (96 rows per client per round) when the server aligns every 10 rounds;
- ``buffer-96``: a buffer of one round of uploads, as in the paper's CIFAR-10 setting, where a round
  fills the buffer;
- ``hold-norm``: the default buffer with ``--hold-estimate-norm``, which removes the jump of the
  estimate's norm at each alignment (the Adam question: does that jump, against Adam's slowly
  moving second moment, cause the dip after an alignment?).

    python tools/alignment_study.py --out runs/alignment [--seeds 0,1,2] [--rounds 30]
        [--partitions iid,dir0.1] [--plot docs/results/alignment-regime.png]

Finished runs (results.json with the asked rounds) are reused. Prints a Markdown table per
partition: final and best test accuracy (mean ± sd over seeds), the estimate's cosine with the
true gradient and its norm ratio |estimate| / |true| before and after the alignments after round
0 (mean over clients, alignments and seeds), and the averaged client model's update norm in the
rounds around the second alignment (rounds 9-12), with the test accuracy there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fsl_fast.compare import mean_sd

VARIANTS = {
    "buffer-1000": [],
    "buffer-96": ["--buffer-size", "96"],
    "hold-norm": ["--hold-estimate-norm"],
}
PARTITIONS = {"iid": ["--partition", "iid"], "dir0.1": ["--partition", "dirichlet", "--alpha", "0.1"]}
COMMON = ["--fused", "--threads", "1", "--no-progress", "--log-estimate-quality"]


def _metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def _done(d: Path, rounds: int) -> bool:
    f = d / "results.json"
    return f.is_file() and json.loads(f.read_text()).get("rounds_completed") == rounds


def run_all(out: Path, seeds: list[int], rounds: int, partitions: list[str]) -> None:
    from fsl_fast.train import main as train

    for part in partitions:
        for name, extra in VARIANTS.items():
            for s in seeds:
                d = out / part / name / f"seed-{s}"
                if _done(d, rounds):
                    continue
                args = ["--rounds", str(rounds), "--seed", str(s), "--out", str(d)] + PARTITIONS[part] + extra + COMMON
                if (d / "config.json").is_file():
                    args = ["--resume", str(d), "--rounds", str(rounds), "--no-progress"]
                print(f"{part} {name} seed {s}", file=sys.stderr, flush=True)
                if train(args) != 0:
                    raise SystemExit(f"run {d} failed")


def summarize(out: Path, seeds: list[int], partitions: list[str]) -> dict:
    table = {}
    for part in partitions:
        for name in VARIANTS:
            runs = [_metrics(out / part / name / f"seed-{s}") for s in seeds]
            q = [e for m in runs for r in m if r["round"] > 0 for e in r.get("estimate_quality", [])]
            table[part, name] = {
                "final": [m[-1]["test_accuracy"] for m in runs],
                "best": [max(r["test_accuracy"] for r in m) for m in runs],
                "cos_before": [e["cosine_before"] for e in q], "cos_after": [e["cosine_after"] for e in q],
                "nr_before": [e["norm_ratio_before"] for e in q], "nr_after": [e["norm_ratio_after"] for e in q],
                "update": {t: [m[t]["client_update_norm"] for m in runs if len(m) > t] for t in range(len(runs[0]))},
                "acc": {t: [m[t]["test_accuracy"] for m in runs if len(m) > t] for t in range(len(runs[0]))},
            }
    return table


def markdown(table: dict, partitions: list[str], seeds: list[int]) -> str:
    lines = []
    for part in partitions:
        lines += [f"\n{part}, seeds {','.join(map(str, seeds))}\n",
                  "| variant | final acc | best acc | test acc, rounds 9 / 10 / 11 / 12 | cosine before -> after | "
                  "norm ratio before -> after | client update norm, rounds 9 / 10 / 11 / 12 |",
                  "|---|---|---|---|---|---|---|"]
        for name in VARIANTS:
            r = table[part, name]
            upd = " / ".join(f"{statistics.mean(r['update'][t]):.4f}" for t in (9, 10, 11, 12) if r["update"].get(t))
            acc = " / ".join(f"{statistics.mean(r['acc'][t]):.3f}" for t in (9, 10, 11, 12) if r["acc"].get(t))
            lines.append(f"| {name} | {mean_sd(r['final'])} | {mean_sd(r['best'])} | {acc} | "
                         f"{statistics.mean(r['cos_before']):.3f} -> {statistics.mean(r['cos_after']):.3f} | "
                         f"{statistics.mean(r['nr_before']):.2f} -> {statistics.mean(r['nr_after']):.2f} | {upd} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, partitions: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(partitions), figsize=(5.2 * len(partitions), 6.4), dpi=100, squeeze=False)
    for j, part in enumerate(partitions):
        for name, style in zip(VARIANTS, ("-", "--", ":")):
            r = table[part, name]
            ts = sorted(r["acc"])
            mean = [statistics.mean(r["acc"][t]) for t in ts]
            lo = [min(r["acc"][t]) for t in ts]
            hi = [max(r["acc"][t]) for t in ts]
            axes[0][j].plot(ts, mean, linestyle=style, label=name)
            axes[0][j].fill_between(ts, lo, hi, alpha=0.15)
            axes[1][j].plot(ts, [statistics.mean(r["update"][t]) for t in ts], linestyle=style, label=name)
        axes[0][j].set_title(f"FSL-SAGE, {part}: test accuracy (mean, min-max over seeds)", fontsize=9)
        axes[0][j].set_ylim(0.6, 1.0)
        axes[1][j].set_title("averaged client model's update norm per round", fontsize=9)
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("round (alignments at 0, 10, 20, ...)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/alignment_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--partitions", default="iid,dir0.1")
    p.add_argument("--plot", default=None, help="write the accuracy / update-norm plot here")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    parts = a.partitions.split(",")
    bad = [x for x in parts if x not in PARTITIONS]
    if bad or a.rounds < 1:
        p.error(f"--partitions: choose from {', '.join(PARTITIONS)}; --rounds >= 1")
    out = Path(a.out)
    run_all(out, seeds, a.rounds, parts)
    table = summarize(out, seeds, parts)
    text = markdown(table, parts, seeds)
    (out / "summary.md").write_text(text)
    print(text)
    if a.plot:
        plot(table, parts, Path(a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
