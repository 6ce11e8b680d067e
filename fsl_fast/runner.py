"""One training run: data, models, engine, algorithm, the round loop, run directory, resume."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from fsl_fast.algorithms import ALGORITHM_CLASSES
from fsl_fast.config import Config, ConfigError
from fsl_fast.engines import build_engine
from fsl_fast.ledger import GIB, Ledger

CHECKPOINT = "checkpoints/last.pt"


def data_seed(seed: int, k: int) -> int:
    return (seed * 104_729 + 17 + k) % (2**63 - 1)


class Run:
    """Everything a run needs, built from a resolved Config (no files touched)."""

    def __init__(self, cfg: Config):
        from fsl_fast.data import ClientLoader, class_counts, load_dataset, partition
        from fsl_fast.models import build_split_model

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        n = int(self.data.y_train.shape[0])
        if cfg.clients > n:
            raise ConfigError(f"--clients: {cfg.clients} clients but only {n} training samples")
        self.parts = partition(self.data.y_train.numpy(), cfg.clients, cfg.partition, cfg.alpha, cfg.seed)
        empty = [k for k, p in enumerate(self.parts) if len(p) == 0]
        if empty:
            raise ConfigError(f"partition left clients {empty} without samples; use fewer --clients")
        self.class_counts = class_counts(self.data.y_train.numpy(), self.parts, self.data.num_classes)
        torch.manual_seed(cfg.seed)
        try:
            self.split = build_split_model(cfg.model, self.data.in_shape, self.data.num_classes, aux=cfg.aux)
        except ValueError as e:  # unknown name, unsupported aux, input too small: user errors
            raise ConfigError(f"--model/--aux: {e}") from None
        cls = ALGORITHM_CLASSES[cfg.algorithm]
        self.engine = build_engine(cfg, self.split, cfg.clients, cls, cfg.device)
        self.gens = [torch.Generator().manual_seed(data_seed(cfg.seed, k)) for k in range(cfg.clients)]
        self.loaders = [ClientLoader(self.data, self.parts[k], cfg.batch_size, self.gens[k], train=True)
                        for k in range(cfg.clients)]
        sizes = [len(p) for p in self.parts]
        total = float(sum(sizes))
        self.weights = [s / total for s in sizes]
        self.ledger = Ledger()
        self.algo = cls(cfg, self.engine, self.loaders, self.weights, self.ledger)
        self.metrics: list[dict] = []
        self.next_round = 0

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "next_round": self.next_round,
            "engine": self.engine.state_dict(),
            "algorithm": self.algo.state_dict(),
            "ledger": self.ledger.state_dict(),
            "data_gens": [g.get_state() for g in self.gens],
            "torch_rng": torch.get_rng_state(),
            "metrics": self.metrics,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.next_round = int(sd["next_round"])
        self.engine.load_state_dict(sd["engine"])
        self.algo.load_state_dict(sd["algorithm"])
        self.ledger.load_state_dict(sd["ledger"])
        for g, s in zip(self.gens, sd["data_gens"]):
            g.set_state(s)
        torch.set_rng_state(sd["torch_rng"])
        self.metrics = list(sd["metrics"])

    # -- one round -----------------------------------------------------------------------------
    def step(self) -> dict:
        t = self.next_round
        if t == 0:
            self.algo.initial_broadcast()
        t0 = time.perf_counter()
        times = self.algo.run_round(t)
        with self.algo.phase("eval"):
            acc, loss = self.engine.evaluate(self.data.x_test, self.data.y_test, self.cfg.eval_batch_size)
        times["eval"] = self.algo.times["eval"]
        rec = {"round": t, "test_accuracy": acc, "test_loss": loss}
        rec.update(self.ledger.end_round())
        rec["comm_gib_paper"] = rec["comm_bytes_paper"] / GIB
        rec.update({f"seconds_{k}": v for k, v in sorted(times.items())})
        rec["seconds_round"] = time.perf_counter() - t0
        self.metrics.append(rec)
        self.next_round = t + 1
        return rec


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# Metrics that depend on the wall clock; everything else must match exactly on resume.
TIMING_KEYS_PREFIX = "seconds_"


def plot_run(metrics: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [m["round"] for m in metrics]
    acc = [m["test_accuracy"] for m in metrics]
    gib = [m["comm_bytes_paper"] / GIB for m in metrics]
    for x, xlabel, name in ((gib, "communication (GiB, paper convention)", "accuracy_vs_comm.png"),
                            (rounds, "round", "accuracy_vs_round.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        ax.plot(x, acc, marker="o", markersize=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


class RoundLoop:
    """The round loop's bookkeeping shared by the in-process and distributed runs: when to stop
    (rounds done, or the paper-convention total reached ``--comm-budget-gib``) and the progress
    bar with accuracy and GiB so far."""

    def __init__(self, run: "Run", progress: bool, desc: str):
        cfg = run.cfg
        self.run, self.rounds = run, cfg.rounds
        self.budget = cfg.comm_budget_gib * GIB if cfg.comm_budget_gib else None
        self.stopped = "rounds"
        if self.budget is not None and run.metrics and run.metrics[-1]["comm_bytes_paper"] >= self.budget:
            self.stopped = "comm_budget"
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.rounds, initial=run.next_round, file=sys.stderr, unit="round",
                            desc=desc, dynamic_ncols=True)

    def more(self) -> bool:
        return self.run.next_round < self.rounds and self.stopped == "rounds"

    def round_done(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(acc=f"{rec['test_accuracy']:.4f}", GiB=f"{rec['comm_gib_paper']:.3f}")
        if self.budget is not None and rec["comm_bytes_paper"] >= self.budget:
            self.stopped = "comm_budget"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Run (or continue) a training run into ``out``; returns the results dict."""
    run = Run(cfg)
    ckpt = out / CHECKPOINT
    if resume:
        if not ckpt.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt}")
        run.load_state_dict(torch.load(ckpt, weights_only=True, map_location=run.engine.device))
    else:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        part = {"scheme": cfg.partition, "alpha": cfg.alpha, "seed": cfg.seed,
                "num_classes": run.data.num_classes,
                "clients": [{"client": k, "samples": int(len(p)), "class_counts": run.class_counts[k]}
                            for k, p in enumerate(run.parts)]}
        _atomic_write(out / "partition.json", json.dumps(part, indent=1) + "\n")
    # metrics.jsonl always mirrors the checkpoint's rounds, then grows a line per round.
    _atomic_write(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in run.metrics))
    loop = RoundLoop(run, progress, f"{cfg.algorithm}{' fused' if cfg.fused else ''}")
    t_start = time.perf_counter()
    while loop.more():
        rec = run.step()
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        _atomic_torch_save(run.state_dict(), ckpt)
        loop.round_done(rec)
    loop.close()
    results = summarize(cfg, run.metrics, loop.stopped, time.perf_counter() - t_start)
    _atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    if run.metrics:
        plot_run(run.metrics, out, f"{cfg.algorithm} / {cfg.model} / {cfg.dataset} / {cfg.partition}")
    return results


def summarize(cfg: Config, metrics: list[dict], stopped: str, wall: float) -> dict:
    if not metrics:
        return {"rounds_completed": 0, "stopped_by": stopped}
    best = max(metrics, key=lambda m: m["test_accuracy"])
    last = metrics[-1]
    return {
        "algorithm": cfg.algorithm,
        "rounds_completed": len(metrics),
        "stopped_by": stopped,
        "final_test_accuracy": last["test_accuracy"],
        "best_test_accuracy": best["test_accuracy"],
        "best_round": best["round"],
        "comm_bytes": last["comm_bytes"],
        "comm_bytes_paper": last["comm_bytes_paper"],
        "comm_gib_paper": last["comm_bytes_paper"] / GIB,
        "seconds_this_session": wall,
        "seconds_total": sum(m["seconds_round"] for m in metrics),
    }
