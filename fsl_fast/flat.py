"""Flat parameter storage: one [P] vector per model, one [K, P] buffer for K clients.

``FlatLayout`` fixes where every tensor of a module lives in a flat float32 vector: the floating
parameters first, then the floating buffers, each in the module's own registration order (the
order of ``named_parameters()`` / ``named_buffers()``, which is also ``state_dict()`` order and is
the same for every instance of a model class). Integer buffers (BatchNorm's
``num_batches_tracked``) cannot be averaged like floats and are laid out apart in an int64 vector
of length Q. Only tensors that appear in ``state_dict()`` are laid out: non-persistent buffers are
left to the module. Shared (tied) parameters appear once, under the first name.

``FlatClients`` keeps K copies of one model in a [K, P] buffer (float32 or bfloat16) plus a [K, Q]
int64 buffer, hands out zero-copy views per client (``views``, ``bind``) and for all clients at once
(``stacked``, for ``torch.func.functional_call`` under ``vmap``), and averages them with one flat
FedAvg (``average``) into ``global_buffer`` / ``global_int_buffer``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

__all__ = ["FlatEntry", "FlatLayout", "FlatClients"]


@dataclass(frozen=True)
class FlatEntry:
    """One tensor of the layout: ``vec[offset : offset + numel].view(shape)``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    dtype: torch.dtype
    kind: str  # "param", "buffer" or "int_buffer"


