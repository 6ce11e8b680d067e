"""Distributed runtime: server and clients in separate processes (or machines) on torch.distributed.

Launch with torchrun (docs/distributed.md has the multi-machine form)::

    torchrun --nproc-per-node 3 -m fsl_fast.train --distributed --schedule parallel ...

Design (SPMD). Every rank builds the same :class:`fsl_fast.runner.Run` from the same config and
seed (same data, partition and initial models; rank 0 checks a config fingerprint) and executes
the same :class:`Algorithm` round loop. Rank 0 is the server and the FedAvg aggregator; ranks
1..R-1 host the clients in contiguous blocks (``client_blocks``). :func:`attach` turns the Run into
this rank's part:

- :class:`DistributedEngine` wraps whatever engine ``build_engine`` returned (reference or fused).
  Client operations run only on the rank hosting the client, server operations only on rank 0;
  alignment sends each aligned auxiliary model down; FedAvg moves flat [P] buffers in which each
  client rank has pre-reduced its own clients (``--dist-fedavg``: ``ordered``, the running sum
  passed rank 1 -> ... -> R-1 -> 0 so every addition happens in the in-process order, bit-equal
  results; or ``allreduce``, one all-reduce, equal up to float32 reassociation), then rank 0
  broadcasts the average.
- :func:`distributed_algorithm` subclasses the algorithm so that its message hooks
  (``send_smashed``, ``send_gradient``, ``align``) move real tensors through :class:`Transport`
  (isend/irecv; gloo on CPU, NCCL on GPU): smashed data (or int8/int4 codes + scales) and labels
  up, SplitFed gradients down.
- Loaders of clients hosted elsewhere become :class:`_RemoteBatches` (batch sizes only; on the
  server the labels are the receive buffers of the uplink).

Every message is a fixed-size int64 header (kind, round, client, dtype and shape of each tensor)
followed by the tensors. The receiver checks the header against what the SPMD program expects
and the payload for finiteness (labels: range) before use, and raises :class:`DistributedError`
naming the sender rank, the client and the round.

Accounting. The ledger on rank 0 counts exactly what the in-process run counts (so metrics agree).
The transport counts the payload bytes each rank puts on the wire; they are summed on rank 0 each
round into ``wire_*`` metrics. Per-client messages (smashed data, labels, gradients, auxiliary
downlink) equal the ledger byte for byte; the model exchange differs on purpose: the ledger counts
every client's upload and download (the papers' convention), the wire carries one pre-reduced
buffer per client rank each way.

Faults. Every wait has the ``--dist-timeout``; a peer that dies closes its sockets and the waiting
ranks fail at once, a peer that stalls makes them time out. Each rank writes a heartbeat into the
launcher's store, so the error names the rank that stopped and the round. A watchdog thread ends
the process if a wait outlives the timeout anyway, and SIGTERM from torchrun (which stops the
survivors when one worker fails) is reported with the round. Checkpoints are per-rank shards
committed by rank 0 after a barrier (``checkpoints/dist.json``); ``--resume`` continues from the last
committed round.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fsl_fast import faults
from fsl_fast.codec import AtMost, wire
from fsl_fast.ops.fedavg import weighted_sum
from fsl_fast.config import ConfigError
from fsl_fast.faults import EXIT_DIVERGED, EXIT_IO, Divergence, RunIOError

__all__ = [
    "DistributedError",
    "PeerLost",
    "Topology",
    "client_blocks",
    "Transport",
    "DistributedEngine",
    "distributed_algorithm",
    "attach",
    "train_distributed",
    "MANIFEST",
]

MANIFEST = "checkpoints/dist.json"
HEADER_LEN = 48  # int64s: 5 + _MAX_TENSORS * (2 + _MAX_DIMS) = 45, padded
_MAGIC = 0x46534C46  # "FSLF"
_MAX_TENSORS = 5  # a top-k message with quantized values: codes, scales, header, positions, labels
_MAX_DIMS = 6
# Message kinds -> tag base. Tags keep the streams of one (sender, receiver) pair apart; messages
# of one kind between one pair are matched in program order, which SPMD makes identical.
_KIND_TAGS = {"smashed": 1, "gradients": 2, "aux_model": 3, "model_sum": 4}
_KIND_WORDS = {"smashed": "smashed data", "gradients": "cut-layer gradient", "aux_model": "auxiliary model",
               "model_sum": "running FedAvg sum"}
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
           torch.int32, torch.int64]
_DTYPE_CODE = {d: i + 1 for i, d in enumerate(_DTYPES)}
WIRE_KINDS = ("smashed", "labels", "gradients", "client_model", "aux_model", "server_model")
_HEARTBEAT_S = 0.25
_LOST_AFTER_S = 5.0  # --tolerate-dropouts: a rank whose heartbeat stands still this long is dead


class DistributedError(RuntimeError):
    """A peer failed, stalled, or sent something the protocol did not expect."""


class PeerLost(DistributedError):
    """--tolerate-dropouts: a message from a client rank did not arrive; the rank is out of the run."""

    def __init__(self, msg: str, peer: int):
        super().__init__(msg)
        self.peer = peer


class Retired(Exception):
    """This rank was dropped from the run (--tolerate-dropouts) and leaves quietly."""


# ---------------------------------------------------------------------------------------------
# Who hosts whom


def client_blocks(num_clients: int, world_size: int) -> list[range]:
    """Clients of each rank: rank 0 (the server) none, ranks 1..R-1 contiguous blocks whose sizes
    differ by at most one (the first ``m % (R-1)`` client ranks take one more)."""
    if world_size < 2:
        raise ConfigError(f"--distributed: needs at least 2 processes (server + 1 client rank), "
                          f"got world size {world_size}")
    nr = world_size - 1
    if num_clients < nr:
        raise ConfigError(f"--clients: {num_clients} clients cannot fill {nr} client ranks; "
                          f"use at least {nr} clients or fewer processes")
    base, extra = divmod(num_clients, nr)
    out, start = [range(0)], 0
    for r in range(nr):
        n = base + (1 if r < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class Topology:
    def __init__(self, rank: int, world_size: int, num_clients: int):
        self.rank = rank
        self.world_size = world_size
        self.blocks = client_blocks(num_clients, world_size)
        self._owner = {k: r for r, b in enumerate(self.blocks) for k in b}
        self.live = list(range(world_size))  # ranks still in the run (--tolerate-dropouts drops some)

    def drop(self, ranks) -> None:
        self.live = [r for r in self.live if r not in set(ranks)]

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    def owner(self, k: int) -> int:
        return self._owner[k]

    def hosts(self, k: int) -> bool:
        return self._owner[k] == self.rank

    @property
    def local_clients(self) -> range:
        return self.blocks[self.rank]


# ---------------------------------------------------------------------------------------------
# Transport


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "] " in s and s.startswith("["):  # strip gloo's "[file.cc:123] " prefix
        s = s.split("] ", 1)[1]
    return s.split(". This is typically", 1)[0][:300]


def _about(kind: str, client: int) -> str:
    return _KIND_WORDS[kind] + (f" of client {client}" if client >= 0 else "")


class Transport:
    """Point-to-point messages and collectives with headers, checks, timeouts and byte counters.

    ``where`` (round, phase) is set by the runtime so every error names the round."""

    def __init__(self, topo: Topology, device: torch.device, timeout_s: float, store=None):
        self.topo = topo
        self.rank = topo.rank
        self.device = torch.device(device)
        self.timeout_s = float(timeout_s)
        self.round = -1
        self.phase = "startup"
        self._pending: list = []  # (work, tensors kept alive until the send completes)
        self._deferred: list = []  # sends to post at the next post_deferred()
        self.blocked: tuple[float, str] | None = None
        self.sent: dict[tuple[str, str], int] = {}
        self.received: dict[tuple[str, str], int] = {}
        self.header_bytes = 0
        self.store = store
        # One store client serves the heartbeat thread, error paths and the SIGTERM handler; the
        # lock is reentrant because the handler may interrupt the main thread inside it.
        self.store_lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # --tolerate-dropouts: client ranks found dead are dropped; the survivors then talk through
        # a gloo group of their own (_pg, built on the store), ranks renumbered by _group_rank.
        self.tolerate = False
        self.lost: set[int] = set()
        self.lost_why: dict[int, str] = {}
        self._pg = None
        self._gen = 0
        self._group_rank: dict[int, int] = {}

    # -- where we are, for messages -----------------------------------------------------------
    def where(self) -> str:
        return f"round {self.round}" if self.round >= 0 else self.phase

    def error(self, what: str, cause: BaseException | None = None, probe: bool = False) -> DistributedError:
        """The error to raise; failures of the network (``cause``, ``probe``) also name the ranks
        whose heartbeat stopped."""
        msg = f"rank {self.rank}: {what} in {self.where()}"
        if cause is not None:
            msg += f": {_short(cause)}"
        silent = self.silent_peers() if (cause is not None or probe) else []
        if silent:
            msg += f" [no heartbeat from rank {', '.join(silent)}: it stopped or died]"
        for r, why in (self.exited_peers() if (cause is not None or probe) else []):
            msg += f" [rank {r} exited: {why}]"
        return DistributedError(msg)

    def exited_peers(self) -> list[tuple[int, str]]:
        """Peers that ended on purpose, with the line they printed (left in the store by _die)."""
        if self.store is None:
            return []
        out = []
        try:
            with self.store_lock:
                for r in range(self.topo.world_size):
                    key = f"fsl_fast/exit/{r}"
                    if r != self.rank and r not in self.lost and self.store.check([key]):
                        code, _, why = self.store.get(key).decode(errors="replace").partition("|")
                        if code != "143":  # stopped by the launcher: not the cause
                            out.append((r, why))
        except Exception:  # noqa: BLE001 - no store: no diagnosis
            return []
        return out

    def _wait(self, work, what: str) -> None:
        self.blocked = (time.monotonic(), what)
        try:
            ok = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            if self.device.type == "cuda":
                # NCCL's wait only orders the stream; block here, where the watchdog can see it.
                torch.cuda.current_stream(self.device).synchronize()
        except RuntimeError as e:
            raise self.error(what + " failed", e) from None
        finally:
            self.blocked = None
        if ok is False:
            raise self.error(f"{what} timed out after {self.timeout_s:g} s", probe=True)

    # -- point to point ------------------------------------------------------------------------
    def _header(self, kind: str, client: int, tensors) -> torch.Tensor:
        h = [_MAGIC, _KIND_TAGS[kind], self.round, client, len(tensors)]
        for t in tensors:
            h += [_DTYPE_CODE[t.dtype], t.dim()] + list(t.shape) + [0] * (_MAX_DIMS - t.dim())
        h += [0] * (HEADER_LEN - len(h))
        return torch.tensor(h, dtype=torch.int64, device=self.device)

    def send(self, dst: int, kind: str, client: int, items: list[tuple[str, torch.Tensor]],
             direction: str) -> None:
        """Post a message (header then tensors) to ``dst``; returns at once. ``items`` are
        (ledger kind, tensor) pairs; their bytes are counted under ``direction``."""
        tensors = [t.contiguous() for _, t in items]
        if len(tensors) > _MAX_TENSORS or any(t.dim() > _MAX_DIMS for t in tensors):
            raise ValueError(f"transport: at most {_MAX_TENSORS} tensors of at most {_MAX_DIMS} dims")
        if dst in self.lost:
            return  # dropped from the run: nothing goes to it any more
        base = _KIND_TAGS[kind] * 8
        hdr = self._header(kind, client, tensors)
        what = f"sending the {_about(kind, client)} to rank {dst}"
        try:
            works = [self._isend(hdr, dst, base)]
            works += [self._isend(t, dst, base + 1 + j) for j, t in enumerate(tensors)]
        except RuntimeError as e:
            if self._tolerable(dst):
                self.mark_lost(dst, _short(e))
                return
            raise self.error(what + " failed", e) from None
        self._pending.append((works, [hdr] + tensors, what, dst))
        self.header_bytes += hdr.numel() * hdr.element_size()
        for (lk, _), t in zip(items, tensors):
            key = (direction, lk)
            self.sent[key] = self.sent.get(key, 0) + t.numel() * t.element_size()

    def defer_send(self, *args) -> None:
        """``send`` later, at ``post_deferred`` (same arguments)."""
        self._deferred.append(args)

    def post_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for args in deferred:
            self.send(*args)

    def recv(self, src: int, kind: str, client: int, specs, direction: str) -> list[torch.Tensor]:
        """Receive one message from ``src``. ``specs``: one (ledger kind, shape, dtype, check) per
        tensor, check in (None, "finite", ("labels", num_classes)); a shape given as
        ``codec.AtMost(n)`` is a 1-D tensor of at most n elements, its length taken from the
        message header. Validates before returning."""
        base = _KIND_TAGS[kind] * 8
        what = f"waiting for the {_about(kind, client)} from rank {src}"
        if src in self.lost:
            raise PeerLost(f"rank {self.rank}: rank {src} is no longer in the run", src)
        hdr = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._wait_from(src, lambda: self._irecv(hdr, src, base, what), what)
        h = hdr.tolist()
        origin = f"{_about(kind, client)} from rank {src}"
        if h[0] != _MAGIC or h[1] != _KIND_TAGS[kind]:
            raise self.error(f"{origin}: not a {kind} message header (got {h[:5]})")
        if h[2] != self.round or h[3] != client:
            raise self.error(f"{origin}: message belongs to round {h[2]}, client {h[3]} "
                             "(the ranks are out of step)")
        if h[4] != len(specs):
            raise self.error(f"{origin}: expected {len(specs)} tensors, got {h[4]}")
        out = []
        for j, (lk, shape, dtype, check) in enumerate(specs):
            o = 5 + j * (2 + _MAX_DIMS)
            code, nd = h[o], h[o + 1]
            got_dtype = _DTYPES[code - 1] if 1 <= code <= len(_DTYPES) else f"dtype code {code}"
            got_shape = tuple(h[o + 2:o + 2 + nd]) if 0 <= nd <= _MAX_DIMS else f"{nd} dims"
            if isinstance(shape, AtMost):
                fits = isinstance(got_shape, tuple) and len(got_shape) == 1 and 0 <= got_shape[0] <= shape
                shape, want = (got_shape if fits else None), f"(at most {int(shape)},)"
            else:
                shape = want = tuple(shape)
            if got_dtype != dtype or got_shape != shape:
                raise self.error(f"{origin}: tensor {j} ({lk}) expected shape {want} "
                                 f"{dtype}, got {got_shape} {got_dtype}")
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self._wait_from(src, lambda: self._irecv(t, src, base + 1 + j, what), what)
            if check == "finite" and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise self.error(f"{origin}: tensor {j} ({lk}, shape {tuple(shape)}) has {bad} "
                                 "non-finite values")
            if isinstance(check, tuple) and check[0] == "labels" and t.numel():
                lo, hi = int(t.min()), int(t.max())
                if lo < 0 or hi >= check[1]:
                    raise self.error(f"{origin}: labels must lie in [0, {check[1]}), got [{lo}, {hi}]")
            key = (direction, lk)
            self.received[key] = self.received.get(key, 0) + t.numel() * t.element_size()
            out.append(t)
        return out

    def _irecv(self, t, src, tag, what):
        try:
            if self._pg is None:
                return dist.irecv(t, src, tag=tag)
            return self._pg.recv([t], self._group_rank[src], tag)
        except RuntimeError as e:
            raise self.error(what + " failed", e) from None

    def _isend(self, t, dst, tag):
        if self._pg is None:
            return dist.isend(t, dst, tag=tag)
        return self._pg.send([t], self._group_rank[dst], tag)

    def _tolerable(self, peer: int) -> bool:
        """Whether losing ``peer`` is survivable: --tolerate-dropouts, and a client rank."""
        return self.tolerate and peer != 0 and self.rank == 0

    def _wait_from(self, peer: int, post, what: str) -> None:
        """Post (``post()``) and wait for a receive from ``peer``; under --tolerate-dropouts a
        client rank whose message fails to arrive (closed connection or timeout) is dropped and
        :class:`PeerLost` raised."""
        try:
            self._wait(post(), what)
        except PeerLost:
            raise
        except DistributedError as e:
            if not self._tolerable(peer):
                raise
            self.mark_lost(peer, str(e).split(": ", 1)[-1])
            raise PeerLost(str(e), peer) from None

    def flush(self) -> None:
        """Wait for every posted send (so its buffers may be reused or freed)."""
        pending, self._pending = self._pending, []
        for works, _keep, what, dst in pending:
            for w in works:
                if dst in self.lost:
                    break  # its connection is gone; the send is abandoned
                try:
                    self._wait(w, what)
                except DistributedError as e:
                    if not self._tolerable(dst):
                        raise
                    self.mark_lost(dst, str(e).split(": ", 1)[-1])

    def mark_lost(self, r: int, why: str) -> None:
        """Drop client rank ``r`` from the run (rank 0, --tolerate-dropouts). The ranks agree on
        it at the next :meth:`settle`; a key in the store tells ``r`` itself, should it be alive."""
        if r in self.lost:
            return
        self.lost.add(r)
        self.lost_why[r] = why
        if self.store is not None:
            try:
                with self.store_lock:
                    self.store.set(f"fsl_fast/lost/{r}", why[:1000])
            except Exception:  # noqa: BLE001 - the settle step tells it too
                pass

    # -- membership (--tolerate-dropouts) --------------------------------------------------------
    def settle(self) -> list[int]:
        """Called by every rank in the run at the end of each round's local training: rank 0
        decides which client ranks are gone (a message that did not arrive, an exit, a heartbeat
        that stood still for _LOST_AFTER_S, or no arrival within --dist-timeout) and publishes the
        list in the store; every rank reads it, a dropped rank that is still alive leaves
        (:class:`Retired`), and the survivors continue in a new gloo group of their own. Returns
        the ranks dropped since the last call (the same list on every survivor). Without
        --tolerate-dropouts it does nothing (no synchronisation is added)."""
        if not self.tolerate:
            return []
        t, store = self.round, self.store
        with self.store_lock:
            store.set(f"fsl_fast/settle/{t}/arrived/{self.rank}", "1")
        self.blocked = (time.monotonic(), "waiting for the ranks still in the run to finish the round")
        try:
            if self.rank == 0:
                lost = self._decide(t)
                with self.store_lock:
                    store.set(f"fsl_fast/settle/{t}/lost", json.dumps(lost))
            else:
                lost = json.loads(self._await(f"fsl_fast/settle/{t}/lost"))
        finally:
            self.blocked = None
        if self.rank in lost:
            raise Retired(f"rank {self.rank}: dropped from the run by the server in round {t}")
        new = [r for r in lost if r in self.topo.live]
        self.lost.update(new)
        if new:
            self.topo.drop(new)
            if len(self.topo.live) < 2:
                raise DistributedError(f"rank {self.rank}: every client rank has left the run "
                                       f"(in {self.where()}): nothing left to train")
            self.regroup()
        return new

    def _await(self, key: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        while True:
            with self.store_lock:
                if self.store.check([key]):
                    return self.store.get(key)
            if time.monotonic() > deadline:
                raise self.error(f"no word from rank 0 on the ranks still in the run after "
                                 f"{self.timeout_s:g} s", probe=True)
            time.sleep(0.02)

    def _decide(self, t: int) -> list[int]:
        pending = [r for r in self.topo.live if r != 0 and r not in self.lost]
        seen: dict[int, tuple[str, float]] = {}
        start = time.monotonic()
        while pending:
            now = time.monotonic()
            for r in list(pending):
                with self.store_lock:
                    arrived = self.store.check([f"fsl_fast/settle/{t}/arrived/{r}"])
                    exited = self.store.check([f"fsl_fast/exit/{r}"])
                    why = self.store.get(f"fsl_fast/exit/{r}").decode(errors="replace") if exited else ""
                    hb_key = f"fsl_fast/hb/{r}"
                    hb = self.store.get(hb_key).decode() if self.store.check([hb_key]) else ""
                if arrived:
                    pending.remove(r)
                elif exited:
                    self.mark_lost(r, "it exited: " + why.partition("|")[2])
                    pending.remove(r)
                elif r not in seen or seen[r][0] != hb:
                    seen[r] = (hb, now)
                elif now - seen[r][1] > _LOST_AFTER_S:
                    self.mark_lost(r, f"no heartbeat for {_LOST_AFTER_S:g} s")
                    pending.remove(r)
            if pending and now - start > self.timeout_s:
                for r in pending:
                    self.mark_lost(r, f"did not finish round {t} within --dist-timeout {self.timeout_s:g} s")
                break
            time.sleep(0.02)
        return sorted(r for r in self.lost if r in self.topo.live)

    def regroup(self) -> None:
        """A new gloo group of the ranks in ``topo.live`` (same order, rank 0 first), rendezvous
        through the store under a fresh prefix."""
        self._gen += 1
        live = self.topo.live
        self._group_rank = {r: i for i, r in enumerate(live)}
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=self.timeout_s),
                              use_libuv=True)
        prefix = dist.PrefixStore(f"fsl_fast/group/{self._gen}/", store)
        self._pending = []  # sends posted on the old group are abandoned with it
        self._pg = dist.ProcessGroupGloo(prefix, self._group_rank[self.rank], len(live),
                                         datetime.timedelta(seconds=self.timeout_s))
        self._pg_store = store

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor, what: str) -> None:
        try:
            if self._pg is None:
                work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)
            else:
                work = self._pg.allreduce([t])  # sum by default
        except RuntimeError as e:
            raise self.error(what + " failed", e) from None
        self._wait(work, what)

    def broadcast_tensor(self, x: torch.Tensor, what: str) -> None:
        """Rank 0's ``x`` into ``x`` on every rank (not counted here: see DistributedEngine)."""
        try:
            if self._pg is None:
                work = dist.broadcast(x, src=0, async_op=True)
            else:
                opts = dist.BroadcastOptions()
                opts.rootRank = 0
                work = self._pg.broadcast([x], opts)
        except RuntimeError as e:
            raise self.error(what + " failed", e) from None
        self._wait(work, what)

    def barrier(self, what: str) -> None:
        self.all_reduce_sum(torch.zeros(1, device=self.device), what)

    def broadcast_object(self, obj, what: str):
        """Rank 0's ``obj`` on every rank (pickled; control messages only)."""
        if self._pg is not None:  # the survivors' own group: length, then the pickled bytes
            data = pickle.dumps(obj) if self.rank == 0 else b""
            n = torch.tensor([len(data)], dtype=torch.int64)
            self.broadcast_tensor(n, what)
            buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0
                   else torch.empty(int(n), dtype=torch.uint8))
            self.broadcast_tensor(buf, what)
            return obj if self.rank == 0 else pickle.loads(buf.numpy().tobytes())
        box = [obj]
        self.blocked = (time.monotonic(), what)
        try:
            dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        except RuntimeError as e:
            raise self.error(what + " failed", e) from None
        finally:
            self.blocked = None
        return box[0]

    def count(self, direction: str, kind: str, nbytes: int) -> None:
        """Count a collective's payload as logical messages (see the module doc): what a client
        rank contributes to an all-reduce goes up, what each client rank gets back comes down."""
        key = (direction, kind)
        self.sent[key] = self.sent.get(key, 0) + int(nbytes)
        self.received[key] = self.received.get(key, 0) + int(nbytes)

    def gather_counters(self) -> dict | None:
        """Sum every rank's byte counters of this round on rank 0 (None elsewhere) and reset."""
        keys = [(d, k) for d in ("up", "down") for k in WIRE_KINDS]
        vec = [self.sent.get(key, 0) for key in keys] + [self.received.get(key, 0) for key in keys]
        vec.append(self.header_bytes)
        t = torch.tensor(vec, dtype=torch.int64, device=self.device)
        self.all_reduce_sum(t, "summing the byte counters")
        self.sent, self.received, self.header_bytes = {}, {}, 0
        if self.rank != 0:
            return None
        v = t.tolist()
        n = len(keys)
        out = {f"wire_{d}_{k}": v[i] for i, (d, k) in enumerate(keys)}
        out["wire_sent_bytes"] = sum(v[:n])
        out["wire_received_bytes"] = sum(v[n:2 * n])
        out["wire_header_bytes"] = v[-1]
        return out

    # -- liveness ------------------------------------------------------------------------------
    def start_liveness(self) -> None:
        """Heartbeat thread (writes this rank's counter into the launcher's store) and watchdog
        thread (ends the process when a wait outlives the timeout by a margin)."""
        if self.store is not None:
            self._threads.append(threading.Thread(target=self._heartbeat, daemon=True))
        self._threads.append(threading.Thread(target=self._watchdog, daemon=True))
        for th in self._threads:
            th.start()

    def stop_liveness(self) -> None:
        """Stop and join the threads: a daemon thread inside a store call when the interpreter
        shuts down aborts the process (SIGABRT, seen in tests)."""
        self._stop.set()
        for th in self._threads:
            if th is not threading.current_thread():
                th.join(timeout=10)
        self._threads = []

    def _heartbeat(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                with self.store_lock:
                    self.store.set(f"fsl_fast/hb/{self.rank}", f"{n}:{self.round}")
            except Exception:  # noqa: BLE001 - the store going away is reported by the waits
                return
            self._stop.wait(_HEARTBEAT_S)

    def _heartbeats(self) -> dict[int, str] | None:
        vals = {}
        try:
            with self.store_lock:
                for r in range(self.topo.world_size):
                    key = f"fsl_fast/hb/{r}"
                    if r != self.rank and r not in self.lost:
                        vals[r] = self.store.get(key).decode() if self.store.check([key]) else ""
                        if self.store.check([f"fsl_fast/exit/{r}"]):
                            vals[r] = "exited"
        except Exception:  # noqa: BLE001 - no store: no diagnosis
            return None
        return vals

    def silent_peers(self, window_s: float = 4 * _HEARTBEAT_S) -> list[str]:
        """Ranks whose heartbeat does not move during ``window_s`` (called on error paths only):
        ``["2 (last seen in round 3)", ...]``."""
        if self.store is None:
            return []
        before = self._heartbeats()
        time.sleep(window_s)
        after = self._heartbeats()
        if before is None or after is None:
            return []
        out = []
        for r, v in after.items():
            if v == "exited":
                continue  # it reported its own error and exited
            if v == before.get(r):
                rd = int(v.split(":")[1]) if ":" in v else None
                seen = ("never seen" if rd is None else "last seen before round 0" if rd < 0
                        else f"last seen in round {rd}")
                out.append(f"{r} ({seen})")
        return out

    def _watchdog(self) -> None:
        grace = min(30.0, 0.25 * self.timeout_s) + 2.0
        while not self._stop.wait(1.0):
            b = self.blocked
            if b is not None and time.monotonic() - b[0] > self.timeout_s + grace:
                silent = self.silent_peers()
                extra = f"; no heartbeat from rank {', '.join(silent)}" if silent else ""
                _die(f"rank {self.rank}: no progress for {time.monotonic() - b[0]:.0f} s while "
                     f"{b[1]} in {self.where()}{extra}; exiting", 1)


_ACTIVE: list = []  # the Transport of this process, so that _die can leave word in the store


def _die(msg: str, code: int, reason: str | None = None) -> None:
    """Print one line and end the process now (threads and gloo teardown could otherwise hang);
    first tell the peers, through the store, that this rank exited on purpose and why (``reason``,
    default ``msg``; the peers' error lines quote it)."""
    try:
        for tr in _ACTIVE:
            if tr.store is not None and tr.store_lock.acquire(timeout=2.0):
                tr.store.set(f"fsl_fast/exit/{tr.rank}", f"{code}|{(reason or msg)[:1000]}")
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        sys.stderr.write(f"error: {msg}\n")
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(code)


# ---------------------------------------------------------------------------------------------
# The engine wrapper


class DistributedEngine:
    """Wraps an engine: computes only what this rank owns; moves models across ranks.

    Lists returned for ``ks`` hold ``None`` for clients hosted elsewhere; the algorithm only hands
    them back to this wrapper or to the message hooks, which skip them."""

    def __init__(self, inner, transport: Transport, topo: Topology, algorithm_cls):
        self.inner = inner
        self.t = transport
        self.topo = topo
        self.algo_cls = algorithm_cls
        self.models = inner  # export_model / import_model / import_model_all (engines/base.py)
        self.device = inner.device
        self.z_shapes: dict[int, tuple] = {}
        self.fedavg_mode = inner.cfg.dist_fedavg
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
        for k, z in zip(lk, zs):
            self.z_shapes[k] = tuple(z.shape)
        return self._spread(len(ks), idx, zs)

    def client_backward(self, ks, zs, grads):
        self.t.post_deferred()
        idx, lk, (lz, lg) = self._local(ks, zs, grads)
        lg = [g.wait() if isinstance(g, _PendingRecv) else g for g in lg]
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

    def align(self, ks, data):
        """Server aligns, then each aligned auxiliary goes down to its client's rank."""
        if self.topo.is_server:
            self.inner.align(ks, data)
            for k in ks:
                f, i = self.models.export_model("aux", k)
                items = [("aux_model", f)] + ([("aux_model", i)] if i.numel() else [])
                self.t.send(self.topo.owner(k), "aux_model", k, items, "down")
            self.t.flush()
            return
        for k in ks:
            if not self.topo.hosts(k):
                continue
            f0, i0 = self.models.export_model("aux", k)
            specs = [("aux_model", tuple(f0.shape), torch.float32, "finite")]
            if i0.numel():
                specs.append(("aux_model", tuple(i0.shape), torch.int64, None))
            got = self.t.recv(0, "aux_model", k, specs, "down")
            self.models.import_model("aux", k, got[0], got[1] if len(got) > 1 else i0)

    # -- aggregation ---------------------------------------------------------------------------
    def aggregate(self, weights, clients=True, aux=False, servers=False):
        kinds = (["client"] if clients else []) + (["aux"] if aux else [])
        if servers and self.algo_cls.whole_model:
            kinds.append("server")  # FedAvg: server halves are trained on the client ranks
        elif servers and self.algo_cls.server_copies and self.topo.is_server:
            # SplitFed v1: the per-client server copies live on rank 0; averaged there, unsent.
            self.inner.aggregate(weights, clients=False, aux=False, servers=True)
        for kind in kinds:
            self._fedavg(kind, weights)

    def _fedavg(self, kind: str, weights) -> None:
        """Weighted average of every client's ``kind`` model as flat float32 [P] (plus float32 [Q]
        for integer buffers, truncated at the end, as fsl_fast.ops.fedavg). Each client rank adds
        ``x_k * w_k`` for its own clients in client order, then:

        - ``ordered``: the running sum travels rank 1 -> 2 -> ... -> R-1 -> 0, so the additions
          happen in exactly the in-process order (bit-equal results), then rank 0 broadcasts it;
        - ``allreduce``: the per-rank partial sums are added by one all-reduce (log-depth, but the
          float32 additions are grouped by rank: results drift from the in-process run in the last
          bits, and training amplifies that over rounds).
        """
        topo, t = self.topo, self.t
        rank, live = topo.rank, topo.live  # (live: every rank unless --tolerate-dropouts lost some)
        pos = live.index(rank)
        # Every rank holds every model slot with the same layout, so any slot describes it.
        f0, i0 = self.models.export_model(kind, 0)
        has_int = i0.numel() > 0
        wire_kind = {"client": "client_model", "aux": "aux_model", "server": "server_model"}[kind]
        specs = [(wire_kind, tuple(f0.shape), torch.float32, "finite")]
        if has_int:
            specs.append((wire_kind, tuple(i0.shape), torch.float32, "finite"))
        ordered = self.fedavg_mode == "ordered"
        # This rank's share, with the kernels and client order of the in-process FedAvg
        # (fsl_fast.ops.fedavg): the running sum of the ranks before, if any, as a first row of
        # weight 1, then the local clients' models; integer buffers promoted to float32 the same way.
        rows, irows, w = [], [], []
        if ordered and pos >= 2:
            got = t.recv(live[pos - 1], "model_sum", -1, specs, "up")
            rows.append(got[0])
            irows.append(got[1] if has_int else None)
            w.append(1.0)
        for k in topo.local_clients:
            f, i = self.models.export_model(kind, k)
            rows.append(f)
            irows.append(i.to(torch.float32))
            w.append(float(weights[k]))
        if rows:
            acc = weighted_sum(torch.stack(rows), w)
            acc_i = weighted_sum(torch.stack(irows), w) if has_int else torch.zeros(0, device=f0.device)
        else:  # rank 0 holds no client
            acc = torch.zeros(f0.shape, dtype=torch.float32, device=f0.device)
            acc_i = torch.zeros(i0.shape, dtype=torch.float32, device=f0.device)
        tensors = [acc] + ([acc_i] if has_int else [])
        nbytes = sum(x.numel() * x.element_size() for x in tensors)
        if ordered:
            if pos >= 1:
                t.send(live[pos + 1] if pos + 1 < len(live) else 0, "model_sum", -1,
                       [(wire_kind, x) for x in tensors], "up")
                t.flush()
            else:
                tensors = t.recv(live[-1], "model_sum", -1, specs, "up")
            for x in tensors:
                t.broadcast_tensor(x, f"receiving the averaged {kind} model")
        else:
            for x in tensors:
                t.all_reduce_sum(x, f"averaging the {kind} models")
            if not topo.is_server:
                t.count("up", wire_kind, nbytes)
        if topo.is_server:
            t.count("down", wire_kind, nbytes * (len(live) - 1))
        acc = tensors[0]
        if not bool(torch.isfinite(acc).all()):
            raise t.error(f"the averaged {kind} model is not finite")
        # Integer buffers: truncation toward zero, as load_state_dict of the float32 sum does.
        ints = tensors[1].to(torch.int64) if has_int else i0
        self.models.import_model_all(kind, acc, ints)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, x, y, batch_size):
        if not self.topo.is_server:
            return float("nan"), float("nan")  # rank 0's record is broadcast after the round
        return self.inner.evaluate(x, y, batch_size)


