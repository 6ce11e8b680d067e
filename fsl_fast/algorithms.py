"""The five algorithms, written once over the engine interface (fsl_fast.engines.base).

The base class owns the round loop and both schedules; each algorithm is a short set of hooks named
after the paper's steps. Computation goes through the engine; every message goes through the
channel (fsl_fast.transport.base.Channel), which applies the links' codecs and counts bytes in the
ledger, so the same code runs in one process and across processes.

Schedules (DESIGN.md):
- ``sequential`` (the authors' code): clients one after another; the server consumes each upload
  at once; client i aligns at its first iteration of an alignment round, after that upload.
- ``parallel`` (the paper): clients advance in lockstep by local iteration index; uploads of one
  iteration are consumed in ascending client order; in an alignment round all auxiliaries are
  aligned after the iteration-0 uploads and before the iteration-0 client updates.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from fsl_fast.codec import slice_rows
from fsl_fast.faults import FiniteGuard
from fsl_fast.ledger import tensor_bytes
from fsl_fast.transport.base import Channel


class AlignBuffer:
    """Server-side FIFO of one client's uploaded smashed data: keeps the newest ``capacity`` rows.

    Chunks are stored as sent (a QuantizedTensor or a top-k ``Sparse`` when the uplink has a
    codec) and decoded on use.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.chunks: list = []  # (payload, labels) with payload a tensor or QuantizedTensor

    def __len__(self) -> int:
        return sum(int(y.shape[0]) for _, y in self.chunks)

    def append(self, payload, y: torch.Tensor) -> None:
        self.chunks.append((payload, y))
        excess = len(self) - self.capacity
        while excess > 0:
            p, yy = self.chunks[0]
            n = int(yy.shape[0])
            if n <= excess:
                self.chunks.pop(0)
                excess -= n
            else:
                self.chunks[0] = (slice_rows(p, excess), yy[excess:])
                excess = 0

    def tensors(self, decode) -> tuple[torch.Tensor, torch.Tensor]:
        zs = [decode(p) for p, _ in self.chunks]
        ys = [y for _, y in self.chunks]
        return torch.cat(zs), torch.cat(ys)

    def state_dict(self) -> dict:
        out = []
        for p, y in self.chunks:
            if isinstance(p, torch.Tensor):
                out.append({"z": p, "y": y})
            elif hasattr(p, "index"):  # fsl_fast.codec.Sparse
                out.append({"s": p.state_dict(), "y": y})
            else:
                out.append({"q": p.state_dict(), "y": y})
        return {"chunks": out}

    def load_state_dict(self, sd: dict) -> None:
        self.chunks = []
        for c in sd["chunks"]:
            if "z" in c:
                self.chunks.append((c["z"], c["y"]))
            elif "s" in c:
                from fsl_fast.codec import Sparse

                self.chunks.append((Sparse.from_state_dict(c["s"]), c["y"]))
            else:
                from fsl_fast.ops.quantize import QuantizedTensor

                self.chunks.append((QuantizedTensor.from_state_dict(c["q"]), c["y"]))


def participation_seed(seed: int, t: int) -> int:
    return (seed * 15_485_863 + 7_777 + t) % (2**63 - 1)


def dropout_seed(seed: int, t: int) -> int:
    return (seed * 32_452_843 + 999_331 + t) % (2**63 - 1)


