"""One training run: data, models, engine, algorithm, the round loop, run directory, resume."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from fsl_fast import faults
from fsl_fast.algorithms import algorithm_class
from fsl_fast.config import Config, ConfigError
from fsl_fast.engines import build_engine
from fsl_fast.faults import RunIOError, check_value
from fsl_fast.ledger import GIB, Ledger
from fsl_fast.transport.local import InProcessChannel

CHECKPOINT = "checkpoints/last.pt"


def data_seed(seed: int, k: int) -> int:
    return (seed * 104_729 + 17 + k) % (2**63 - 1)


class Run:
    """Everything a run needs, built from a resolved Config (no files touched)."""

    def __init__(self, cfg: Config):
        from fsl_fast.data import ClientLoader, DataError, class_counts, load_dataset, partition
        from fsl_fast.models import build_split_model

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, clients=cfg.clients)
        n = int(self.data.y_train.shape[0])
        if cfg.clients > n:
            raise ConfigError(f"--clients: {cfg.clients} clients but only {n} training samples")
        if self.data.owners is not None:  # femnist: one client per writer
            self.parts = list(self.data.owners)
        else:
            try:
                self.parts = partition(self.data.y_train.numpy(), cfg.clients, cfg.partition, cfg.alpha,
                                       cfg.seed, shards_per_client=cfg.shards_per_client)
            except DataError as e:
                raise ConfigError(f"--partition {cfg.partition}: {e}") from None
        empty = [k for k, p in enumerate(self.parts) if len(p) == 0]
        if empty:
            raise ConfigError(f"partition left clients {empty} without samples; use fewer --clients")
        self.class_counts = class_counts(self.data.y_train.numpy(), self.parts, self.data.num_classes)
        torch.manual_seed(cfg.seed)
        try:
            self.split = build_split_model(cfg.model, self.data.in_shape, self.data.num_classes, aux=cfg.aux)
        except ValueError as e:  # unknown name, unsupported aux, input too small: user errors
            raise ConfigError(f"--model/--aux: {e}") from None
        cls = algorithm_class(cfg)
        self.profile = flops = None
        if cfg.client_profile:  # the simulated clock (fsl_fast.clock), counted on the plain models
            from fsl_fast.clock import Profile, step_flops

            self.profile = Profile.load(cfg.client_profile, cfg.clients, cfg.seed)
            flops = step_flops(self.split, self.data.in_shape)
        self.engine = build_engine(cfg, self.split, cfg.clients, cls, cfg.device)
        self.gens = [torch.Generator().manual_seed(data_seed(cfg.seed, k)) for k in range(cfg.clients)]
        self.loaders = [ClientLoader(self.data, self.parts[k], cfg.batch_size, self.gens[k], train=True)
                        for k in range(cfg.clients)]
        sizes = [len(p) for p in self.parts]
        total = float(sum(sizes))
        self.weights = [s / total for s in sizes]
        self.ledger = Ledger()
        self.channel = InProcessChannel(cfg, self.ledger, self.engine)
        self.algo = cls(cfg, self.engine, self.loaders, self.weights, self.channel)
        self.algo.step_flops = flops
        self.metrics: list[dict] = []
        self.next_round = 0
        self.config_changes: list[dict] = []  # settings changed by --resume (round, old, new)
        self.warm_started: dict | None = None  # --warm-start: what was loaded from where

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format_version": faults.FORMAT_VERSION,
            "next_round": self.next_round,
            "engine": self.engine.state_dict(),
            "algorithm": self.algo.state_dict(),
            "ledger": self.ledger.state_dict(),
            "data_gens": [g.get_state() for g in self.gens],
            "torch_rng": torch.get_rng_state(),
            "metrics": self.metrics,
            "config_changes": self.config_changes,
            "warm_started": self.warm_started,
        }

    def load_state_dict(self, sd: dict, where: str = "checkpoint") -> None:
        if not isinstance(sd, dict) or "next_round" not in sd:
            raise ConfigError(f"--resume: {where} is not an fsl_fast checkpoint")
        faults.check_version("checkpoint", sd.get("format_version"), where)
        self.config_changes = list(sd.get("config_changes", []))
        self.warm_started = sd.get("warm_started")
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
        lr = None
        if self.cfg.lr_schedule != "constant":  # --lr-schedule: this round's client/server rate
            from fsl_fast.optim import lr_factor

            lr = self.cfg.lr * lr_factor(self.cfg.lr_schedule, t, self.cfg.rounds)
            self.engine.set_hyperparameters(lr, self.cfg.weight_decay, self.cfg.aux_lr)
        t0 = time.perf_counter()
        self.engine.reset_train_stats()
        times = self.algo.run_round(t)
        train = self.engine.train_stats().sum(0).tolist()  # loss, correct, samples over clients
        ledger = self.ledger.end_round()
        cfg = self.cfg
        budget = cfg.comm_budget_gib * GIB if cfg.comm_budget_gib else None
        # --eval-every N: rounds N-1, 2N-1, ..., the last round and the round that reaches the budget
        evaluate = ((t + 1) % cfg.eval_every == 0 or t + 1 >= cfg.rounds
                    or (budget is not None and ledger["comm_bytes_paper"] >= budget))
        acc = loss = None
        if evaluate:
            with self.algo.phase("eval"):
                acc, loss = self.engine.evaluate(self.data.x_test, self.data.y_test, cfg.eval_batch_size)
            if self.engine.computes("server"):
                check_value(t, "evaluation", "test loss", loss)
        times["eval"] = self.algo.times["eval"] if evaluate else 0.0
        rec = {"round": t, "test_accuracy": acc, "test_loss": loss, **self.algo.round_extra}
        if lr is not None:
            rec["lr"] = lr
        # the whole model on the batches the server trained on this round (see Engine.record_train)
        rec["train_loss"] = train[0] / train[2] if train[2] else None
        rec["train_accuracy"] = train[1] / train[2] if train[2] else None
        rec["train_samples"] = int(train[2])
        rec.update(ledger)
        rec["comm_gib_paper"] = rec["comm_bytes_paper"] / GIB
        rec.update({f"seconds_{k}": v for k, v in sorted(times.items())})
        rec["seconds_round"] = time.perf_counter() - t0
        if self.profile is not None:
            from fsl_fast.clock import simulate

            prev = self.metrics[-1].get("sim_seconds_total", 0.0) if self.metrics else 0.0
            rec["sim_seconds"] = simulate(self.algo.trace, self.profile)
            rec["sim_seconds_total"] = prev + rec["sim_seconds"]
        self.metrics.append(rec)
        self.next_round = t + 1
        return rec


def jsonl(rows) -> str:
    return "".join(faults.dumps(m) + "\n" for m in rows)


def write_config(out: Path, cfg: Config) -> None:
    """config.json: the resolved configuration with its format version (strict JSON)."""
    faults.atomic_write_text(out / "config.json", faults.dumps(cfg.to_file_dict(), indent=2) + "\n")


def prepare_out(out: Path) -> None:
    """Create the run directory at start; a path that cannot be one is a ConfigError (exit 2)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fsl_fast-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out: cannot use {out} as the run directory: {e.strerror or e}") from None