class _PendingRecv:
    """A gradient the client rank will receive when it needs it (in client_backward)."""

    def __init__(self, fn):
        self._fn = fn

    def wait(self):
        return self._fn()


class _NullBuffer:
    """Client ranks keep no alignment buffers (the server's copy is the one used)."""

    def append(self, payload, y):
        pass

    def __len__(self):
        return 0

    def state_dict(self):
        return {"chunks": []}

    def load_state_dict(self, sd):
        pass


class _RemoteBatches:
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


# ---------------------------------------------------------------------------------------------
# The algorithm's message hooks


class _DistributedMessages:
    """Mixed in before an Algorithm class: its messages travel through the transport."""

    dist_transport: Transport
    dist_topo: Topology
    dist_cut_shape: tuple
    dist_num_classes: int

    def send_smashed(self, k, z, y):
        topo, t = self.dist_topo, self.dist_transport
        owner = topo.owner(k)
        codec = self.uplink
        # The stochastic-rounding key counts every upload of the round, on every rank.
        seed = self._stochastic_seed(k) if not codec.lossless else 0
        if topo.hosts(k):
            z = z.detach()
            payload = z if codec.lossless else self.encode(codec, self.residual_up, k, z, seed, decode=False)[0]
            t.send(0, "smashed", k, [("smashed", w) for _, w in wire(payload)] + [("labels", y)], "up")
            return None, None
        if not topo.is_server or owner in t.lost:
            return None, None  # (lost: --tolerate-dropouts dropped the client's rank)
        b = int(y.shape[0])
        shape = (b,) + tuple(self.dist_cut_shape)
        labels = ("labels", (b,), torch.int64, ("labels", self.dist_num_classes))
        specs = [("smashed",) + s[1:] for s in codec.wire_specs(shape)]
        try:
            *got, y_in = t.recv(owner, "smashed", k, specs + [labels], "up")
            payload = self._rebuild(codec, shape, got, owner, f"smashed data of client {k}")
        except PeerLost:
            return None, None  # the algorithm skips an upload that did not arrive
        self.dist_uploads[k] = self.dist_uploads.get(k, 0) + 1
        y.copy_(y_in)  # the algorithm's y on the server is this upload's receive buffer
        parts = codec.parts(payload)
        self.ledger.add("up", "smashed", sum(parts.values()), parts=None if codec.lossless else parts)
        self.ledger.add("up", "labels", y_in.numel() * y_in.element_size(), paper=False)
        return codec.decode(payload), payload

    def _rebuild(self, codec, shape, tensors, src, what):
        try:
            return codec.from_wire(shape, tensors)
        except ValueError as e:
            raise self.dist_transport.error(f"{what} from rank {src}: {e}") from None

    def send_gradient(self, k, g):
        topo, t = self.dist_topo, self.dist_transport
        codec = self.downlink
        # (every rank draws the key, as every rank draws the uplink's)
        seed = self._stochastic_seed(k) ^ (1 << 30) if not codec.lossless else 0
        if topo.is_server:
            if g is None:  # client k's upload never arrived (--tolerate-dropouts)
                return None
            g = g.detach()
            payload = g if codec.lossless else self.encode(codec, self.residual_down, k, g, seed, decode=False)[0]
            # Posted after this iteration's last upload has been received (client_backward):
            # NCCL runs the point-to-point operations of a pair of ranks on one stream in posting
            # order, so sending g_0 before receiving z_1 from the same rank would deadlock.
            t.defer_send(topo.owner(k), "gradients", k, [("gradients", w) for _, w in wire(payload)], "down")
            parts = codec.parts(payload)
            self.ledger.add("down", "gradients", sum(parts.values()), parts=None if codec.lossless else parts)
            return None
        if not topo.hosts(k):
            return None
        shape = tuple(self.engine.z_shapes[k])
        specs = [("gradients",) + s[1:] for s in codec.wire_specs(shape)]

        def receive():
            got = t.recv(0, "gradients", k, specs, "down")
            return codec.decode(self._rebuild(codec, shape, got, 0, f"gradient of client {k}"))

        return _PendingRecv(receive)

    def align(self, ks):
        if self.dist_topo.is_server:
            # A client of a dropped rank is aligned only if its upload of this iteration arrived
            # (as an in-process dropout after that iteration would be).
            lost = self.dist_transport.lost
            ks = [k for k in ks if self.dist_topo.owner(k) not in lost or self.dist_uploads.get(k, 0)]
            super().align(ks)  # buffers -> engine.align (sends the auxiliaries) -> ledger
        else:
            self.engine.align(ks, None)

    def unreachable(self) -> dict[int, dict]:
        """Clients whose rank left the run during this round's local training (every rank gets
        the same keys; rank 0's records say how many of their uploads arrived)."""
        new = self.dist_transport.settle()
        uploads, self.dist_uploads = self.dist_uploads, {}
        out = {}
        for r in new:
            why = self.dist_transport.lost_why.get(r, "")
            for k in self.dist_topo.blocks[r]:
                out[k] = {"client": k, "rank": r, "uploads_received": uploads.get(k, 0)}
                if why:
                    out[k]["why"] = why
        return out