class Algorithm:
    """Owns the round loop. Subclasses implement ``local_iteration`` and ``end_of_round``."""

    key = ""
    uses_aux = False
    server_copies = False  # one server model per client (SplitFed v1, FedAvg's whole models)
    whole_model = False  # FedAvg: clients train client+server halves locally
    aligns = False  # FSL-SAGE: the server aligns the auxiliary models

    def __init__(self, cfg, engine, loaders, weights, channel: Channel):
        self.cfg = cfg
        self.engine = engine
        self.loaders = loaders
        self.m = len(loaders)
        self.weights = weights  # FedAvg weights of all clients (n_k / n)
        self.active = list(range(self.m))  # the clients taking part in the current round
        self.survivors = list(self.active)  # ... and those of them that did not drop out
        self.lost: set[int] = set()  # clients that left the run for good (their process died)
        self.channel = channel
        self.q = cfg.server_update_interval
        self.buffers = [AlignBuffer(cfg.buffer_size) for _ in range(self.m)] if self.uses_aux else []
        self.times: dict[str, float] = {}
        self._round = 0  # the round being run
        # non-finite numbers end the run at the end of the phase where they appear (faults.py)
        self.guard = FiniteGuard()
        self.round_extra: dict = {}  # extra per-round metrics (estimate_quality)
        # --client-profile: FLOPs per sample of each step (fsl_fast.clock.step_flops); when set,
        # each round records its steps in ``trace`` for the simulated clock
        self.step_flops: dict | None = None
        self.trace = None
        # --hold-estimate-norm (FSL-SAGE ablation): per client, the factor applied to its estimate
        self.estimate_scale: list[float] = [1.0] * self.m

    # -- timing --------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str):
        self.engine.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.engine.sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    # -- divergence checks (fsl_fast.faults) ------------------------------------------------------
    def watch(self, what: str, ks, tensors, side: str = "client") -> None:
        """Queue per-client tensors (None for clients computed elsewhere) for the phase's check."""
        if not self.guard.enabled:
            return
        batched = self.engine.batched_view(tensors)
        if batched is not None:
            self.guard.add_many(what, ks, tensors, batched=batched)
            return
        pairs = [(k, t) for k, t in zip(ks, tensors)
                 if isinstance(t, torch.Tensor) and self.engine.computes(side, k)]
        if pairs:
            self.guard.add_many(what, [k for k, _ in pairs], [t for _, t in pairs])

    _MODEL_NAMES = {"aux": "auxiliary model", "client": "client model", "server": "server model"}

    def watch_models(self, part: str, ks, side: str) -> None:
        """Queue the parameters of model ``part`` of each client in ``ks`` (None: the global one)."""
        if not self.guard.enabled:
            return
        what = f"{self._MODEL_NAMES[part]} parameters"
        ks = [k for k in ks if self.engine.computes(side, k)]
        state = [self.engine.state_tensors(part, k) for k in ks]
        if ks and all(len(s) == 1 for s in state):  # flat engines: one row per client
            self.guard.add_many(what, ks, [s[0] for s in state])
        else:
            for k, s in zip(ks, state):
                self.guard.add(k, what, s)

    # -- the simulated clock's record (fsl_fast.clock) -------------------------------------------
    def trace_compute(self, ks, rows, kind: str) -> None:
        if self.trace is not None:
            for k, n in zip(ks, rows):
                self.trace.compute(k, self.step_flops[kind] * n)

    def trace_finish(self, model_bytes: int) -> None:
        """The surviving participants upload ``model_bytes`` each and download as much."""
        if self.trace is not None:
            for k in self.survivors:
                self.trace.finish(k, model_bytes, model_bytes)

    def initial_broadcast(self) -> None:
        """Round 0 sends the initial models down; not counted in the paper's convention."""
        kinds = [("client_model", self.engine.client_bytes())]
        if self.whole_model:
            kinds.append(("server_model", self.engine.server_bytes()))
        if self.uses_aux:
            kinds.append(("aux_model", self.engine.aux_bytes()))
        for kind, nbytes in kinds:
            self.channel.count_initial(kind, nbytes, self.m)

    # -- partial participation -------------------------------------------------------------------
    def participants(self, t: int) -> list[int]:
        """The clients of round t: all, or M drawn uniformly without replacement from a generator
        seeded by (seed, t) alone, so a resumed run draws the same sets (ascending order)."""
        M = getattr(self.cfg, "clients_per_round", 0)
        if not M or M >= self.m:
            return list(range(self.m))
        g = torch.Generator().manual_seed(participation_seed(self.cfg.seed, t))
        return sorted(torch.randperm(self.m, generator=g)[:M].tolist())

    def _park_buffers(self) -> None:
        """--client-store: FSL-SAGE's alignment buffers of clients sitting this round out go to
        the store; the participants' come back."""
        store = self.engine.client_store
        if not self.aligns:
            return
        on = set(self.active)
        for k, b in enumerate(self.buffers):
            if b is not None and k not in on:
                store.put("buffer", k, b.state_dict())
                self.buffers[k] = None
        for k in self.active:
            if self.buffers[k] is None:
                b = AlignBuffer(self.cfg.buffer_size)
                sd = store.get("buffer", k)
                if sd is not None:
                    b.load_state_dict(sd)
                self.buffers[k] = b

    def dropouts(self, t: int, iters: dict) -> dict[int, int]:
        """{client: local iterations it completes} for the participants of round t that fail
        (``--dropout-prob``): client k fails when u_k < p, after floor(v_k * iters_k) iterations,
        with u, v drawn for all clients from a generator seeded by (seed, t) alone."""
        p = float(getattr(self.cfg, "dropout_prob", 0.0))
        if p <= 0:
            return {}
        g = torch.Generator().manual_seed(dropout_seed(self.cfg.seed, t))
        u = torch.rand(self.m, generator=g, dtype=torch.float64)
        v = torch.rand(self.m, generator=g, dtype=torch.float64)
        return {k: min(int(v[k] * iters[k]), iters[k] - 1) for k in iters if iters[k] and u[k] < p}

    def round_weights(self) -> list[float]:
        """FedAvg weights of this round: n_k over the surviving participants' samples, 0 for the
        others (whose models are then overwritten by the average, as a sampled client starts from
        the global model)."""
        if len(self.survivors) == self.m:
            return self.weights
        total = sum(self.weights[k] for k in self.survivors)
        on = set(self.survivors)
        return [self.weights[k] / total if k in on else 0.0 for k in range(self.m)]

    def average_or_restore(self, clients=True, aux=False, servers=False) -> None:
        """FedAvg over the survivors, written to every client; with none (all participants
        dropped) the participants go back to the models of the last aggregation."""
        if self.survivors:
            self.channel.average(self.round_weights(), clients=clients, aux=aux, servers=servers)
        else:
            self.engine.restore(self.active, clients=clients, aux=aux, servers=servers)

    # -- the round loop ------------------------------------------------------------------------
    def run_round(self, t: int) -> dict[str, float]:
        self.times = {}
        self._round = t
        self.channel.begin_round(t)
        self.round_extra = {}
        self.guard.round = t
        self.guard.seconds = 0.0
        self.guard.discard()
        self.active = self.participants(t)
        watch_update = self.cfg.log_estimate_quality
        if watch_update:  # the averaged client model at the start of the round
            start = [s.detach().clone() for s in self.engine.state_tensors("client")]
        if hasattr(self.engine, "participate"):  # --client-store: the round's clients move in
            with self.phase("store"):
                self.engine.participate(self.active)
                self._park_buffers()
        if self.step_flops is not None:
            from fsl_fast.clock import RoundTrace

            self.trace = RoundTrace()
        if len(self.active) < self.m:
            self.round_extra["participants"] = list(self.active)
        self.engine.begin_round(t)
        iters = {k: self.cfg.local_epochs * len(self.loaders[k]) for k in self.active}
        dropped = self.dropouts(t, iters)
        if getattr(self.cfg, "dropout_prob", 0.0) > 0:
            self.round_extra["dropped"] = [{"client": k, "iterations_done": n} for k, n in sorted(dropped.items())]
        gone = sorted(k for k in self.active if k in self.lost)
        if gone:
            self.round_extra["lost_clients"] = gone
            dropped.update({k: 0 for k in gone})
        iters.update(dropped)  # a client that fails stops after that many iterations
        self.survivors = [k for k in self.active if k not in dropped]
        streams = {k: self._batches(k) for k in self.active}
        if self.cfg.schedule == "sequential":
            for k in self.active:
                for it in range(iters[k]):
                    x, y = next(streams[k])
                    self.local_iteration(t, it, [k], [x], [y])
        else:
            for it in range(max(iters.values(), default=0)):
                ks = [k for k in self.active if it < iters[k]]
                batches = [next(streams[k]) for k in ks]
                self.local_iteration(t, it, ks, [b[0] for b in batches], [b[1] for b in batches])
        lost = self.channel.unreachable()
        if lost:  # their updates are discarded, as a dropout's; they take no further part
            self.lost.update(lost)
            self.survivors = [k for k in self.survivors if k not in lost]
            self.round_extra["lost"] = [lost[k] for k in sorted(lost)]
        with self.phase("aggregate"):
            self.end_of_round(t)
        if watch_update:
            now = self.engine.state_tensors("client")
            self.round_extra["client_update_norm"] = math.sqrt(sum(
                float((a.double() - b.double()).pow(2).sum()) for a, b in zip(now, start)))
        if self.guard.enabled:
            self.times["checks"] = self.guard.seconds  # overlaps the phases above
        return dict(self.times)

    def _batches(self, k: int):
        dev = self.engine.device
        for _ in range(self.cfg.local_epochs):
            for x, y in self.loaders[k]:
                yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    def local_iteration(self, t, it, ks, xs, ys):  # pragma: no cover - abstract
        raise NotImplementedError

    def client_forward(self, ks, xs):
        """The clients' forward pass, its smashed data checked."""
        self.trace_compute(ks, [x.shape[0] for x in xs], "client_fwd")
        with self.phase("client"):
            zs = self.engine.client_forward(ks, xs)
        self.watch("smashed data", ks, zs)
        self.guard.verify("client forward")
        return zs

    def client_update(self, ks, zs, grads, what: str) -> None:
        """Backpropagate ``grads`` (the gradient estimate, a local loss's or the server's
        gradient) through the clients and step; the gradients are checked. The clients'
        parameters are checked at the end of local training (``check_local_models``): Adam moves a
        parameter by about lr per step, so finite gradients keep them finite, and a parameter that
        overflowed anyway makes the next forward's smashed data non-finite."""
        if what is not None:
            self.watch(what, ks, grads)
            self.guard.verify("client step")
        if self.trace is not None:
            self.trace_compute(ks, [g.shape[0] for g in grads], "client_bwd")
        with self.phase("client"):
            self.engine.client_backward(ks, zs, grads)

    def check_local_models(self, parts=("client",)) -> None:
        """Every surviving participant's local models after its last local step, before they are
        averaged (a dropped client's models are discarded)."""
        ks = list(self.survivors)
        for part in parts:
            self.watch_models(part, ks, "client")
        self.guard.verify("local training")

    def end_of_round(self, t):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared steps --------------------------------------------------------------------------
    def periodic_upload(self, it, ks, zs, ys, keep: bool = False) -> None:
        """Every q-th local iteration the clients upload their smashed data and the server takes
        one step per upload, in ascending client order; ``keep`` appends each upload (in the form
        sent) to that client's alignment buffer."""
        if it % self.q:
            return
        with self.phase("server"):
            for k, z, y in zip(ks, zs, ys):
                z_srv, payload = self.channel.upload(k, z, y)
                if self.trace is not None:
                    self.trace.send(k, self.channel.last_up_bytes, self.step_flops["server"] * y.shape[0])
                self.engine.server_step(k, z_srv, y)
                if keep and payload is not None:  # (None: an upload that never arrived)
                    self.buffers[k].append(payload, y)
        self.check_servers(ks)

    def check_servers(self, ks) -> None:
        """After a server phase: each client's server copy, or the shared server once (named by
        its client when the phase served one client, as in the sequential schedule)."""
        if self.server_copies:
            self.watch_models("server", ks, "server")
        else:
            self.watch_models("server", [ks[0] if len(ks) == 1 else None], "server")
        self.guard.verify("server step")

    def fedavg_clients(self, with_aux: bool = False) -> None:
        self.check_local_models(("client", "aux") if self.uses_aux else ("client",))
        self.average_or_restore(clients=True, aux=with_aux, servers=self.server_copies)
        self.channel.count_models("client_model", self.engine.client_bytes(), len(self.survivors))
        if with_aux:
            self.channel.count_models("aux_model", self.engine.aux_bytes(), len(self.survivors))
        self.trace_finish(self.engine.client_bytes() + (self.engine.aux_bytes() if with_aux else 0))
        self.check_aggregate()

    def check_aggregate(self) -> None:
        """The averaged models and the server (what evaluation and the next round start from)."""
        self.watch_models("client", [None], "server")
        self.watch_models("server", [None], "server")
        self.guard.verify("aggregation")

    def state_dict(self) -> dict:
        # (None: a buffer parked in the client store)
        out = {"buffers": [None if b is None else b.state_dict() for b in self.buffers],
               "lost": sorted(self.lost), **self.channel.state_dict()}
        if self.cfg.hold_estimate_norm:
            out["estimate_scale"] = list(self.estimate_scale)
        return out

    def load_state_dict(self, sd: dict) -> None:
        self.lost = set(sd.get("lost", []))
        self.channel.load_state_dict(sd)
        if self.cfg.hold_estimate_norm:
            self.estimate_scale = [float(v) for v in sd.get("estimate_scale", [1.0] * self.m)]
        for k, s in enumerate(sd["buffers"]):
            if s is None:
                self.buffers[k] = None
            else:
                if self.buffers[k] is None:
                    self.buffers[k] = AlignBuffer(self.cfg.buffer_size)
                self.buffers[k].load_state_dict(s)