def apply_resume_changes(run: "Run", changes: dict) -> None:
    """Settings changed on --resume (learning rates, weight decay) reach the optimizers loaded from
    the checkpoint, and the change is recorded (results.json, the checkpoint)."""
    if not changes:
        return
    cfg = run.cfg
    run.engine.set_hyperparameters(cfg.lr, cfg.weight_decay, cfg.aux_lr)
    run.config_changes.append({"round": run.next_round,
                               "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}})


# Metrics that depend on the wall clock; everything else must match exactly on resume.
TIMING_KEYS_PREFIX = "seconds_"


class TensorBoard:
    """--tensorboard: each round's numeric metrics as scalars (tag ``group/name``, step = round)
    in OUT/tensorboard. Opened after the checkpoint is loaded: ``purge_step`` hides events that a
    crashed session logged past the checkpoint."""

    GROUPS = (("test_", "test"), ("train_", "train"), ("seconds_", "seconds"), ("bytes_", "bytes"),
              ("comm_", "comm"), ("wire_", "wire"))

    @staticmethod
    def require():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard: the tensorboard package is not installed "
                              "(pip install tensorboard, or fsl_fast[tensorboard])") from None
        return SummaryWriter

    def __init__(self, out: Path, first_round: int):
        SummaryWriter = self.require()
        self.w = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=first_round or None)

    @classmethod
    def tag(cls, key: str) -> str:
        for prefix, group in cls.GROUPS:
            if key.startswith(prefix):
                return f"{group}/{key[len(prefix):]}"
        return f"run/{key}"

    def log(self, rec: dict) -> None:
        t = rec["round"]
        for k, v in rec.items():
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.w.add_scalar(self.tag(k), v, t)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