def distributed_algorithm(cls):
    """``cls`` with its message hooks going over the transport."""
    return type(f"Distributed{cls.__name__}", (_DistributedMessages, cls), {})


def attach(run, transport: Transport) -> None:
    """Turn an in-process Run into this rank's part of a distributed run (in place): wrap the
    engine, replace the loaders of clients hosted elsewhere, rebuild the algorithm with the
    distributed message hooks."""
    topo = transport.topo
    cls = type(run.algo)
    engine = DistributedEngine(run.engine, transport, topo, cls)
    dev = engine.device
    placeholder = torch.empty(0, device=dev)
    loaders = [ld if topo.hosts(k) else _RemoteBatches(ld, dev, placeholder) for k, ld in enumerate(run.loaders)]
    algo_cls = distributed_algorithm(cls)
    algo_cls.dist_transport = transport
    algo_cls.dist_topo = topo
    algo_cls.dist_cut_shape = tuple(run.split.cut_shape)
    algo_cls.dist_num_classes = int(run.data.num_classes)
    algo = algo_cls(run.cfg, engine, loaders, run.weights, run.ledger)
    algo.dist_uploads = {}  # uploads received from each client this round (rank 0)
    if not topo.is_server:
        algo.buffers = [_NullBuffer() for _ in algo.buffers]
    run.engine, run.loaders, run.algo = engine, loaders, algo


