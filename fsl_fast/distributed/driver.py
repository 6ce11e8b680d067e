"""Starting, running and resuming this rank's part of a distributed run.

Launch with torchrun (docs/distributed.md has the multi-machine form)::

    torchrun --nproc-per-node 3 -m fsl_fast.train --distributed --schedule parallel ...

Rank 0 checks that every rank runs the same configuration, writes the run directory and reports.
Checkpoints are per-rank shards, committed by rank 0 after a barrier (``checkpoints/dist.json``);
``--resume`` continues from the last committed round. Peer failures print one line naming the rank
and round and end the process with status 1 (also on the ranks that are still healthy); SIGTERM
from torchrun (which stops the survivors when one worker fails) is reported with the round.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fsl_fast import faults
from fsl_fast.config import ConfigError
from fsl_fast.distributed.engine import attach
from fsl_fast.faults import EXIT_DIVERGED, EXIT_IO, Divergence, RunIOError
from fsl_fast.runner import CHECKPOINT, MANIFEST, Checkpoints, train
from fsl_fast.transport.p2p import ACTIVE, DistributedError, Retired, Transport, die
from fsl_fast.transport.topology import Topology

__all__ = ["train_distributed", "Rank", "MANIFEST"]


def _launch_env() -> tuple[int, int, int]:
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except KeyError:
        raise ConfigError("--distributed: RANK/WORLD_SIZE are not set; launch with torchrun, e.g. "
                          "torchrun --nproc-per-node 3 -m fsl_fast.train --distributed ...") from None


def _fingerprint(cfg) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "threads", "dist_timeout")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _store_client():
    """A client of the launcher's key-value store (torchrun's agent hosts it), for heartbeats."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=30),
                             use_libuv=True)
    except Exception:  # noqa: BLE001 - heartbeats are a diagnosis aid only
        return None