def _split_name(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def _get(module: nn.Module, name: str) -> torch.Tensor:
    sub, leaf = _split_name(module, name)
    if leaf in sub._parameters and sub._parameters[leaf] is not None:
        return sub._parameters[leaf]
    if leaf in sub._buffers and sub._buffers[leaf] is not None:
        return sub._buffers[leaf]
    raise ValueError(f"module has no parameter or buffer named {name!r}")


def _signature(module: nn.Module):
    """(params, float buffers, int buffers) as lists of (name, shape, dtype), in layout order."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(module).__name__}")
    persistent = set(module.state_dict(keep_vars=True).keys())
    params, fbufs, ibufs = [], [], []
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            raise ValueError(f"parameter {name!r} has non-floating dtype {p.dtype}; FlatLayout "
                             "stores floating parameters only")
        params.append((name, tuple(p.shape), p.dtype))
    for name, b in module.named_buffers():
        if name not in persistent:
            continue
        if b.is_complex():
            raise ValueError(f"buffer {name!r} is complex ({b.dtype}); FlatLayout does not store it")
        (fbufs if b.is_floating_point() else ibufs).append((name, tuple(b.shape), b.dtype))
    return params, fbufs, ibufs


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class FlatLayout:
    """Where each tensor of a module sits in a flat float32 vector [P] (and int64 vector [Q])."""

    def __init__(self, params, float_buffers, int_buffers):
        self.entries: list[FlatEntry] = []
        off = 0
        for kind, items in (("param", params), ("buffer", float_buffers)):
            for name, shape, dtype in items:
                n = _numel(shape)
                self.entries.append(FlatEntry(name, shape, off, n, dtype, kind))
                off += n
        self.numel: int = off
        self.int_entries: list[FlatEntry] = []
        off = 0
        for name, shape, dtype in int_buffers:
            n = _numel(shape)
            self.int_entries.append(FlatEntry(name, shape, off, n, dtype, "int_buffer"))
            off += n
        self.int_numel: int = off
        self.param_names: list[str] = [e.name for e in self.entries if e.kind == "param"]
        self.buffer_names: list[str] = [e.name for e in self.entries if e.kind == "buffer"]
        self.names: list[str] = self.param_names + self.buffer_names
        self.int_buffer_names: list[str] = [e.name for e in self.int_entries]
        self._sig = (list(params), list(float_buffers), list(int_buffers))

    @classmethod
    def from_module(cls, module: nn.Module) -> "FlatLayout":
        return cls(*_signature(module))

    def __repr__(self) -> str:
        return (f"FlatLayout(P={self.numel}, params={len(self.param_names)}, "
                f"float buffers={len(self.buffer_names)}, int buffers={len(self.int_buffer_names)} "
                f"(Q={self.int_numel}))")

    def __iter__(self) -> Iterator[FlatEntry]:
        return iter(self.entries)

    def check(self, module: nn.Module) -> None:
        """Raise ValueError unless ``module`` has exactly this layout's names and shapes."""
        sig = _signature(module)
        for what, mine, theirs in zip(("parameters", "float buffers", "int buffers"), self._sig, sig):
            a = [(n, s) for n, s, _ in mine]
            b = [(n, s) for n, s, _ in theirs]
            if a != b:
                for i, (x, y) in enumerate(zip(a, b)):
                    if x != y:
                        raise ValueError(f"module does not match the layout: {what}[{i}] is "
                                         f"{y[0]!r} {list(y[1])}, layout has {x[0]!r} {list(x[1])}")
                raise ValueError(f"module does not match the layout: {len(b)} {what}, "
                                 f"layout has {len(a)}")

    def _vec(self, vec: torch.Tensor, n: int, what: str, floating: bool) -> None:
        if not isinstance(vec, torch.Tensor) or vec.shape != (n,):
            raise ValueError(f"{what} must be a [{n}] tensor, got "
                             f"{tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__}")
        if floating != vec.is_floating_point():
            kind = "floating" if floating else "integer"
            raise ValueError(f"{what} must have a {kind} dtype, got {vec.dtype}")

    def flatten(self, module: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the module's floating state into ``out`` ([P], float32 when allocated)."""
        self.check(module)
        if out is None:
            dev = next((t.device for t in module.state_dict().values()), torch.device("cpu"))
            out = torch.empty(self.numel, dtype=torch.float32, device=dev)
        self._vec(out, self.numel, "out", floating=True)
        with torch.no_grad():
            for e in self.entries:
                out[e.offset:e.offset + e.numel].copy_(_get(module, e.name).reshape(-1))
        return out

    def load_flat(self, module: nn.Module, vec: torch.Tensor) -> nn.Module:
        """Write ``vec`` ([P]) into the module's floating parameters and buffers (in place)."""
        self.check(module)
        self._vec(vec, self.numel, "vec", floating=True)
        with torch.no_grad():
            for e in self.entries:
                _get(module, e.name).copy_(vec[e.offset:e.offset + e.numel].view(e.shape))
        return module

    def flatten_int(self, module: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the module's integer buffers into ``out`` ([Q], int64 when allocated)."""
        self.check(module)
        if out is None:
            dev = next((t.device for t in module.state_dict().values()), torch.device("cpu"))
            out = torch.empty(self.int_numel, dtype=torch.int64, device=dev)
        self._vec(out, self.int_numel, "out", floating=False)
        for e in self.int_entries:
            out[e.offset:e.offset + e.numel].copy_(_get(module, e.name).reshape(-1))
        return out

    def load_int(self, module: nn.Module, vec: torch.Tensor) -> nn.Module:
        """Write ``vec`` ([Q], integer) into the module's integer buffers (in place)."""
        self.check(module)
        self._vec(vec, self.int_numel, "vec", floating=False)
        for e in self.int_entries:
            _get(module, e.name).copy_(vec[e.offset:e.offset + e.numel].view(e.shape))
        return module


class FlatClients:
    """K clients' copies of one model, stacked in a [K, P] buffer (+ [K, Q] int64 buffers).

    Every row starts equal to ``module``'s state. ``dtype`` is float32 or bfloat16 (the storage
    of the rows; ``global_buffer`` is always float32). ``device`` defaults to the module's.

    Attributes:
        layout: the FlatLayout of ``module``.
        buffer: [K, P] ``dtype``, the clients' floating state.
        int_buffers: [K, Q] int64, the clients' integer buffers.
        global_buffer: [P] float32, the averaged model (initially ``module``'s state).
        global_int_buffer: [Q] int64, the averaged integer buffers.
        grad_buffer: [K, P] ``dtype`` or None; created by ``bind(..., grads=True)``.
    """

    def __init__(self, module: nn.Module, num_clients: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.layout = FlatLayout.from_module(module)
        vec = self.layout.flatten(module)
        ivec = self.layout.flatten_int(module)
        dev = torch.device(device) if device is not None else vec.device
        k, p, q = num_clients, self.layout.numel, self.layout.int_numel
        self.num_clients = k
        self.dtype = dtype
        self.device = dev
        self.buffer = torch.empty(k, p, dtype=dtype, device=dev)
        self.buffer.copy_(vec.to(dev).expand(k, p))
        self.int_buffers = ivec.to(dev).expand(k, q).clone()
        self.global_buffer = vec.to(dev, torch.float32).clone()
        self.global_int_buffer = ivec.to(dev).clone()
        self.grad_buffer: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"FlatClients(K={self.num_clients}, P={self.layout.numel}, Q={self.layout.int_numel}, "
                f"dtype={self.dtype}, device={self.device})")

    def _row(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_clients:
            raise ValueError(f"client index must be an int in [0, {self.num_clients}), got {k!r}")
        return k

    def views(self, k: int) -> dict[str, torch.Tensor]:
        """name -> view of row k shaped like the tensor (floating state; no copy)."""
        row = self.buffer[self._row(k)]
        return {e.name: row[e.offset:e.offset + e.numel].view(e.shape) for e in self.layout.entries}

    def int_views(self, k: int) -> dict[str, torch.Tensor]:
        """name -> view of row k of ``int_buffers`` shaped like the integer buffer (no copy)."""
        row = self.int_buffers[self._row(k)]
        return {e.name: row[e.offset:e.offset + e.numel].view(e.shape)
                for e in self.layout.int_entries}

    def stacked(self, with_int: bool = True) -> dict[str, torch.Tensor]:
        """name -> [K, *shape] view into ``buffer`` (and ``int_buffers`` when ``with_int``).

        Meant for ``torch.func.functional_call(module, stacked, x)`` under ``torch.vmap``. No copy:
        in-place updates of these views update the flat buffers.
        """
        k = self.num_clients
        out = {e.name: self.buffer[:, e.offset:e.offset + e.numel].view(k, *e.shape)
               for e in self.layout.entries}
        if with_int:
            out.update({e.name: self.int_buffers[:, e.offset:e.offset + e.numel].view(k, *e.shape)
                        for e in self.layout.int_entries})
        return out

    def bind(self, k: int, module: nn.Module, grads: bool = False) -> nn.Module:
        """Make ``module``'s parameters and buffers *be* views into row k; return ``module``.

        Parameters become new leaf ``nn.Parameter`` objects sharing storage with ``buffer[k]``
        (same ``requires_grad`` as before), so an optimizer built over ``module.parameters()``
        *after* this call updates the flat buffer in place. Float buffers (BatchNorm running
        statistics) and integer buffers become views into ``buffer[k]`` / ``int_buffers[k]``.
        Parameters take the buffer's dtype and device.

        With ``grads=True`` each parameter's ``.grad`` is also set to a view into
        ``grad_buffer[k]`` (allocated as zeros on first use). Backward accumulates into an
        existing ``.grad`` in place, so gradients land in ``grad_buffer`` as long as they are
        never set to None: use ``optimizer.zero_grad(set_to_none=False)`` (or zero
        ``grad_buffer`` yourself). A backward with ``create_graph=True`` replaces ``.grad``.
        """
        self._row(k)
        self.layout.check(module)
        fviews = self.views(k)
        iviews = self.int_views(k)
        gviews = None
        if grads:
            if self.grad_buffer is None:
                self.grad_buffer = torch.zeros_like(self.buffer)
            grow = self.grad_buffer[k]
            gviews = {e.name: grow[e.offset:e.offset + e.numel].view(e.shape)
                      for e in self.layout.entries}
        rebound: dict[int, nn.Parameter] = {}
        for name in self.layout.param_names:
            sub, leaf = _split_name(module, name)
            old = sub._parameters[leaf]
            p = nn.Parameter(fviews[name], requires_grad=old.requires_grad)
            if gviews is not None:
                p.grad = gviews[name]
            rebound[id(old)] = p
        # Replace by identity, so a tied parameter (one Parameter under several names, listed
        # once in the layout) stays tied after binding.
        for sub in module.modules():
            for leaf, old in list(sub._parameters.items()):
                if old is not None and id(old) in rebound:
                    sub._parameters[leaf] = rebound[id(old)]
        for name in self.layout.buffer_names:
            sub, leaf = _split_name(module, name)
            sub._buffers[leaf] = fviews[name]
        for name in self.layout.int_buffer_names:
            sub, leaf = _split_name(module, name)
            sub._buffers[leaf] = iviews[name]
        return module

    def store(self, k: int, module: nn.Module) -> None:
        """Copy ``module``'s state into row k (floating state and integer buffers)."""
        self._row(k)
        self.layout.flatten(module, out=self.buffer[k])
        self.layout.flatten_int(module, out=self.int_buffers[k])

    def load_into(self, module: nn.Module, k: int | None = None) -> nn.Module:
        """Copy row k (or, for k=None, the global buffers) into a regular ``module``."""
        if k is None:
            vec, ivec = self.global_buffer, self.global_int_buffer
        else:
            vec, ivec = self.buffer[self._row(k)], self.int_buffers[k]
        self.layout.load_flat(module, vec)
        self.layout.load_int(module, ivec)
        return module

    def average(self, weights, broadcast: bool = True, backend: str | None = None) -> torch.Tensor:
        """FedAvg of the K rows into ``global_buffer`` (and integer buffers into
        ``global_int_buffer``, with the authors' semantics: see fsl_fast.ops.fedavg); with
        ``broadcast`` also write the averages back into every row. Returns ``global_buffer``."""
        from fsl_fast.ops.fedavg import fedavg, fedavg_int_buffers

        fedavg(self.buffer, weights, out=self.global_buffer, broadcast=broadcast, backend=backend)
        if self.layout.int_numel:
            self.global_int_buffer.copy_(fedavg_int_buffers(self.int_buffers, weights))
            if broadcast:
                self.int_buffers.copy_(self.global_int_buffer.expand_as(self.int_buffers))
        return self.global_buffer