# ---------------------------------------------------------------------------------------------
# Driver


def _launch_env() -> tuple[int, int, int]:
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except KeyError:
        raise ConfigError("--distributed: RANK/WORLD_SIZE are not set; launch with torchrun, e.g. "
                          "torchrun --nproc-per-node 3 -m fsl_fast.train --distributed ...") from None


def _fingerprint(cfg) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "threads", "dist_timeout")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shard(out: Path, rank: int, t: int) -> Path:
    return out / "checkpoints" / f"dist-rank{rank}-round{t}.pt"


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
        _die(f"rank {rank}: stopped by the launcher (SIGTERM) in {where}{waiting}{extra}", 143)

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
        _ACTIVE.append(transport)
        transport.start_liveness()
        return _train(cfg, out, resume, progress, transport, device, changes)
    except Retired as e:  # dropped by the others (--tolerate-dropouts): not a failure of the run
        sys.stderr.write(f"{e}; leaving\n")
        sys.stderr.flush()
        os._exit(0)
    except DistributedError as e:
        _die(str(e), 1)
    except Divergence as e:  # this rank saw it; the others fail naming this rank (see _die)
        _die(f"rank {rank}: {e}; {_kept(out)}: continue with --resume {out} and e.g. a lower --lr",
             EXIT_DIVERGED, reason=str(e))
    except RunIOError as e:
        _die(f"rank {rank}: {e}; {_kept(out)}: continue with --resume {out}", EXIT_IO)
    finally:
        if transport is not None:
            transport.stop_liveness()