class FedAvg(Algorithm):
    """FedAvg (McMahan et al.): each client trains the whole model; whole models are averaged."""

    key = "fedavg"
    server_copies = True
    whole_model = True

    def local_iteration(self, t, it, ks, xs, ys):
        self.trace_compute(ks, [x.shape[0] for x in xs], "full")
        with self.phase("client"):
            self.engine.full_step(ks, xs, ys)

    def end_of_round(self, t):
        self.check_local_models(("client", "server") if self.server_copies else ("client",))
        self.average_or_restore(clients=True, servers=self.server_copies)
        n = len(self.survivors)
        self.channel.count_models("client_model", self.engine.client_bytes(), n)
        self.channel.count_models("server_model", self.engine.server_bytes(), n)
        self.trace_finish(self.engine.client_bytes() + self.engine.server_bytes())
        self.check_aggregate()


class FedAvgSharedServer(FedAvg):
    """FedAvg as the FSL-SAGE authors' code runs it (``--fedavg-server shared``): every client
    trains its client half on top of one server half that all clients share and step in turn (one
    server optimizer), and only the client halves are averaged. A local step is the whole model's
    forward, backward and step; it runs as the client forward, the shared server's step returning
    the cut-layer gradient, and the client's backward, the same arithmetic. Communication is
    counted as for FedAvg (whole models up and down per client), as the authors count it."""

    server_copies = False
    whole_model = False  # (the engines run it as a split model with one server)

    def local_iteration(self, t, it, ks, xs, ys):
        self.trace_compute(ks, [x.shape[0] for x in xs], "full")
        with self.phase("client"):
            zs = self.engine.client_forward(ks, xs)
            self.watch("smashed data", ks, zs)
            self.guard.verify("client forward")
            grads = [self.engine.server_step(k, z.detach(), y, want_grad=True) for k, z, y in zip(ks, zs, ys)]
            self.watch("server gradient", ks, grads, "server")
            self.guard.verify("server step")
            self.engine.client_backward(ks, zs, grads)

    def initial_broadcast(self) -> None:
        super().initial_broadcast()
        self.channel.count_initial("server_model", self.engine.server_bytes(), self.m)

    def end_of_round(self, t):
        self.check_servers(list(self.survivors) or list(self.active))
        super().end_of_round(t)


