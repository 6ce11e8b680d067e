"""This process's part of a distributed run: the engine wrapper that computes only what this rank
owns, and :func:`attach`, which turns an in-process :class:`fsl_fast.runner.Run` into it.

Every rank builds the same Run from the same config and seed (same data, partition and initial
models) and executes the same algorithm round loop (SPMD). :class:`DistributedEngine` wraps the
engine ``build_engine`` returned (reference or fused): client operations run only on the rank
hosting the client, server operations only on rank 0. Messages and the model exchange are the
channel's (:mod:`fsl_fast.transport.torchdist`). Loaders of clients hosted elsewhere become
:class:`RemoteBatches` (batch sizes only; on the server the labels are the uplink's receive
buffers).
"""
from __future__ import annotations

import os
import signal
import sys

import torch

from fsl_fast.config import ConfigError
from fsl_fast.transport.p2p import Transport
from fsl_fast.transport.topology import Topology
from fsl_fast.transport.torchdist import DistributedChannel, PendingRecv

__all__ = ["DistributedEngine", "NullBuffer", "RemoteBatches", "attach"]


class DistributedEngine:
    """Wraps an engine: computes only what this rank owns; moves models across ranks.

    Lists returned for ``ks`` hold ``None`` for clients hosted elsewhere; the algorithm only hands
    them back to this wrapper or to the message hooks, which skip them."""

    def __init__(self, inner, transport: Transport, topo: Topology):
        self.inner = inner
        self.t = transport
        self.topo = topo
        self.device = inner.device
        self._steps = 0  # local steps started this round (for the FSL_FAST_KILL_AT drill)
        drill = os.environ.get("FSL_FAST_KILL_AT", "")
        self._kill_at = tuple(int(v) for v in drill.split(":")) if drill else None
        if self._kill_at is not None and len(self._kill_at) != 3:
            raise ConfigError(f"FSL_FAST_KILL_AT: expected RANK:ROUND:STEP, got {drill!r}")

    def __getattr__(self, name):  # sizes, sync, eval_models, state_dict, ... of the inner engine
        return getattr(self.inner, name)

    def _local(self, ks, *lists):
        idx = [i for i, k in enumerate(ks) if self.topo.hosts(k)]
        return idx, [ks[i] for i in idx], [[lst[i] for i in idx] for lst in lists]

    @staticmethod
    def _spread(n, idx, values):
        out = [None] * n
        for i, v in zip(idx, values):
            out[i] = v
        return out

    def train_stats(self):
        """Every client's training statistics on every rank: each client's row is non-zero on
        the one rank that computed its batches (the server's rank, or the client's for FedAvg's
        whole-model steps), so the sum of rows is exact and equals the in-process run's."""
        t = self.inner.train_stats().to(self.t.device)
        self.t.all_reduce_sum(t, "summing the training statistics")
        return t.cpu()

    def begin_round(self, t: int) -> None:
        self.t.round = t
        self._steps = 0
        self.inner.begin_round(t)

    def _drill(self) -> None:
        """Fault drill: FSL_FAST_KILL_AT=RANK:ROUND:STEP kills this process (SIGKILL, as the
        kernel's OOM killer would) when rank RANK starts its STEP-th local step (from 0) of round
        ROUND, for testing --tolerate-dropouts and the failure paths at a reproducible point."""
        if self._kill_at == (self.topo.rank, self.t.round, self._steps):
            sys.stderr.write(f"rank {self.topo.rank}: FSL_FAST_KILL_AT: killing myself at step "
                             f"{self._steps} of round {self.t.round}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self._steps += 1

    def computes(self, side: str, k: int | None = None) -> bool:
        if side == "server":
            return self.topo.is_server
        return k is not None and self.topo.hosts(k)

    # -- client side ---------------------------------------------------------------------------
    def client_forward(self, ks, xs):
        idx, lk, (lx,) = self._local(ks, xs)
        if lk:
            self._drill()
        zs = self.inner.client_forward(lk, lx) if lk else []
        return self._spread(len(ks), idx, zs)

    def client_backward(self, ks, zs, grads):
        self.t.post_deferred()
        idx, lk, (lz, lg) = self._local(ks, zs, grads)
        lg = [g.wait() if isinstance(g, PendingRecv) else g for g in lg]
        if lk:
            self.inner.client_backward(lk, lz, lg)
        self.t.flush()

    def aux_estimate(self, ks, zs, ys):
        idx, lk, (lz, ly) = self._local(ks, zs, ys)
        return self._spread(len(ks), idx, self.inner.aux_estimate(lk, lz, ly) if lk else [])

    def aux_local_step(self, ks, zs, ys):
        idx, lk, (lz, ly) = self._local(ks, zs, ys)
        return self._spread(len(ks), idx, self.inner.aux_local_step(lk, lz, ly) if lk else [])

    def full_step(self, ks, xs, ys):
        idx, lk, (lx, ly) = self._local(ks, xs, ys)
        if lk:
            self._drill()
            self.inner.full_step(lk, lx, ly)

    # -- server side ---------------------------------------------------------------------------
    def server_step(self, k, z, y, want_grad=False):
        if not self.topo.is_server or z is None:  # (None: client k's upload never arrived)
            return None
        return self.inner.server_step(k, z, y, want_grad=want_grad)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, x, y, batch_size):
        if not self.topo.is_server:
            return float("nan"), float("nan")  # rank 0's record is broadcast after the round
        return self.inner.evaluate(x, y, batch_size)


class NullBuffer:
    """Client ranks keep no alignment buffers (the server's copy is the one used)."""

    def append(self, payload, y):
        pass

    def __len__(self):
        return 0

    def state_dict(self):
        return {"chunks": []}

    def load_state_dict(self, sd):
        pass


class RemoteBatches:
    """Stands in for the loader of a client hosted on another rank: the same number and sizes of
    batches, no data. On the server the labels are receive buffers that the uplink fills in place
    (initialized to -1 so that any use before the upload fails loudly)."""

    def __init__(self, loader, device, placeholder_x):
        self.n = loader.num_samples
        self.bs = loader.batch_size
        self.device = device
        self.x = placeholder_x

    def __len__(self):
        return -(-self.n // self.bs)

    def __iter__(self):
        for i in range(0, self.n, self.bs):
            yield self.x, torch.full((min(self.bs, self.n - i),), -1, dtype=torch.int64, device=self.device)


def attach(run, transport: Transport) -> None:
    """Turn an in-process Run into this rank's part of a distributed run (in place): wrap the
    engine, replace the loaders of clients hosted elsewhere, rebuild the algorithm on a
    :class:`~fsl_fast.transport.torchdist.DistributedChannel`."""
    topo = transport.topo
    cls = type(run.algo)
    engine = DistributedEngine(run.engine, transport, topo)
    dev = engine.device
    placeholder = torch.empty(0, device=dev)
    loaders = [ld if topo.hosts(k) else RemoteBatches(ld, dev, placeholder) for k, ld in enumerate(run.loaders)]
    channel = DistributedChannel(run.cfg, run.ledger, engine, transport, run.split.cut_shape,
                                 run.data.num_classes, whole_model=cls.whole_model,
                                 server_copies=cls.server_copies)
    algo = cls(run.cfg, engine, loaders, run.weights, channel)
    if not topo.is_server:
        algo.buffers = [NullBuffer() for _ in algo.buffers]
    run.engine, run.loaders, run.algo, run.channel = engine, loaders, algo, channel