def evaluated(metrics: list[dict]) -> list[dict]:
    """The rounds with a test evaluation (all of them unless --eval-every > 1)."""
    return [m for m in metrics if m.get("test_accuracy") is not None]


def plot_run(metrics: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = evaluated(metrics)
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
        self.acc = next((m["test_accuracy"] for m in reversed(evaluated(run.metrics))), None)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.rounds, initial=run.next_round, file=sys.stderr, unit="round",
                            desc=desc, dynamic_ncols=True)

    def more(self) -> bool:
        return self.run.next_round < self.rounds and self.stopped == "rounds"

    def round_done(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if rec["test_accuracy"] is not None:
                self.acc = rec["test_accuracy"]
            self.bar.set_postfix(acc="-" if self.acc is None else f"{self.acc:.4f}",
                                 GiB=f"{rec['comm_gib_paper']:.3f}")
        if self.budget is not None and rec["comm_bytes_paper"] >= self.budget:
            self.stopped = "comm_budget"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load_checkpoint(run: "Run", path: Path, option: str = "--resume") -> None:
    try:
        sd = torch.load(path, weights_only=True, map_location=run.engine.device)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or corrupt file: one line, exit 2
        raise ConfigError(f"{option}: cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    try:
        run.load_state_dict(sd, where=str(path))
    except ConfigError as e:
        raise ConfigError(str(e).replace("--resume", option, 1)) from None


def _shape_mismatch(src: dict, dst: dict) -> str | None:
    if src.keys() != dst.keys():
        extra, missing = sorted(set(src) - set(dst)), sorted(set(dst) - set(src))
        return f"entries differ (only there: {extra[:3]}, only here: {missing[:3]})"
    for k in src:
        if tuple(src[k].shape) != tuple(dst[k].shape):
            return f"{k} has shape {tuple(src[k].shape)} there, {tuple(dst[k].shape)} here"
    return None


def warm_start(run: "Run", path: str) -> dict:
    """Load the models of the run at ``path`` (a run directory, or a checkpoint file inside one)
    into ``run``'s engine: the global client into every client, the server into every server
    copy, and the auxiliaries when the source kept one per client of this run. The source is
    rebuilt from its config.json and checkpoint on the CPU, so either engine may have written it.
    Returns the record for results.json; ConfigError (exit 2) for a source that does not fit."""
    p = Path(path)
    ckpt = p / CHECKPOINT if p.is_dir() else p
    run_dir = p if p.is_dir() else p.parent.parent
    cfg_file = run_dir / "config.json"
    if not ckpt.is_file():
        raise ConfigError(f"--warm-start: no checkpoint at {ckpt}")
    if not cfg_file.is_file():
        raise ConfigError(f"--warm-start: {cfg_file} not found (give the run directory)")
    import dataclasses
    import json

    try:
        src_cfg = Config.from_file_dict(json.loads(cfg_file.read_text()), where=str(cfg_file))
    except ValueError as e:
        raise ConfigError(f"--warm-start: cannot read {cfg_file}: {e}") from None
    src_cfg = dataclasses.replace(src_cfg, device="cpu", distributed=False, threads=0, warm_start=None,
                                  clients_per_round=0, dropout_prob=0.0).resolved()
    src = Run(src_cfg)
    load_checkpoint(src, ckpt, option="--warm-start")
    named = src.engine.named_state()
    mine = run.engine.named_state()
    for part in ("client", "server"):
        why = _shape_mismatch(named[part], mine[part])
        if why:
            raise ConfigError(f"--warm-start: the {part} model of {run_dir} does not fit this run's: {why}")
    auxes = None
    mine_aux = sorted(k for k in mine if k.startswith("aux"))
    src_aux = sorted(k for k in named if k.startswith("aux"))
    if mine_aux and set(mine_aux) <= set(src_aux) and not any(
            _shape_mismatch(named[k], mine[k]) for k in mine_aux):
        auxes = [named[f"aux{k}"] for k in range(len(mine_aux))]
    run.engine.load_models(named["client"], named["server"], auxes)
    return {"from": str(run_dir), "rounds_completed": src.next_round, "algorithm": src_cfg.algorithm,
            "parts": ["client", "server"] + (["aux"] if auxes is not None else [])}


def has_rows(path: Path) -> bool:
    return path.is_file() and any(line.strip() for line in path.read_text().splitlines())


def partition_record(cfg: Config, run: "Run", owner=None) -> dict:
    return {"scheme": "writers" if run.data.owners is not None else cfg.partition, "alpha": cfg.alpha,
            "seed": cfg.seed,
            **({"shards_per_client": cfg.shards_per_client} if cfg.partition == "shards" else {}),
            "num_classes": run.data.num_classes,
            "clients": [{"client": k, "samples": int(len(p)), "class_counts": run.class_counts[k],
                         **({"rank": owner(k)} if owner else {})} for k, p in enumerate(run.parts)]}


MANIFEST = "checkpoints/dist.json"  # a distributed run's committed round


class Checkpoints:
    """Writes the run directory's checkpoint after every round, then the round's metrics line, so
    metrics.jsonl never holds a round past the checkpoint (after a failed write it may lack the
    checkpoint's last round; ``--resume`` rewrites it from the checkpoint's own copy).

    One process (``world_size`` 1): the whole run's state in ``checkpoints/last.pt``, replaced
    atomically. A distributed run: each rank writes its shard
    (``checkpoints/dist-rank{r}-round{t}.pt``); after a barrier rank 0 names the round in the
    manifest (``checkpoints/dist.json``), appends the metrics and removes its previous shard; the
    other ranks remove their shard of two rounds back (the manifest of the last round was written
    before rank 0 entered this one)."""

    def __init__(self, out: Path, rank: int = 0, world_size: int = 1, barrier=None, lost=None):
        self.out = Path(out)
        self.rank, self.world_size = rank, world_size
        self.barrier = barrier
        self.lost = lost if lost is not None else set()  # ranks dropped by --tolerate-dropouts

    def shard(self, rank: int, t: int) -> Path:
        return self.out / "checkpoints" / f"dist-rank{rank}-round{t}.pt"

    def commit(self, run: "Run", rec: dict) -> None:
        t = int(rec["round"])
        line = faults.dumps(rec) + "\n"
        if self.world_size == 1:
            faults.atomic_torch_save(run.state_dict(), self.out / CHECKPOINT)
            faults.append_line(self.out / "metrics.jsonl", line)
            return
        faults.atomic_torch_save(run.state_dict(), self.shard(self.rank, t))
        self.barrier("committing the checkpoint")
        if self.rank == 0:
            manifest = {"format_version": faults.FORMAT_VERSION, "world_size": self.world_size, "round": t}
            if self.lost:
                manifest["lost_ranks"] = sorted(self.lost)
            faults.atomic_write_text(self.out / MANIFEST, faults.dumps(manifest) + "\n")
            faults.append_line(self.out / "metrics.jsonl", line)
            self.shard(0, t - 1).unlink(missing_ok=True)
        else:
            self.shard(self.rank, t - 2).unlink(missing_ok=True)


class Local:
    """Where a run executes: this process alone. :func:`train` asks its place the few things that
    differ for one rank of a distributed run (fsl_fast.distributed.driver.Rank answers them
    there): which process writes the run directory, how a checkpoint is read and written, how a
    round's record is shared."""

    writes = True  # this process writes the run directory and the results
    rank, world_size = 0, 1
    label = ""  # for the progress bar

    def config(self, cfg: Config) -> Config:
        return cfg

    def agree(self, cfg: Config, out: Path) -> Path:
        """The run directory every process of the run uses."""
        return out

    def attach(self, run: "Run") -> None:
        """Make ``run`` this process's part of the run."""

    owner = None  # a distributed place: client -> the rank hosting it (partition.json)

    def checkpoints(self, out: Path) -> Checkpoints:
        return Checkpoints(out)

    def load(self, run: "Run", out: Path) -> None:
        ckpt = out / CHECKPOINT
        if ckpt.is_file():
            load_checkpoint(run, ckpt)
        elif has_rows(out / "metrics.jsonl"):
            raise ConfigError(f"--resume: no checkpoint at {ckpt}")
        # else no round was ever completed (a run that diverged in round 0): start it again

    def started(self, out: Path) -> None:
        """The run directory is ready (on the writing process)."""

    def barrier(self, what: str) -> None:
        pass

    def begin_round(self, t: int) -> None:
        pass

    def share(self, rec: dict) -> dict:
        """The round's record as every process of the run sees it."""
        return rec

    def end_rounds(self) -> None:
        """The round loop is over (stopped or done)."""

    def describe(self, results: dict) -> None:
        """Add what the place knows to results.json."""

    def finish(self) -> None:
        pass


def train(cfg: Config, out: Path, resume: bool = False, progress: bool = True,
          changes: dict | None = None, place: Local | None = None) -> dict | None:
    """Run (or continue) a training run into ``out``; returns the results dict (None on the
    processes of a distributed run that do not write it). ``place``: where the run executes
    (default: this process alone); see :class:`Local` and :class:`Checkpoints` for the files.
    ``changes``: settings that ``--resume`` changed, {name: (old, new)}. Raises Divergence
    (exit 3) and RunIOError (exit 4) from inside the loop, ConfigError (exit 2) before it."""
    place = place or Local()
    if cfg.tensorboard and place.writes:
        TensorBoard.require()  # before anything is written
    out = place.agree(cfg, out)
    run = Run(place.config(cfg))
    place.attach(run)
    store = getattr(run.engine, "client_store", None)
    if store is not None and store.mode == "disk":
        store.bind(out / "client_store")
    try:
        if resume:
            place.load(run, out)
            apply_resume_changes(run, changes)
            if changes and place.writes:
                write_config(out, cfg)
        elif place.writes:
            if cfg.warm_start:
                run.warm_started = warm_start(run, cfg.warm_start)
            prepare_out(out)
            write_config(out, cfg)
            faults.atomic_write_text(out / "partition.json",
                                     faults.dumps(partition_record(cfg, run, place.owner), indent=1) + "\n")
        if place.writes:
            # metrics.jsonl always mirrors the checkpoint's rounds, then grows a line per round.
            faults.atomic_write_text(out / "metrics.jsonl", jsonl(run.metrics))
            place.started(out)
    except RunIOError as e:
        raise ConfigError(f"--out: {e}") from None
    place.barrier("setting up the run directory")
    checkpoints = place.checkpoints(out)
    tb = TensorBoard(out, run.next_round) if cfg.tensorboard and place.writes else None
    loop = RoundLoop(run, progress and place.writes, f"{cfg.algorithm}{' fused' if cfg.fused else ''}{place.label}")
    t_start = time.perf_counter()
    try:
        while loop.more():
            place.begin_round(run.next_round)
            rec = place.share(run.step())
            run.metrics[-1] = rec
            checkpoints.commit(run, rec)
            if tb is not None:
                tb.log(rec)
            loop.round_done(rec)
    finally:
        loop.close()
        if tb is not None:
            tb.close()
    place.end_rounds()
    results = summarize(cfg, run.metrics, loop.stopped, time.perf_counter() - t_start)
    if place.writes:
        place.describe(results)
        results["executors"] = run.engine.executor_record()
        if cfg.warm_start:
            results["warm_start"] = run.warm_started
        if run.config_changes:
            results["config_changes"] = run.config_changes
        faults.atomic_write_text(out / "results.json", faults.dumps(results, indent=2) + "\n")
        if run.metrics:
            where = "distributed" if place.world_size > 1 else cfg.partition
            try:
                plot_run(run.metrics, out, f"{cfg.algorithm} / {cfg.model} / {cfg.dataset} / {where}")
            except OSError as e:
                raise RunIOError(out / "accuracy_vs_comm.png", e) from None
    place.finish()
    return results if place.writes else None


def summarize(cfg: Config, metrics: list[dict], stopped: str, wall: float) -> dict:
    if not metrics:
        return {"rounds_completed": 0, "stopped_by": stopped}
    ev = evaluated(metrics)
    best = max(ev, key=lambda m: m["test_accuracy"])
    last = metrics[-1]
    return {
        "algorithm": cfg.algorithm,
        "rounds_completed": len(metrics),
        "stopped_by": stopped,
        "final_test_accuracy": ev[-1]["test_accuracy"],
        "final_test_round": ev[-1]["round"],
        "best_test_accuracy": best["test_accuracy"],
        "best_round": best["round"],
        "comm_bytes": last["comm_bytes"],
        "comm_bytes_paper": last["comm_bytes_paper"],
        "comm_gib_paper": last["comm_bytes_paper"] / GIB,
        "seconds_this_session": wall,
        "seconds_total": sum(m["seconds_round"] for m in metrics),
    }
