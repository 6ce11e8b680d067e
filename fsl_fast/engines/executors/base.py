"""What every executor shares: the registry rule, the per-run override, flat stacks.

An executor computes one *part* of the fused engine's work:

- ``client``: the clients' forward and backward (``forward(ks, xs)``, ``backward(ks, zs, grads,
  full)``; the engine steps the clients' optimizer);
- ``server``: one server step on one client's smashed data (``step(k, z, y, want_grad)``);
- ``aux``: the auxiliaries' gradient estimate and CSE-FSL's local step (``estimate``,
  ``local_step``);
- ``alignment``: fitting the auxiliaries to the server's true gradients (``align(ks, data,
  targets)``);
- ``full``: FedAvg's whole-model step (``step(ks, xs, ys)``; the engine steps both optimizers).

Each executor class has a ``name``, its ``part`` and ``matches(engine) -> (bool, reason)``. The
engine asks the candidates of a part in order (``fsl_fast.engines.executors.CANDIDATES``) and takes
the first that matches; the last of each part is generic and always matches. The choice and its
reason go into results.json (``executors``) and ``python -m fsl_fast.env --model NAME``.

``FSL_FAST_EXECUTORS="client=loop,alignment=double_backward"`` forces a choice per part (the parity
tests run every executor against the reference engine this way). Forcing one whose rule does not
match is an error that names the reason.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from fsl_fast.config import ConfigError
from fsl_fast.flat import FlatClients
from fsl_fast.optim import flat_optimizer

PARTS = ("client", "server", "aux", "alignment", "full")
ENV_FORCE = "FSL_FAST_EXECUTORS"


class ExecutorError(ConfigError):
    """A bad FSL_FAST_EXECUTORS value (one line; the CLI exits with status 2)."""


class Executor:
    part: str = ""
    name: str = ""

    @classmethod
    def matches(cls, eng) -> tuple[bool, str]:
        raise NotImplementedError

    def __init__(self, eng):
        self.eng = eng

    out = None  # batched client executors: (ks, [K, ...] output, its rows) of the last forward

    def batched(self, tensors):
        """The [K, ...] tensor whose rows are ``tensors`` when this executor returned them from
        one batched computation, else None."""
        return None

    def pending(self, ks) -> bool:
        """Whether the last forward was batched, for these clients, and awaits its backward (the
        distributed runtime hands the rows back in a list of its own, so not by identity)."""
        return self.out is not None and list(self.out[0]) == list(ks)


def forced() -> dict:
    """FSL_FAST_EXECUTORS as {part: name}."""
    raw = os.environ.get(ENV_FORCE, "").strip()
    out = {}
    for item in filter(None, (s.strip() for s in raw.split(","))):
        part, sep, name = item.partition("=")
        part, name = part.strip(), name.strip()
        if not sep or part not in PARTS or not name:
            raise ExecutorError(f"{ENV_FORCE}: expected part=name items with part in "
                                f"{', '.join(PARTS)}, got {item!r}")
        out[part] = name
    return out


def choose(part: str, candidates, eng):
    """(executor instance, reason, [(name, matches, reason) of every candidate asked])."""
    want = forced().get(part)
    names = [c.name for c in candidates]
    if want is not None and want not in names:
        raise ExecutorError(f"{ENV_FORCE}: no {part} executor named {want!r} (choose from {', '.join(names)})")
    tried = []
    chosen = None
    for cls in candidates:
        ok, why = cls.matches(eng)
        tried.append((cls.name, ok, why))
        if chosen is None and ok and (want is None or cls.name == want):
            chosen = (cls, why)
    if chosen is None:
        why = next(w for n, _, w in tried if n == want)
        raise ExecutorError(f"{ENV_FORCE}: the {part} executor {want!r} does not apply here: {why}")
    cls, why = chosen
    return cls(eng), why, tried


def uniform(tensors) -> bool:
    """All tensors of one shape (batched executors need it; otherwise they run the generic path
    for that call, e.g. when one client's last batch is shorter)."""
    return len({tuple(t.shape) for t in tensors}) == 1


def write_rows(buffer: torch.Tensor, e, rows, t: torch.Tensor) -> None:
    """Entry ``e`` of the flat [K, P] ``buffer`` for the active clients: all rows (``rows`` is
    None) or rows ``rows`` (a LongTensor), from ``t`` holding one [e.numel] slice per client."""
    dst = buffer[:, e.offset:e.offset + e.numel]
    src = t.reshape(-1, e.numel)
    if rows is None:
        dst.copy_(src)
    else:
        dst.index_copy_(0, rows, src)


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class Stack:
    """K copies of one module over a FlatClients buffer, with a flat optimizer on the parameter
    part: the client/server optimizer of ``cfg`` (--optimizer), or Adam when ``cfg`` is None."""

    def __init__(self, module: nn.Module, K: int, device, lr: float, wd: float, cfg=None):
        self.template = module
        self.flat = FlatClients(module, K, device=device)
        self.mods = [self.flat.bind(k, copy.deepcopy(module), grads=True) for k in range(K)]
        ents = [e for e in self.flat.layout.entries if e.name in set(self.flat.layout.param_names)]
        self.np = max((e.offset + e.numel for e in ents), default=0)
        if any(e.offset >= self.np for e in ents) or sum(e.numel for e in ents) != self.np:
            raise RuntimeError("flat layout must place parameters before buffers")
        self.opt = flat_optimizer(self.flat.buffer[:, :self.np], self.flat.grad_buffer[:, :self.np],
                                  cfg, lr, wd)
        self.global_mod = copy.deepcopy(module)

    def zero_grad(self, rows) -> None:
        g = self.flat.grad_buffer
        if len(rows) == g.shape[0]:
            g.zero_()
        else:
            for r in rows:
                g[r].zero_()

    def entries(self) -> dict:
        return {e.name: e for e in self.flat.layout.entries}

    def restore(self, rows) -> None:
        """Rows back to the last average (``global_buffer``)."""
        for r in rows:
            self.flat.buffer[r].copy_(self.flat.global_buffer)
            self.flat.int_buffers[r].copy_(self.flat.global_int_buffer)

    def average(self, weights) -> None:
        self.flat.average(weights, broadcast=True)
        self.flat.load_into(self.global_mod)

    def load_models(self, sds) -> None:
        """Row k takes state dict ``sds[k]`` (a list of K; a dict: every row); the global model
        takes the first (a warm start)."""
        sds = sds if isinstance(sds, list) else [sds] * len(self.mods)
        for k, sd in enumerate(sds):
            self.global_mod.load_state_dict(sd)
            self.flat.store(k, self.global_mod)
        self.global_mod.load_state_dict(sds[0])
        self.flat.layout.flatten(self.global_mod, out=self.flat.global_buffer)
        self.flat.layout.flatten_int(self.global_mod, out=self.flat.global_int_buffer)

    def state_dict(self) -> dict:
        return {"buffer": self.flat.buffer, "int_buffers": self.flat.int_buffers,
                "global": self.flat.global_buffer, "global_int": self.flat.global_int_buffer,
                "opt": self.opt.state_dict()}

    def load_state_dict(self, sd) -> None:
        self.flat.buffer.copy_(sd["buffer"])
        self.flat.int_buffers.copy_(sd["int_buffers"])
        self.flat.global_buffer.copy_(sd["global"])
        self.flat.global_int_buffer.copy_(sd["global_int"])
        self.opt.load_state_dict(sd["opt"])
        self.flat.load_into(self.global_mod)
