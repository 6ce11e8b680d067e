"""``python -m fsl_fast.compare``: the five algorithms side by side on one configuration.

Trains every algorithm (fused engine by default) through ``fsl_fast.runner.train`` into
``OUT/<algorithm>/`` (``OUT/fsl_sage-int8/`` for the quantized-uplink variant), then writes

- ``OUT/summary.md`` and ``OUT/summary.csv``: per run the best test accuracy, the accuracy at a
  communication budget (the last round whose cumulative paper-convention bytes are <= the budget),
  the communication (GiB, paper convention) at the first round that reaches a target accuracy,
  rounds and wall time;
- ``OUT/accuracy_vs_gib.png``: test accuracy against cumulative GiB, one curve per run.

Finished runs are reused: a run directory whose ``config.json`` equals the requested configuration
(apart from ``rounds``, ``threads`` and the other keys ``--resume`` may change) is not retrained; one
with fewer rounds than requested, or interrupted, is continued from its checkpoint; one with more
rounds is cut to the requested rounds in the summary. So a long study can be stopped and resumed by
running the same command again. A directory holding a run of another configuration is an error.

Communication follows the authors' convention (ALGORITHM.md §3-§6): labels and the initial model
broadcast are not counted; 1 GiB = 2**30 bytes (the authors' figures label it GB).

Training options not listed below (``--dataset``, ``--clients``, ``--seed``, ``--threads``, ``--lr``,
...) are those of ``python -m fsl_fast.train`` and apply to every run.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fsl_fast.faults import EXIT_DIVERGED, EXIT_IO, Divergence, RunIOError
from fsl_fast.config import ALGORITHMS, PARTITIONS, Config, ConfigError
from fsl_fast.ledger import GIB

LABELS = {"fsl_sage": "FSL-SAGE", "cse_fsl": "CSE-FSL", "splitfed_v1": "SplitFed v1",
          "splitfed_v2": "SplitFed v2", "fedavg": "FedAvg"}
# The authors' figure order: the proposed method first, then the baselines.
ORDER = ("fsl_sage", "cse_fsl", "splitfed_v1", "splitfed_v2", "fedavg")
# Options of python -m fsl_fast.train that this command owns or that make no sense per study.
OWNED = ("algorithm", "rounds", "fused", "quantize", "partition", "alpha", "out", "resume", "fedavg_server",
         "distributed", "comm_budget_gib")
CSV_COLUMNS = ("run", "algorithm", "quantize", "rounds", "best_test_accuracy", "best_round",
               "final_test_accuracy", "budget_gib", "acc_at_budget", "acc_at_budget_round", "target",
               "reached_target", "gib_to_target", "round_to_target", "total_gib", "gib_per_round",
               "wall_seconds", "seconds_per_round")


@dataclass
class Variant:
    """One run of the study: an algorithm, with or without a compressed uplink (FedAvg also with
    the authors' shared server half)."""

    algorithm: str
    quantize: str = "none"  # the uplink codec (--uplink SPEC; int8/int4 as --quantize)
    fedavg_server: str = "copies"

    @property
    def name(self) -> str:
        slug = self.quantize.replace(":", "").replace(",", "-")
        base = self.algorithm + ("-shared" if self.fedavg_server == "shared" else "")
        return base if self.quantize == "none" else f"{base}-{slug}"

    @property
    def label(self) -> str:
        base = LABELS[self.algorithm] + (" (shared server)" if self.fedavg_server == "shared" else "")
        return base if self.quantize == "none" else f"{base} ({self.quantize} uplink)"

    def codec_options(self) -> dict:
        """Config keys of the variant: --quantize for int8/int4 (as studies before --uplink), else
        --uplink; --fedavg-server for the shared-server FedAvg."""
        out = {"fedavg_server": self.fedavg_server} if self.fedavg_server != "copies" else {}
        if self.quantize in ("none", "int8", "int4"):
            return {**out, "quantize": self.quantize}
        return {**out, "uplink": self.quantize}


@dataclass
class _Seeded(Variant):
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{super().label}, seed {self.seed}"


@dataclass
class RunSummary:
    variant: Variant
    rounds: int
    best_acc: float
    best_round: int
    final_acc: float
    acc_at_budget: float | None
    acc_at_budget_round: int | None
    gib_to_target: float | None
    round_to_target: int | None
    total_gib: float
    wall_seconds: float
    curve: list[tuple[float, float]] = field(repr=False, default_factory=list)  # (GiB, accuracy)


# -- numbers from one run's metrics -------------------------------------------------------------
def first_reaching(metrics: list[dict], target: float) -> dict | None:
    """The first round whose test accuracy is >= target, or None."""
    return next((m for m in metrics if m["test_accuracy"] >= target), None)


def last_within_budget(metrics: list[dict], budget_bytes: float) -> dict | None:
    """The last round whose cumulative paper-convention bytes are <= the budget, or None when even
    round 0 exceeds it. Bytes grow every round, so this is the round just before crossing."""
    within = [m for m in metrics if m["comm_bytes_paper"] <= budget_bytes]
    return within[-1] if within else None


def summarize_run(variant: Variant, metrics: list[dict], target: float, budget_gib: float) -> RunSummary:
    if not metrics:
        raise ValueError(f"{variant.name}: no rounds in metrics")
    every = metrics
    metrics = [m for m in every if m.get("test_accuracy") is not None]  # evaluated rounds
    best = max(metrics, key=lambda m: m["test_accuracy"])  # first of equal maxima
    hit = first_reaching(metrics, target)
    at = last_within_budget(metrics, budget_gib * GIB)
    return RunSummary(
        variant=variant,
        rounds=len(every),
        best_acc=best["test_accuracy"],
        best_round=best["round"],
        final_acc=metrics[-1]["test_accuracy"],
        acc_at_budget=None if at is None else at["test_accuracy"],
        acc_at_budget_round=None if at is None else at["round"],
        gib_to_target=None if hit is None else hit["comm_bytes_paper"] / GIB,
        round_to_target=None if hit is None else hit["round"],
        total_gib=every[-1]["comm_bytes_paper"] / GIB,
        wall_seconds=sum(m["seconds_round"] for m in every),
        curve=[(m["comm_bytes_paper"] / GIB, m["test_accuracy"]) for m in metrics],
    )


# -- running (or reusing) the runs ---------------------------------------------------------------
def _read_metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def cut_to(metrics: list[dict], cfg: Config) -> list[dict]:
    """The rounds a fresh run of ``cfg`` would have: at most ``cfg.rounds``, and with a
    communication budget, up to the first round that reaches it (as the runner stops)."""
    m = metrics[:cfg.rounds]
    if cfg.comm_budget_gib is not None:
        hit = next((i for i, r in enumerate(m) if r["comm_bytes_paper"] >= cfg.comm_budget_gib * GIB), None)
        if hit is not None:
            m = m[:hit + 1]
    return m


def config_differences(stored: dict, cfg: Config) -> list[str]:
    """Keys whose stored value differs from ``cfg``, ignoring those a resume may change."""
    from fsl_fast.train import RESUME_OVERRIDABLE

    want = cfg.to_dict()
    keys = sorted((set(stored) | set(want)) - {"format_version"})
    return [k for k in keys if k not in RESUME_OVERRIDABLE and stored.get(k) != want.get(k)]


def ensure_run(cfg: Config, out: Path, progress: bool, log) -> tuple[list[dict], str]:
    """Make ``out`` hold at least the rounds a fresh run of ``cfg`` would have; returns (those
    rounds' metrics, what was done: "trained" | "reused" | "continued")."""
    from fsl_fast import runner

    cfg_file = out / "config.json"
    if cfg_file.is_file():
        diff = config_differences(json.loads(cfg_file.read_text()), cfg)
        if diff:
            raise ConfigError(f"--out: {out} holds a run with other settings ({', '.join(diff)}); "
                              "use another --out or remove that directory")
        done = cut_to(_read_metrics(out), cfg)
        budget = cfg.comm_budget_gib
        complete = len(done) == cfg.rounds or (
            budget is not None and bool(done) and done[-1]["comm_bytes_paper"] >= budget * GIB)
        if complete and (out / "results.json").is_file():
            return done, "reused"
        if not (out / runner.CHECKPOINT).is_file():
            raise ConfigError(f"--out: {out} has {len(done)} rounds but no checkpoint to continue from; "
                              "remove that directory")
        log(f"{out.name}: continuing from round {len(done)} to {cfg.rounds}")
        runner.train(cfg, out, resume=True, progress=progress)
        return cut_to(_read_metrics(out), cfg), "continued"
    if (out / "metrics.jsonl").exists():
        raise ConfigError(f"--out: {out} has metrics but no config.json; remove that directory")
    runner.train(cfg, out, resume=False, progress=progress)
    return cut_to(_read_metrics(out), cfg), "trained"


# -- tables ------------------------------------------------------------------------------------
def _fmt(v, spec: str, missing: str) -> str:
    """``spec`` "r" is repr (a float's shortest exact form)."""
    if v is None:
        return missing
    return repr(v) if spec == "r" else format(v, spec)


def markdown_table(rows: list[RunSummary], target: float, budget_gib: float) -> str:
    head = ("| run | rounds | best test acc (round) | final acc | acc at budget "
            f"{budget_gib:.4g} GiB (round) | GiB to {target:.4g} (round) | total GiB | GiB/round "
            "| wall s | s/round |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        at = ("- (round 0 exceeds it)" if r.acc_at_budget is None
              else f"{r.acc_at_budget:.4f} ({r.acc_at_budget_round})")
        hit = ("not reached" if r.gib_to_target is None
               else f"{r.gib_to_target:.4f} ({r.round_to_target})")
        lines.append(f"| {r.variant.label} | {r.rounds} | {r.best_acc:.4f} ({r.best_round}) | "
                     f"{r.final_acc:.4f} | {at} | {hit} | {r.total_gib:.4f} | "
                     f"{r.total_gib / r.rounds:.5f} | {r.wall_seconds:.1f} | {r.wall_seconds / r.rounds:.2f} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[RunSummary], target: float, budget_gib: float) -> str:
    """Numbers at full precision; a target not reached leaves gib_to_target and round_to_target
    empty (reached_target = False), a budget below round 0's bytes leaves acc_at_budget empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([r.variant.name, r.variant.algorithm, r.variant.quantize, r.rounds, repr(r.best_acc),
                    r.best_round, repr(r.final_acc), repr(budget_gib), _fmt(r.acc_at_budget, "r", ""),
                    _fmt(r.acc_at_budget_round, "d", ""), repr(target), r.gib_to_target is not None,
                    _fmt(r.gib_to_target, "r", ""), _fmt(r.round_to_target, "d", ""), repr(r.total_gib),
                    repr(r.total_gib / r.rounds), f"{r.wall_seconds:.3f}", f"{r.wall_seconds / r.rounds:.4f}"])
    return buf.getvalue()


def ranking(rows: list[RunSummary]) -> str:
    """Runs ordered by communication to the target; those that never reach it last."""
    reached = sorted((r for r in rows if r.gib_to_target is not None), key=lambda r: r.gib_to_target)
    text = " < ".join(f"{r.variant.label} {r.gib_to_target:.4f} GiB" for r in reached)
    missed = ", ".join(r.variant.label for r in rows if r.gib_to_target is None)
    if missed:
        text += ("; " if text else "") + f"not reached: {missed}"
    return text


# -- plot --------------------------------------------------------------------------------------
_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 2)))


def _linestyle(v, variants):
    """Solid for an algorithm's first run (the uncompressed one), then one dash pattern per other
    variant of the same algorithm (codecs, FedAvg's shared server)."""
    same = [w.name for w in variants if w.algorithm == v.algorithm]
    return _LINESTYLES[same.index(v.name) % len(_LINESTYLES)]


STYLE = {"fsl_sage": ("tab:red", "o"), "cse_fsl": ("tab:blue", "s"), "splitfed_v1": ("tab:green", "^"),
         "splitfed_v2": ("tab:olive", "v"), "fedavg": ("tab:purple", "D")}


def plot(rows: list[RunSummary], path: Path, title: str, target: float, budget_gib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x for r in rows for x, _ in r.curve]
    # The runs' communication per round spans about a decade on the embedded data (FSL-SAGE vs
    # SplitFed); a log axis keeps the cheap curves from being squeezed against the y axis.
    log_x = min(xs) > 0 and max(xs) / min(xs) > 20
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for r in rows:
        color, marker = STYLE[r.variant.algorithm]
        gib, acc = zip(*r.curve)
        ax.plot(gib, acc, color=color, marker=marker, markersize=2.5, linewidth=1.2,
                linestyle=_linestyle(r.variant, [q.variant for q in rows]), label=r.variant.label)
    ax.axhline(target, color="gray", linewidth=0.8, linestyle=":")
    ax.axvline(budget_gib, color="gray", linewidth=0.8, linestyle="-.")
    if log_x:
        ax.set_xscale("log")
    lo = min(a for r in rows for _, a in r.curve)
    ax.set_ylim(max(0.0, min(lo, target) - 0.02), 1.0)
    ax.set_xlabel("communication (GiB, paper convention)" + (", log scale" if log_x else ""))
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both" if log_x else "major")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- CLI ---------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: "--algorithm" (a training option refused here) must not pass for "--algorithms"
    p = _Parser(prog="python -m fsl_fast.compare", description=__doc__, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default=None, help="study directory (default runs/compare-<time>); rerun with the same "
      "--out to resume")
    a("--rounds", type=int, default=40, help="rounds per algorithm (default 40)")
    a("--rounds-for", action="append", default=[], metavar="RUN=N",
      help="rounds for one run, e.g. fedavg=30 or fsl_sage-int8=60 (repeatable)")
    a("--algorithms", default=",".join(ORDER), help="comma-separated subset (default all five)")
    a("--partition", choices=PARTITIONS, default="iid")
    a("--alpha", type=float, default=None, help="Dirichlet concentration (with --partition dirichlet)")
    a("--target", type=float, default=0.95, help="target test accuracy (default 0.95)")
    a("--budget-gib", type=float, default=None, help="communication budget for 'accuracy at budget' "
      "(default: the least total GiB among the runs, i.e. the cheapest run's last round)")
    a("--stop-at-budget", action="store_true",
      help="stop each run when it reaches --budget-gib (the authors' protocol); --rounds is then a cap")
    a("--quantize-sage", nargs="?", const="int8", default=None, choices=("int8", "int4"),
      help="also run FSL-SAGE with this uplink compression (int8 when given without a value)")
    a("--codec", action="append", default=[], metavar="ALGO=SPEC",
      help="also run ALGO with the uplink codec SPEC (as fsl_fast.train --uplink, e.g. "
           "fsl_sage=topk:0.05,int4); repeatable")
    a("--fedavg-shared", action="store_true",
      help="also run FedAvg with one shared server half (--fedavg-server shared: as the FSL-SAGE "
           "authors' code runs FedAvg); needs fedavg in --algorithms")
    a("--engine", choices=("fused", "reference"), default="fused")
    a("--seeds", default=None, metavar="S1,S2,...",
      help="run every configuration once per seed (into OUT/<run>/seed-<S>) and report mean and "
           "spread over the seeds; the plot shows the mean curve and the min-max band")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def _parse(argv) -> tuple[argparse.Namespace, dict]:
    from fsl_fast import train as train_cli

    args, rest = build_parser().parse_known_args(argv)
    tp = train_cli.build_parser()
    tp.prog = "python -m fsl_fast.compare (training options)"
    tp.allow_abbrev = False
    targs = tp.parse_args(rest)
    given = {k: v for k, v in vars(targs).items() if v is not None and k != "no_progress"}
    if "config" in given:  # --config FILE: training options shared by every run (command line wins)
        given = {**train_cli.read_config_file(given.pop("config")), **given}
    owned = sorted(k for k in given if k in OWNED)
    if owned:
        raise ConfigError(f"--{owned[0].replace('_', '-')}: not a per-study training option here "
                          "(compare sets it; see python -m fsl_fast.compare --help)")
    return args, given


def _per_run_rounds(specs: list[str], default: int, names: set[str]) -> dict[str, int]:
    out = {}
    for s in specs:
        name, sep, n = s.partition("=")
        if not sep or name not in names or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--rounds-for: expected RUN=N with RUN in {sorted(names)} and N >= 1, got {s!r}")
        out[name] = int(n)
    return {name: out.get(name, default) for name in names}


def main(argv=None) -> int:
    try:
        args, given = _parse(argv)
        algos = [s for s in args.algorithms.split(",") if s]
        bad = [s for s in algos if s not in ALGORITHMS]
        if bad or not algos:
            raise ConfigError(f"--algorithms: unknown {bad or 'empty list'} (choose from {', '.join(ALGORITHMS)})")
        if args.rounds < 1:
            raise ConfigError(f"--rounds: must be a positive integer, got {args.rounds}")
        if not (0.0 < args.target <= 1.0):
            raise ConfigError(f"--target: must be in (0, 1], got {args.target}")
        if args.budget_gib is not None and not (args.budget_gib > 0 and math.isfinite(args.budget_gib)):
            raise ConfigError(f"--budget-gib: must be a positive number, got {args.budget_gib}")
        if args.stop_at_budget and args.budget_gib is None:
            raise ConfigError("--stop-at-budget: needs --budget-gib")
        variants = [Variant(a) for a in ORDER if a in algos]
        if args.quantize_sage:
            if "fsl_sage" not in algos:
                raise ConfigError("--quantize-sage: needs fsl_sage in --algorithms")
            variants.insert(1, Variant("fsl_sage", args.quantize_sage))
        if args.fedavg_shared:
            if "fedavg" not in algos:
                raise ConfigError("--fedavg-shared: needs fedavg in --algorithms")
            variants.insert(variants.index(Variant("fedavg")) + 1, Variant("fedavg", fedavg_server="shared"))
        for item in args.codec:
            algo, sep, spec = item.partition("=")
            if not sep or algo not in algos or not spec:
                raise ConfigError(f"--codec: expected ALGO=SPEC with ALGO in --algorithms, got {item!r}")
            v = Variant(algo, spec)
            if v.name in {w.name for w in variants}:
                raise ConfigError(f"--codec: {item!r} is already in the study")
            last = max(i for i, w in enumerate(variants) if w.algorithm == algo)
            variants.insert(last + 1, v)
        rounds = _per_run_rounds(args.rounds_for, args.rounds, {v.name for v in variants})
        seeds = _seeds(args.seeds, given)
        out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        cfgs = {}
        for v in variants:
            for s in seeds or [None]:
                kw = dict(given, **({"seed": s} if s is not None else {}))
                cfgs[v.name, s] = Config(**kw, algorithm=v.algorithm, rounds=rounds[v.name],
                                         partition=args.partition, alpha=args.alpha, **v.codec_options(),
                                         fused=args.engine == "fused",
                                         comm_budget_gib=args.budget_gib if args.stop_at_budget else None).resolved()
        base = cfgs[variants[0].name, seeds[0] if seeds else None]
        if base.data_dir is not None and not Path(base.data_dir).is_dir():
            raise ConfigError(f"--data-dir: {base.data_dir} is not a directory")
        out.mkdir(parents=True, exist_ok=True)

        def log(msg):
            print(msg, file=sys.stderr, flush=True)

        metrics = {}
        for (name, s), cfg in cfgs.items():
            where = out / name if s is None else out / name / f"seed-{s}"
            m, how = ensure_run(cfg, where, progress=not args.no_progress, log=log)
            log(f"{name}{'' if s is None else f' seed {s}'}: {how}, {len(m)} rounds, best test accuracy "
                f"{max(r['test_accuracy'] for r in m if r['test_accuracy'] is not None):.4f}, {m[-1]['comm_bytes_paper'] / GIB:.4f} GiB")
            metrics[name, s] = m
        budget = args.budget_gib
        if budget is None:
            budget = min(m[-1]["comm_bytes_paper"] for m in metrics.values()) / GIB
        if seeds:
            per_seed = {(v.name, s): summarize_run(v, metrics[v.name, s], args.target, budget)
                        for v in variants for s in seeds}
            write_seed_summary(out, variants, seeds, per_seed, base, args, budget, argv)
            rows = [per_seed[v.name, seeds[0]] for v in variants]
            print(json.dumps({"out": str(out), "budget_gib": budget, "target": args.target, "seeds": seeds,
                              "gib_to_target": {f"{n}/seed-{s}": r.gib_to_target for (n, s), r in per_seed.items()}}))
            return 0
        rows = [summarize_run(v, metrics[v.name, None], args.target, budget) for v in variants]
        write_summary(out, rows, base, args, budget, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Divergence as e:
        print(f"error: {e}; the run's last completed round is checkpointed", file=sys.stderr)
        return EXIT_DIVERGED
    except RunIOError as e:
        print(f"error: {e}; finished rounds are checkpointed: run the same command to continue",
              file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print("interrupted: finished rounds are checkpointed; run the same command to continue",
              file=sys.stderr)
        return 130
    print(json.dumps({"out": str(out), "budget_gib": budget, "target": args.target,
                      "gib_to_target": {r.variant.name: r.gib_to_target for r in rows}}))
    return 0


def _seeds(spec: str | None, given: dict) -> list[int] | None:
    if spec is None:
        return None
    if "seed" in given:
        raise ConfigError("--seeds: give either --seed or --seeds")
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated non-negative integers, got {spec!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct non-negative integers, got {spec!r}")
    return seeds


def spread(values: list) -> dict | None:
    """Mean, sample standard deviation (0 for one value), min and max of the values that are not
    None, and how many there were; None when there are none."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(v), "max": max(v), "n": len(v)}


def _ms(s: dict | None, spec: str = ".4f") -> str:
    if s is None:
        return "-"
    return f"{format(s['mean'], spec)} ± {format(s['sd'], spec)}"


def mean_sd(values: list, spec: str = ".4f") -> str:
    """``mean ± sample sd`` of the values (see :func:`spread`), or "-" when there are none."""
    return _ms(spread(values), spec)


SEED_COLUMNS = ("run", "seeds", "best_mean", "best_sd", "final_mean", "final_sd", "acc_at_budget_mean",
                "acc_at_budget_sd", "reached_target", "gib_to_target_mean", "gib_to_target_sd",
                "gib_to_target_min", "gib_to_target_max", "total_gib_mean")


def write_seed_summary(out: Path, variants, seeds, per_seed: dict, cfg: Config, args, budget: float, argv) -> None:
    """summary.md: mean ± sample sd over the seeds per run, then every (run, seed); summary.csv:
    the aggregates; summary_per_seed.csv: the single runs' columns (run = NAME/seed-S);
    accuracy_vs_gib.png: mean curves with min-max bands."""
    cmd = " ".join(["python -m fsl_fast.compare"] + list(sys.argv[1:] if argv is None else argv))
    agg = {}
    for v in variants:
        rs = [per_seed[v.name, s] for s in seeds]
        agg[v.name] = {"best": spread([r.best_acc for r in rs]), "final": spread([r.final_acc for r in rs]),
                       "at_budget": spread([r.acc_at_budget for r in rs]),
                       "gib": spread([r.gib_to_target for r in rs]), "total": spread([r.total_gib for r in rs])}
    head = (f"| run | seeds | best test acc | final acc | acc at budget {budget:.4g} GiB | reached "
            f"{args.target:.4g} | GiB to {args.target:.4g} (over those that reached it) | total GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in variants:
        a = agg[v.name]
        reached = a["gib"]["n"] if a["gib"] else 0
        lines.append(f"| {v.label} | {len(seeds)} | {_ms(a['best'])} | {_ms(a['final'])} | {_ms(a['at_budget'])} | "
                     f"{reached}/{len(seeds)} | {_ms(a['gib'])} | {a['total']['mean']:.4f} |")
    rows = [per_seed[v.name, s] for v in variants for s in seeds]
    labelled = [RunSummary(**{**r.__dict__, "variant": _Seeded(v.algorithm, v.quantize, v.fedavg_server, seed=s)})
                for r, (v, s) in zip(rows, [(v, s) for v in variants for s in seeds])]
    md = [f"# Comparison over seeds {', '.join(map(str, seeds))}: {_setting(cfg, args.engine)}", "",
          f"Command: `{cmd}`", "",
          f"Mean ± sample standard deviation over the seeds. Target test accuracy {args.target:g}; "
          f"communication budget {budget:.4f} GiB. GiB = 2^30 bytes, paper convention.", "",
          "\n".join(lines), "", "## Every run", "",
          markdown_table(labelled, args.target, budget)]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SEED_COLUMNS)
    for v in variants:
        a = agg[v.name]
        g = a["gib"]
        w.writerow([v.name, len(seeds), repr(a["best"]["mean"]), repr(a["best"]["sd"]), repr(a["final"]["mean"]),
                    repr(a["final"]["sd"]), "" if a["at_budget"] is None else repr(a["at_budget"]["mean"]),
                    "" if a["at_budget"] is None else repr(a["at_budget"]["sd"]), 0 if g is None else g["n"],
                    "" if g is None else repr(g["mean"]), "" if g is None else repr(g["sd"]),
                    "" if g is None else repr(g["min"]), "" if g is None else repr(g["max"]),
                    repr(a["total"]["mean"])])
    (out / "summary.csv").write_text(buf.getvalue())
    per = csv_text(rows, args.target, budget).splitlines()
    named = [per[0]] + [f"{v.name}/seed-{s}," + line.split(",", 1)[1]
                        for (v, s), line in zip([(v, s) for v in variants for s in seeds], per[1:])]
    (out / "summary_per_seed.csv").write_text("\n".join(named) + "\n")
    _plot_seeds(variants, seeds, per_seed, out / "accuracy_vs_gib.png", cfg, args, budget)


def _plot_seeds(variants, seeds, per_seed, path: Path, cfg, args, budget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    xs_all = []
    for v in variants:
        curves = [per_seed[v.name, s].curve for s in seeds]
        n = min(len(c) for c in curves)
        gib = [sum(c[i][0] for c in curves) / len(curves) for i in range(n)]
        accs = [[c[i][1] for c in curves] for i in range(n)]
        mean = [sum(a) / len(a) for a in accs]
        color, marker = STYLE[v.algorithm]
        ax.plot(gib, mean, color=color, marker=marker, markersize=2.5, linewidth=1.2,
                linestyle=_linestyle(v, variants), label=f"{v.label} (mean of {len(seeds)})")
        ax.fill_between(gib, [min(a) for a in accs], [max(a) for a in accs], color=color, alpha=0.15, linewidth=0)
        xs_all += gib
    ax.axhline(args.target, color="gray", linewidth=0.8, linestyle=":")
    ax.axvline(budget, color="gray", linewidth=0.8, linestyle="-.")
    if min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("communication (GiB, paper convention)")
    ax.set_ylabel("test accuracy (band: min-max over seeds)")
    ax.set_title(f"{cfg.dataset}, {cfg.model}, {cfg.clients} clients, seeds {', '.join(map(str, seeds))}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _setting(cfg: Config, engine: str) -> str:
    part = {"iid": "iid", "shards": f"shards({cfg.shards_per_client} per client)"}.get(
        cfg.partition) or f"dirichlet(alpha={cfg.alpha:g})"
    return (f"{cfg.dataset}, model {cfg.model}, {cfg.clients} clients, {part}, B={cfg.batch_size}, "
            f"q={cfg.server_update_interval}, l={cfg.align_interval}, align {cfg.align_epochs} epochs x "
            f"batch {cfg.align_batch_size}, buffer {cfg.buffer_size}, lr {cfg.lr:g}/aux {cfg.aux_lr:g}, "
            f"seed {cfg.seed}, {cfg.schedule} schedule, {engine} engine")


def write_summary(out: Path, rows: list[RunSummary], cfg: Config, args, budget: float, argv) -> None:
    cmd = " ".join(["python -m fsl_fast.compare"] + list(sys.argv[1:] if argv is None else argv))
    budget_note = "given" if args.budget_gib is not None else "the least total GiB among the runs"
    md = [f"# Comparison: {_setting(cfg, args.engine)}", "",
          f"Command: `{cmd}`", "",
          f"Target test accuracy {args.target:g}; communication budget {budget:.4f} GiB ({budget_note}). "
          "GiB = 2^30 bytes, paper convention (labels and the initial broadcast not counted). "
          "Wall time = sum of the rounds' seconds (training + evaluation).", "",
          markdown_table(rows, args.target, budget),
          f"Communication to reach {args.target:g}: {ranking(rows)}.", ""]
    (out / "summary.md").write_text("\n".join(md))
    (out / "summary.csv").write_text(csv_text(rows, args.target, budget))
    part = cfg.partition if cfg.partition == "iid" else f"Dirichlet alpha={cfg.alpha:g}"
    title = f"{cfg.dataset}, {cfg.model}, {cfg.clients} clients, {part}, {args.engine} engine"
    plot(rows, out / "accuracy_vs_gib.png", title, args.target, budget)


if __name__ == "__main__":
    sys.exit(main())
