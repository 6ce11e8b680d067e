"""Communication ledger: every message between clients and server is counted here.

Two totals are kept:

- ``comm_bytes``: everything that crosses the network (labels and the initial broadcast included);
- ``comm_bytes_paper``: the FSL-SAGE authors' convention (ALGORITHM.md §3-§6): labels and the
  initial model broadcast are not counted. For the paper's CIFAR-10 / ResNet-18 setting the
  per-round value of this total equals ALGORITHM.md §6 to the byte (tested).

Bytes per message are the bytes of the payload as sent: fp32 tensors count 4 bytes per element,
int64 labels 8, quantized activations their codes plus scales.
"""
from __future__ import annotations

from collections import defaultdict

import torch

KINDS = ("smashed", "labels", "gradients", "client_model", "aux_model", "server_model")
DIRECTIONS = ("up", "down")
GIB = float(1 << 30)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of a model as sent: all parameters and buffers (state_dict), at their own dtypes."""
    return sum(tensor_bytes(v) for v in module.state_dict().values())


class Ledger:
    def __init__(self) -> None:
        self.comm_bytes = 0
        self.comm_bytes_paper = 0
        self._round: dict[str, int] = defaultdict(int)
        self._round_total = 0
        self._round_paper = 0
        self._parts: dict[str, int] = {}  # "up_smashed_indices" -> bytes this round (declared keys)

    def declare_parts(self, direction: str, kind: str, names) -> None:
        """Messages of (direction, kind) are split into components ``names`` (a codec's values,
        scales, indices, header): each round reports them as ``bytes_{direction}_{kind}_{name}``."""
        for name in names:
            self._parts.setdefault(f"{direction}_{kind}_{name}", 0)

    def add(self, direction: str, kind: str, nbytes: int, *, paper: bool = True, count: int = 1,
            parts: dict | None = None) -> None:
        """Record ``count`` messages of ``nbytes`` each. ``paper=False`` keeps it out of the
        authors' convention (labels, the initial broadcast). ``parts``: the bytes of one message
        by component (declared with :meth:`declare_parts`; they must add up to ``nbytes``)."""
        if parts is not None:
            if sum(parts.values()) != nbytes:
                raise ValueError(f"ledger: the components {parts} of a {kind} message do not add up "
                                 f"to its {nbytes} bytes")
            for name, b in parts.items():
                key = f"{direction}_{kind}_{name}"
                if key not in self._parts:
                    raise ValueError(f"ledger: component {name!r} of {direction} {kind} was not declared")
                self._parts[key] += int(b) * int(count)
        if direction not in DIRECTIONS:
            raise ValueError(f"ledger: direction must be one of {DIRECTIONS}, got {direction!r}")
        if kind not in KINDS:
            raise ValueError(f"ledger: kind must be one of {KINDS}, got {kind!r}")
        n = int(nbytes) * int(count)
        if n < 0:
            raise ValueError(f"ledger: negative byte count {n}")
        self._round[f"{direction}_{kind}"] += n
        self._round_total += n
        self.comm_bytes += n
        if paper and kind != "labels":
            self._round_paper += n
            self.comm_bytes_paper += n

    def end_round(self) -> dict:
        """Close the round: return its per-kind bytes and totals, reset the per-round counters."""
        out = {f"bytes_{d}_{k}": self._round.get(f"{d}_{k}", 0) for d in DIRECTIONS for k in KINDS}
        out["round_bytes"] = self._round_total
        out["round_bytes_paper"] = self._round_paper
        out["comm_bytes"] = self.comm_bytes
        out["comm_bytes_paper"] = self.comm_bytes_paper
        for key in self._parts:
            out[f"bytes_{key}"] = self._parts[key]
            self._parts[key] = 0
        self._round = defaultdict(int)
        self._round_total = 0
        self._round_paper = 0
        return out

    def state_dict(self) -> dict:
        return {"comm_bytes": self.comm_bytes, "comm_bytes_paper": self.comm_bytes_paper}

    def load_state_dict(self, sd: dict) -> None:
        self.comm_bytes = int(sd["comm_bytes"])
        self.comm_bytes_paper = int(sd["comm_bytes_paper"])
