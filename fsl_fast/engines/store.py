"""Cross-device scale (``--client-store memory|disk`` with ``--clients-per-round M``): memory that
grows with the M clients of a round, not with all of them.

``SlotEngine`` wraps a fused engine built for M clients ("slots") and maps client ids to slots
round by round. What a client keeps between its rounds lives in a ``ClientStore`` while it sits
out: its optimizer state (Adam's moments or SGD's momentum, and its step count) for every model it
trains, its auxiliary model where the algorithm does not average it (FSL-SAGE), the generator of
its alignment batches, and (kept by the algorithm, parked here) its FSL-SAGE alignment buffer.
Nothing else is per client: after every aggregation every client's model equals the average, so
a slot simply takes the global models when a client moves in.

The store holds exactly what the all-in-memory engine holds (fp32 tensors, no rounding), so a
run's results do not depend on it (tests/test_client_store.py). ``memory`` keeps the parked rows
in RAM (compact: only what persists); ``disk`` writes one file per client and kind under the run
directory's ``client_store/`` (written atomically) and keeps none of them in memory.

Consistency with checkpoints: clients move out at the start of the next round, after that round's
checkpoint (which holds the slots) was written; a file in the store therefore always holds a
client's state as of the last completed round in which it took part, and ``--resume`` continues
from the checkpoint and the store together.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fsl_fast.engines.base import Engine, align_seed

MODES = ("off", "memory", "disk")


class ClientStore:
    """Parked per-client state: ``put(kind, k, dict)`` / ``get(kind, k)``, in RAM or one file per
    (kind, client) under ``folder``."""

    def __init__(self, mode: str, folder: Path | None = None):
        self.mode = mode
        self.rows: dict = {}
        self.folder = None
        self._tmp = None
        if mode == "disk":
            if folder is None:  # a Run used without a run directory (tests): a private temp folder
                self._tmp = tempfile.TemporaryDirectory(prefix="fsl_fast_store_")
                folder = Path(self._tmp.name)
            self.bind(folder)

    def bind(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def _path(self, kind: str, k: int) -> Path:
        return self.folder / f"{kind}-{k}.pt"

    def put(self, kind: str, k: int, d: dict) -> None:
        # copies: a row is a view, and torch.save would write the whole storage behind it
        d = _owned(d)
        if self.mode == "memory":
            self.rows[kind, k] = d
            return
        from fsl_fast import faults

        faults.atomic_torch_save(d, self._path(kind, k))

    def get(self, kind: str, k: int) -> dict | None:
        if self.mode == "memory":
            return self.rows.get((kind, k))
        p = self._path(kind, k)
        if not p.is_file():
            return None
        return torch.load(p, weights_only=True)

    def state_dict(self) -> dict:
        # disk: the files are the state (they live in the run directory)
        return {"mode": self.mode, "rows": [[kind, k, d] for (kind, k), d in self.rows.items()]}

    def load_state_dict(self, sd: dict) -> None:
        self.rows = {(kind, int(k)): d for kind, k, d in sd.get("rows", [])}


class SlotEngine(Engine):
    """Client ids -> the M slots of an inner fused engine (see the module doc)."""

    def __init__(self, cfg, split, num_clients, algorithm_cls, device):
        from fsl_fast.engines.fused import FusedEngine

        super().__init__(cfg, split, num_clients, algorithm_cls, device)
        self.K = num_clients
        self.H = cfg.clients_per_round
        self.inner = FusedEngine(cfg, split, self.H, algorithm_cls, device)
        self.client_store = ClientStore(cfg.client_store)
        self.occupants: list = [None] * self.H
        self.slot: dict[int, int] = {}
        inner = self.inner
        # (name, stack, whether its model rows persist per client)
        self.parts = [("client", inner.clients, False)]
        if inner.servers is not None:
            self.parts.append(("server", inner.servers, False))
        if inner.aux is not None:
            # CSE-FSL averages its auxiliaries; FSL-SAGE keeps one per client
            self.parts.append(("aux", inner.aux, bool(algorithm_cls.aligns)))
            self._aux0 = (inner.aux.flat.buffer[0].clone(), inner.aux.flat.int_buffers[0].clone())
        self.device = inner.device

    # -- moving clients in and out ----------------------------------------------------------------
    def _save(self, i: int, c: int) -> None:
        d = {}
        for name, st, persistent in self.parts:
            opt = st.opt
            for key, t in _opt_rows(opt).items():
                d[f"{name}.{key}"] = t[i]
            d[f"{name}.steps"] = opt.steps[i]
            if persistent:
                d[f"{name}.row"] = st.flat.buffer[i]
                d[f"{name}.int"] = st.flat.int_buffers[i]
        if self.inner.aux is not None:
            d["align_gen"] = self.inner.align_gens[i].get_state()
        self.client_store.put("engine", c, d)

    def _load(self, i: int, c: int) -> None:
        d = self.client_store.get("engine", c)
        with torch.no_grad():
            for name, st, persistent in self.parts:
                opt = st.opt
                for key, t in _opt_rows(opt).items():
                    if d is None:
                        t[i].zero_()
                    else:
                        t[i].copy_(d[f"{name}.{key}"])
                opt.steps[i] = 0 if d is None else int(d[f"{name}.steps"])
                if persistent:
                    row, irow = (self._aux0 if d is None else (d[f"{name}.row"], d[f"{name}.int"]))
                    st.flat.buffer[i].copy_(row)
                    st.flat.int_buffers[i].copy_(irow)
                else:  # every client's model is the last average
                    st.flat.buffer[i].copy_(st.flat.global_buffer)
                    st.flat.int_buffers[i].copy_(st.flat.global_int_buffer)
        if self.inner.aux is not None:
            if d is None:
                self.inner.align_gens[i].manual_seed(align_seed(self.cfg.seed, c))
            else:
                self.inner.align_gens[i].set_state(d["align_gen"])

    def participate(self, active) -> None:
        """Round start: the previous occupants move out, ``active`` (ascending) moves in."""
        active = list(active)
        if len(active) > self.H:
            raise RuntimeError(f"{len(active)} participants for {self.H} slots")
        if active == [c for c in self.occupants if c is not None]:
            return
        for i, c in enumerate(self.occupants):
            if c is not None:
                self._save(i, c)
        self.occupants = active + [None] * (self.H - len(active))
        self.slot = {c: i for i, c in enumerate(active)}
        for i, c in enumerate(active):
            self._load(i, c)

    def _s(self, ks):
        return [self.slot[k] for k in ks]

    # -- the engine interface, in slots --------------------------------------------------------
    def begin_round(self, t):
        self.inner.begin_round(t)

    def client_forward(self, ks, xs):
        return self.inner.client_forward(self._s(ks), xs)

    def client_backward(self, ks, zs, grads):
        self.inner.client_backward(self._s(ks), zs, grads)

    def server_step(self, k, z, y, want_grad=False):
        return self.inner.server_step(self.slot[k], z, y, want_grad)

    def aux_estimate(self, ks, zs, ys):
        return self.inner.aux_estimate(self._s(ks), zs, ys)

    def aux_local_step(self, ks, zs, ys):
        return self.inner.aux_local_step(self._s(ks), zs, ys)

    def full_step(self, ks, xs, ys):
        self.inner.full_step(self._s(ks), xs, ys)

    def align(self, ks, data):
        self.inner.align(self._s(ks), data)

    def aggregate(self, weights, clients=True, aux=False, servers=False):
        w = [weights[c] if c is not None else 0.0 for c in self.occupants]
        self.inner.aggregate(w, clients=clients, aux=aux, servers=servers)

    def restore(self, ks, clients=True, aux=False, servers=False):
        self.inner.restore(self._s(ks), clients=clients, aux=aux, servers=servers)

    def eval_models(self):
        return self.inner.eval_models()

    def aux_module(self, k):
        return self.inner.aux_module(self.slot[k])

    def batched_view(self, tensors):
        return self.inner.batched_view(tensors)

    def state_tensors(self, part, k=None):
        return self.inner.state_tensors(part, None if k is None else self.slot[k])

    def executor_record(self):
        return {**self.inner.executor_record(), "client_store": self.cfg.client_store}

    def set_hyperparameters(self, lr, weight_decay, aux_lr):
        self.inner.set_hyperparameters(lr, weight_decay, aux_lr)

    def compute(self):
        return self.inner.compute()

    def sync(self):
        self.inner.sync()

    def reset_train_stats(self):
        self.inner.reset_train_stats()

    def train_stats(self):
        out = torch.zeros(self.K, 3, dtype=torch.float64)
        st = self.inner.train_stats()
        for i, c in enumerate(self.occupants):
            if c is not None:
                out[c] = st[i]
        return out

    def load_models(self, client, server, auxes=None):
        from fsl_fast.config import ConfigError

        raise ConfigError("--warm-start: not available with --client-store yet")

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        return {"inner": self.inner.state_dict(), "occupants": [-1 if c is None else c for c in self.occupants],
                "store": self.client_store.state_dict()}

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd["inner"])
        self.occupants = [None if c < 0 else int(c) for c in sd["occupants"]]
        self.slot = {c: i for i, c in enumerate(self.occupants) if c is not None}
        self.client_store.load_state_dict(sd["store"])

    def named_state(self):
        """Global client and server, and every client's auxiliary (slot, store or initial)."""
        out = {"client": self.inner.clients.global_mod.state_dict(),
               "server": self.inner.server_global.state_dict()}
        if self.inner.aux is not None:
            import copy

            aux = self.inner.aux
            m = copy.deepcopy(aux.template)
            persistent = any(p for n, _, p in self.parts if n == "aux")
            for c in range(self.K):
                if c in self.slot:
                    out[f"aux{c}"] = {k: v.clone() for k, v in aux.mods[self.slot[c]].state_dict().items()}
                    continue
                if persistent:
                    d = self.client_store.get("engine", c)
                    row, irow = self._aux0 if d is None else (d["aux.row"], d["aux.int"])
                else:
                    row, irow = aux.flat.global_buffer, aux.flat.global_int_buffer
                aux.flat.layout.load_flat(m, row)
                aux.flat.layout.load_int(m, irow)
                out[f"aux{c}"] = {k: v.clone() for k, v in m.state_dict().items()}
        return out


def _owned(obj):
    """``obj`` with every tensor a compact copy (nested dicts and lists)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _owned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_owned(v) for v in obj)
    return obj


def _opt_rows(opt) -> dict:
    """The per-row state tensors of a flat optimizer (FlatAdam: m, v; FlatSGD: momentum)."""
    if hasattr(opt, "m"):
        return {"m": opt.m, "v": opt.v}
    return {"momentum": opt.buf} if opt.buf.shape[1] else {}