def algorithm_class(cfg) -> type:
    """The Algorithm class that runs ``cfg`` (FedAvg's shared-server variant by --fedavg-server)."""
    if cfg.algorithm == "fedavg" and cfg.fedavg_server == "shared":
        return FedAvgSharedServer
    return ALGORITHM_CLASSES[cfg.algorithm]


class SplitFed(Algorithm):
    """SplitFed: every iteration uploads z, the server steps and returns dL/dz, the client steps."""

    def local_iteration(self, t, it, ks, xs, ys):
        zs = self.client_forward(ks, xs)
        grads, computed = [], []
        with self.phase("server"):
            for k, z, y in zip(ks, zs, ys):
                z_srv, _ = self.channel.upload(k, z, y)
                g = self.engine.server_step(k, z_srv, y, want_grad=True)
                computed.append(g)
                grads.append(self.channel.reply(k, g))
                if self.trace is not None:  # the client waits for the server's answer
                    self.trace.request(k, self.channel.last_up_bytes, self.step_flops["server"] * y.shape[0],
                                       tensor_bytes(g))
        # the input gradient is non-finite whenever the server's loss is; the server's parameters
        # are checked at the end of the round (check_aggregate)
        self.watch("server gradient", ks, computed, "server")
        self.guard.verify("server step")
        # checked above where it was computed (a client rank's copy is checked on receipt)
        self.client_update(ks, zs, grads, None)

    def end_of_round(self, t):
        self.fedavg_clients()