def train_distributed(cfg, out: Path, resume: bool = False, progress: bool = True, changes=None):
    """This rank's part of a distributed run (see the module doc). Returns the results dict on
    rank 0 and None elsewhere. Peer failures print one line naming the rank and round and end the
    process with status 1 (also on the ranks that are still healthy)."""
    rank, world, local_rank = _launch_env()
    transport = None

    def on_sigterm(signum, frame):
        where = transport.where() if transport is not None else "startup"
        waiting = f" while {transport.blocked[1]}" if transport is not None and transport.blocked else ""
        silent = transport.silent_peers() if transport is not None else []
        extra = f" [no heartbeat from rank {', '.join(silent)}: it stopped or died]" if silent else ""
        for r, why in (transport.exited_peers() if transport is not None else []):
            extra += f" [rank {r} exited: {why}]"
        die(f"rank {rank}: stopped by the launcher (SIGTERM) in {where}{waiting}{extra}", 143)

    signal.signal(signal.SIGTERM, on_sigterm)
    if cfg.tolerate_dropouts and os.environ.get("TORCHELASTIC_RUN_ID"):
        raise ConfigError("--tolerate-dropouts: torchrun stops every worker when one fails; launch "
                          "with python -m fsl_fast.launch --nproc-per-node N ... instead")
    if cfg.tolerate_dropouts and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ConfigError("--tolerate-dropouts: needs MASTER_ADDR and MASTER_PORT (the store the ranks "
                          "agree through); python -m fsl_fast.launch sets them")
    try:
        topo = Topology(rank, world, cfg.clients)  # ConfigError on every rank alike
        if cfg.device.startswith("cuda"):
            n = torch.cuda.device_count()
            device = torch.device(f"cuda:{local_rank % n}")
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        timeout = datetime.timedelta(seconds=cfg.dist_timeout)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        transport = Transport(topo, device, cfg.dist_timeout, store=_store_client())
        transport.tolerate = bool(cfg.tolerate_dropouts)
        if transport.tolerate and transport.store is None:
            raise DistributedError(f"rank {rank}: --tolerate-dropouts: cannot reach the store at "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
        ACTIVE.append(transport)
        transport.start_liveness()
        return train(cfg, out, resume, progress, changes, place=Rank(transport, device))
    except Retired as e:  # dropped by the others (--tolerate-dropouts): not a failure of the run
        sys.stderr.write(f"{e}; leaving\n")
        sys.stderr.flush()
        os._exit(0)
    except DistributedError as e:
        die(str(e), 1)
    except Divergence as e:  # this rank saw it; the others fail naming this rank (see _die)
        die(f"rank {rank}: {e}; {_kept(out)}: continue with --resume {out} and e.g. a lower --lr",
             EXIT_DIVERGED, reason=str(e))
    except RunIOError as e:
        die(f"rank {rank}: {e}; {_kept(out)}: continue with --resume {out}", EXIT_IO)
    finally:
        if transport is not None:
            transport.stop_liveness()


def _kept(out: Path) -> str:
    return ("the last committed round's checkpoint is intact" if (Path(out) / MANIFEST).is_file()
            else "no round was committed")


class Rank:
    """This rank's answers to the run driver (fsl_fast.runner.train; the in-process answers are
    fsl_fast.runner.Local's): rank 0 writes the run directory; every rank checks that it runs rank
    0's configuration, attaches its part of the run, writes its checkpoint shard and sees rank 0's
    record of each round (with the wire bytes of every rank)."""

    def __init__(self, transport: Transport, device):
        self.transport = transport
        self.topo = transport.topo
        self.device = device
        self.rank, self.world_size = self.topo.rank, self.topo.world_size
        self.writes = self.rank == 0
        self.label = f" distributed x{self.world_size}"

    def config(self, cfg):
        import dataclasses

        return dataclasses.replace(cfg, device=str(self.device))

    def agree(self, cfg, out: Path) -> Path:
        fp = self.transport.broadcast_object((str(out), _fingerprint(cfg)), "agreeing on the run")
        if fp[1] != _fingerprint(cfg):
            raise DistributedError(f"rank {self.rank}: its config differs from rank 0's (same command line "
                                   "and data on every machine are required)")
        return Path(fp[0])

    def attach(self, run) -> None:
        attach(run, self.transport)

    def owner(self, k: int) -> int:
        return self.topo.owner(k)

    def checkpoints(self, out: Path):
        return Checkpoints(out, self.rank, self.world_size, self.barrier, self.transport.lost)

    def load(self, run, out: Path) -> None:
        _resume(run, out, self.transport)

    def started(self, out: Path) -> None:
        if (out / CHECKPOINT).exists():
            (out / CHECKPOINT).unlink()  # never leave an in-process checkpoint next to shards

    def barrier(self, what: str) -> None:
        self.transport.barrier(what)

    def begin_round(self, t: int) -> None:
        self.transport.round = t

    def share(self, rec: dict) -> dict:
        wire = self.transport.gather_counters()
        if self.rank == 0:
            rec.update(wire)
        return self.transport.broadcast_object(rec, "sharing the round's metrics")

    def end_rounds(self) -> None:
        self.transport.round = -1
        self.transport.phase = "shutdown"

    def describe(self, results: dict) -> None:
        results["world_size"] = self.world_size
        if self.transport.lost:
            results["lost_ranks"] = sorted(self.transport.lost)

    def finish(self) -> None:
        self.transport.barrier("finishing")
        self.transport.stop_liveness()
        dist.destroy_process_group()


def _resume(run, out: Path, transport: Transport) -> None:
    topo = transport.topo
    info = None
    if topo.rank == 0:
        mf = out / MANIFEST
        if not mf.is_file():
            info = {"error": f"--resume: no distributed checkpoint manifest at {mf}"}
        else:
            info = json.loads(mf.read_text())
            try:
                faults.check_version("distributed checkpoint manifest", info.get("format_version"), str(mf))
            except ConfigError as e:
                info = {"error": str(e)}
            if "error" not in info and info["world_size"] != topo.world_size:
                info = {"error": f"--resume: the run was written by {info['world_size']} processes; "
                                 f"relaunch with {info['world_size']} (got {topo.world_size})"}
    info = transport.broadcast_object(info, "agreeing on the checkpoint")
    if "error" in info:
        raise ConfigError(info["error"])
    t = int(info["round"])
    lost = [int(r) for r in info.get("lost_ranks", [])]
    if lost:  # ranks dropped earlier (--tolerate-dropouts) stay out; their clients stay lost
        if topo.rank in lost:
            raise Retired(f"rank {topo.rank}: --resume: this rank was dropped from the run before round {t + 1}")
        transport.lost.update(lost)
        topo.drop(lost)
        transport.regroup()
    path = Checkpoints(out).shard(topo.rank, t)
    err = ""
    try:
        run.load_state_dict(torch.load(path, weights_only=True, map_location=run.engine.device),
                            where=str(path))
    except FileNotFoundError:
        err = f"rank {topo.rank}: --resume: checkpoint shard {path} not found"
    except ConfigError as e:
        err = f"rank {topo.rank}: {e}"
    flags = torch.zeros(topo.world_size, device=transport.device)
    flags[topo.rank] = 1.0 if err else 0.0
    transport.all_reduce_sum(flags, "loading the checkpoint shards")
    bad = [r for r, v in enumerate(flags.tolist()) if v]
    if bad:
        raise ConfigError(err or f"--resume: rank(s) {bad} could not load their checkpoint shard of round {t}")
    if run.next_round != t + 1:
        raise ConfigError(f"--resume: shard {path} holds round {run.next_round - 1}, manifest says {t}")