def _kept(out: Path) -> str:
    return ("the last committed round's checkpoint is intact" if (Path(out) / MANIFEST).is_file()
            else "no round was committed")


def _train(cfg, out: Path, resume: bool, progress: bool, transport: Transport, device, changes=None):
    import dataclasses

    from fsl_fast.runner import (CHECKPOINT, RoundLoop, Run, TensorBoard,
                                  apply_resume_changes, jsonl, partition_record, plot_run, prepare_out,
                                  summarize, write_config)

    topo = transport.topo
    rank = topo.rank
    fp = transport.broadcast_object((str(out), _fingerprint(cfg)), "agreeing on the run")
    out = Path(fp[0])
    if fp[1] != _fingerprint(cfg):
        raise DistributedError(f"rank {rank}: its config differs from rank 0's (same command line and "
                               "data on every machine are required)")
    run = Run(dataclasses.replace(cfg, device=str(device)))
    attach(run, transport)
    if resume:
        _resume(run, out, transport)
        apply_resume_changes(run, changes)
        if rank == 0 and changes:
            write_config(out, cfg)
    elif rank == 0:
        prepare_out(out)
        write_config(out, cfg)
        faults.atomic_write_text(out / "partition.json",
                      faults.dumps(partition_record(cfg, run, topo.owner), indent=1) + "\n")
    if rank == 0:
        faults.atomic_write_text(out / "metrics.jsonl", jsonl(run.metrics))
        if (out / CHECKPOINT).exists():
            (out / CHECKPOINT).unlink()  # never leave an in-process checkpoint next to shards
    transport.barrier("setting up the run directory")
    tb = TensorBoard(out, run.next_round) if cfg.tensorboard and rank == 0 else None
    loop = RoundLoop(run, progress and rank == 0, f"{cfg.algorithm} distributed x{topo.world_size}")
    t_start = time.perf_counter()
    while loop.more():
        t = run.next_round
        transport.round = t
        rec = run.step()
        wire = transport.gather_counters()
        if rank == 0:
            rec.update(wire)
        rec = transport.broadcast_object(rec, "sharing the round's metrics")
        run.metrics[-1] = rec
        # Commit: every rank writes its shard, then rank 0 names the round in the manifest, then
        # appends the round's metrics (never a metrics row past the committed checkpoint).
        faults.atomic_torch_save(run.state_dict(), _shard(out, rank, t))
        transport.barrier("committing the checkpoint")
        if rank == 0:
            manifest = {"format_version": faults.FORMAT_VERSION, "world_size": topo.world_size, "round": t}
            if transport.lost:
                manifest["lost_ranks"] = sorted(transport.lost)
            faults.atomic_write_text(out / MANIFEST, faults.dumps(manifest) + "\n")
            faults.append_line(out / "metrics.jsonl", faults.dumps(rec) + "\n")
            _shard(out, 0, t - 1).unlink(missing_ok=True)
        else:
            # The manifest of round t-1 was written before rank 0 entered round t.
            _shard(out, rank, t - 2).unlink(missing_ok=True)
        if tb is not None:
            tb.log(rec)
        loop.round_done(rec)
    loop.close()
    if tb is not None:
        tb.close()
    transport.round = -1
    transport.phase = "shutdown"
    results = summarize(cfg, run.metrics, loop.stopped, time.perf_counter() - t_start)
    if rank == 0:
        results["world_size"] = topo.world_size
        if transport.lost:
            results["lost_ranks"] = sorted(transport.lost)
        results["executors"] = run.engine.inner.executor_record()  # rank 0's
        if run.config_changes:
            results["config_changes"] = run.config_changes
        faults.atomic_write_text(out / "results.json", faults.dumps(results, indent=2) + "\n")
        if run.metrics:
            plot_run(run.metrics, out, f"{cfg.algorithm} / {cfg.model} / {cfg.dataset} / distributed")
    transport.barrier("finishing")
    transport.stop_liveness()
    dist.destroy_process_group()
    return results if rank == 0 else None


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
    path = _shard(out, topo.rank, t)
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
