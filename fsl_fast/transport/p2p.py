"""Point-to-point messages and collectives between the processes of a distributed run
(torch.distributed: gloo on CPU, NCCL on GPU), with the checks, timeouts, liveness and byte
counters every message needs.

Every message is a fixed-size int64 header (kind, round, client, dtype and shape of each tensor)
followed by the tensors. The receiver checks the header against what the SPMD program expects and
the payload for finiteness (labels: range) before use, and raises :class:`DistributedError`
naming the sender rank, the client and the round.

Faults. Every wait has the ``--dist-timeout``; a peer that dies closes its sockets and the waiting
ranks fail at once, a peer that stalls makes them time out. Each rank writes a heartbeat into the
launcher's store, so the error names the rank that stopped and the round. A watchdog thread ends
the process (:func:`die`) if a wait outlives the timeout anyway.
"""
from __future__ import annotations

import datetime
import json
import os
import pickle
import sys
import threading
import time

import torch
import torch.distributed as dist

from fsl_fast.codec import AtMost
from fsl_fast.transport.topology import Topology

__all__ = ["DistributedError", "PeerLost", "Retired", "Transport", "die", "ACTIVE", "HEADER_LEN", "WIRE_KINDS"]

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
        """Peers that ended on purpose, with the line they printed (left in the store by die)."""
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
                die(f"rank {self.rank}: no progress for {time.monotonic() - b[0]:.0f} s while "
                     f"{b[1]} in {self.where()}{extra}; exiting", 1)


ACTIVE: list = []  # the Transport of this process, so that die() can leave word in the store


def die(msg: str, code: int, reason: str | None = None) -> None:
    """Print one line and end the process now (threads and gloo teardown could otherwise hang);
    first tell the peers, through the store, that this rank exited on purpose and why (``reason``,
    default ``msg``; the peers' error lines quote it)."""
    try:
        for tr in ACTIVE:
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