class SplitFedV1(SplitFed):
    """SplitFed v1 (official key sl_multi_server): one server copy per client, averaged server-side."""

    key = "splitfed_v1"
    server_copies = True


class SplitFedV2(SplitFed):
    """SplitFed v2 (official key sl_single_server): one shared server model."""

    key = "splitfed_v2"


class CSEFSL(Algorithm):
    """CSE-FSL (Mu et al. 2023): clients train on a local auxiliary loss; every q-th iteration the
    smashed data goes up and the server steps; client and auxiliary models are averaged."""

    key = "cse_fsl"
    uses_aux = True

    def local_iteration(self, t, it, ks, xs, ys):
        zs = self.client_forward(ks, xs)
        self.periodic_upload(it, ks, zs, ys)
        self.trace_compute(ks, [y.shape[0] for y in ys], "aux")
        with self.phase("client"):
            grads = self.engine.aux_local_step(ks, zs, ys)
        self.client_update(ks, zs, grads, "local auxiliary gradient")

    def end_of_round(self, t):
        self.fedavg_clients(with_aux=True)


class FSLSAGE(Algorithm):
    """FSL-SAGE (Nair et al. 2025): clients train with the auxiliary estimate of the cut-layer
    gradient; every q-th iteration the smashed data goes up (server steps, alignment buffer grows);
    every l rounds the server aligns each auxiliary to the true gradients on its buffer."""

    key = "fsl_sage"
    uses_aux = True
    aligns = True

    def local_iteration(self, t, it, ks, xs, ys):
        zs = self.client_forward(ks, xs)
        self.periodic_upload(it, ks, zs, ys, keep=True)
        if t % self.cfg.align_interval == 0 and it == 0:
            with self.phase("align"):
                self.align(ks)
            self.watch_models("aux", ks, "server")
            self.guard.verify("alignment")
        self.trace_compute(ks, [y.shape[0] for y in ys], "aux")
        with self.phase("client"):
            grads = self.engine.aux_estimate(ks, zs, ys)
            if self.cfg.hold_estimate_norm:
                grads = [g if self.estimate_scale[k] == 1.0 else g * self.estimate_scale[k] for k, g in zip(ks, grads)]
        self.client_update(ks, zs, grads, "gradient estimate")

    def align(self, ks):
        """Server refreshes the true-gradient targets on each buffer, fits the auxiliaries to them,
        and sends each aligned auxiliary down (a process that hosts only clients receives them)."""
        ks = self.channel.reachable(ks)
        if self.channel.at_server:
            self._align_on_server(ks)
        self.channel.send_aux(ks)

    def _align_on_server(self, ks):
        data = [self.buffers[k].tensors(self.channel.decode) for k in ks]
        log = self.cfg.log_estimate_quality
        if log:
            from fsl_fast.engines.base import estimate_quality

            before = estimate_quality(self.engine, ks, data)
        if self.cfg.hold_estimate_norm:
            from fsl_fast.engines.base import estimate_norms

            norms = estimate_norms(self.engine, ks, data)
        self.engine.align(ks, data)
        if self.cfg.hold_estimate_norm:  # keep each estimate's norm on its buffer across the alignment
            for k, a, b in zip(ks, norms, estimate_norms(self.engine, ks, data)):
                if a > 0 and b > 0:
                    self.estimate_scale[k] *= a / b
            self.round_extra.setdefault("estimate_scale", []).extend(
                {"client": int(k), "scale": self.estimate_scale[k]} for k in ks)
        if log:
            after = estimate_quality(self.engine, ks, data)
            self.round_extra.setdefault("estimate_quality", []).extend(
                {"client": b["client"], "cosine_before": b["cosine"], "norm_ratio_before": b["norm_ratio"],
                 "cosine_after": a["cosine"], "norm_ratio_after": a["norm_ratio"]} for b, a in zip(before, after))
        for k, (Z, _) in zip(ks, data):
            if self.trace is not None:  # the client waits for its aligned auxiliary
                self.trace.request(k, 0, self.step_flops["align_row"] * Z.shape[0] * self.cfg.align_epochs,
                                   self.engine.aux_bytes())

    def end_of_round(self, t):
        self.fedavg_clients()


ALGORITHM_CLASSES = {c.key: c for c in (FedAvg, SplitFedV1, SplitFedV2, CSEFSL, FSLSAGE)}
