"""Codecs for what crosses the cut layer: the smashed-data uplink (``--uplink``) and SplitFed's
cut-layer gradient downlink (``--downlink``).

A codec is a comma-separated list of stages (docs/codecs.md has the wire format):

- ``topk:F`` -- per-row top-k sparsification: of each sample's M values keep the
  ``k = max(1, ceil(F * M))`` largest in magnitude (ties: the lower index), send their values and
  their positions. Positions go as a bitmap (``ceil(M / 8)`` bytes per row) or as gaps between
  consecutive positions packed at one bit width for the whole tensor, whichever is smaller for
  that tensor (a tie goes to the bitmap); one header byte says which, and the width.
- ``int8``, ``int4``, ``int2`` with optional ``:gG`` -- per-group absmax quantization of what is
  sent (the kept values after ``topk``) by :mod:`fsl_fast.ops.quantize`: codes plus one float32
  scale per group of G values (default: per row for int8, 32 for int4 and int2). Nearest-even, or
  the counter-based stochastic rounding with ``--stochastic-rounding``.
- ``ef`` -- error feedback: each sender keeps what its last message lost (``x - decode(encode(x))``)
  and adds it to its next message of the same shape (a message of another shape starts afresh).
  The residuals are part of the checkpoint. Implemented by the algorithm (per client), not here.

Stages appear at most once, in this order. ``none`` sends float32. The wire bytes of a message are
split into components: ``values`` (float32 values or quantization codes), ``scales``, ``indices``
and ``header``; the ledger counts each under its own key and their sum as the message.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from fsl_fast.config import ConfigError

_QUANT = re.compile(r"^int(8|4|2)(?::g(\d+))?$")
_TOPK = re.compile(r"^topk:([0-9.eE+-]+)$")


@dataclass(frozen=True)
class Spec:
    text: str = "none"
    topk: float | None = None  # fraction of each row kept
    bits: int | None = None  # 8, 4, 2
    group: int | None = None  # group size given with :gG (None: the quantizer's default)
    ef: bool = False

    @property
    def lossless(self) -> bool:
        return self.topk is None and self.bits is None


def parse(text: str, option: str = "--uplink") -> Spec:
    """The codec ``text`` describes; ConfigError naming the stage that is wrong."""
    text = (text or "none").strip()
    if text == "none":
        return Spec()
    topk = bits = group = None
    ef = False
    order = []
    for raw in text.split(","):
        st = raw.strip()
        m_q, m_t = _QUANT.match(st), _TOPK.match(st)
        if m_t:
            if topk is not None:
                raise ConfigError(f"{option}: topk appears twice in {text!r}")
            try:
                topk = float(m_t.group(1))
            except ValueError:
                topk = float("nan")
            if not (0.0 < topk <= 1.0):
                raise ConfigError(f"{option}: topk:F needs 0 < F <= 1, got {m_t.group(1)!r} in {text!r}")
            order.append(0)
        elif m_q:
            if bits is not None:
                raise ConfigError(f"{option}: more than one quantization stage in {text!r}")
            bits = int(m_q.group(1))
            if m_q.group(2) is not None:
                group = int(m_q.group(2))
                need = {8: 1, 4: 2, 2: 4}[bits]
                if group < 1 or group % need:
                    raise ConfigError(f"{option}: int{bits}:gG needs a group size >= 1"
                                      + (f" divisible by {need}" if need > 1 else "") + f", got {group} in {text!r}")
            order.append(1)
        elif st == "ef":
            if ef:
                raise ConfigError(f"{option}: ef appears twice in {text!r}")
            ef = True
            order.append(2)
        else:
            raise ConfigError(f"{option}: unknown stage {st!r} in {text!r} (stages: topk:F, "
                              "int8|int4|int2[:gG], ef; or none)")
    if order != sorted(order):
        raise ConfigError(f"{option}: stages go in the order topk, quantization, ef; got {text!r}")
    if topk is None and bits is None:
        raise ConfigError(f"{option}: ef alone compresses nothing; add topk:F or a quantization stage "
                          f"(got {text!r})")
    return Spec(text, topk, bits, group, ef)


# ---------------------------------------------------------------------------------------------
# Top-k payload


def topk_indices(a: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    """Per row of ``a`` [N, M] (finite) the positions of the k largest magnitudes, ascending;
    among equal magnitudes the lower positions win. int64 [N, k] (fsl_fast.ops.topk)."""
    from fsl_fast.ops.topk import topk_rows

    return topk_rows(a, k, backend)[0]


def _gaps(index: torch.Tensor) -> torch.Tensor:
    """Per row: the first position, then each next position minus the previous minus 1."""
    return torch.cat([index[:, :1], index[:, 1:] - index[:, :-1] - 1], dim=1)


def index_coding(index: torch.Tensor, m: int) -> tuple[str, int, int]:
    """(coding, gap bit width, bytes) of the positions ``index`` [N, k] (ascending per row) of
    rows of length m: the bitmap or the packed gaps, whichever is smaller (tie: bitmap); bytes
    exclude the header byte."""
    n, k = index.shape
    bitmap = n * -(-m // 8)
    if n == 0 or k == 0:
        return "bitmap", 0, bitmap
    width = max(1, int(_gaps(index).max()).bit_length())
    delta = -(-n * k * width // 8)
    return ("bitmap", 0, bitmap) if bitmap <= delta else ("delta", width, delta)


def index_bytes_bound(n: int, k: int, m: int) -> int:
    """The most the positions of an [n, m] tensor's top-k can take (gaps of up to m - 1)."""
    bitmap = n * -(-m // 8)
    width = max(1, (m - 1).bit_length())
    return min(bitmap, -(-n * k * width // 8))


@dataclass
class Sparse:
    """A top-k message: the kept values (float32 [N, k], or their QuantizedTensor) and positions."""

    values: object
    index: torch.Tensor  # int64 [N, k], ascending per row
    shape: torch.Size  # of the dense tensor
    dtype: torch.dtype
    coding: str
    width: int
    index_nbytes: int  # positions on the wire, header byte excluded

    @property
    def parts(self) -> dict[str, int]:
        out = _value_parts(self.values)
        out["indices"] = self.index_nbytes
        out["header"] = 1
        return out

    @property
    def nbytes(self) -> int:
        return sum(self.parts.values())

    def slice_rows(self, start: int) -> "Sparse":
        n = int(self.shape[0])
        if not 0 <= start <= n:
            raise ValueError(f"Sparse.slice_rows: start must be in [0, {n}], got {start}")
        index = self.index[start:]
        m = math.prod(self.shape[1:])
        coding, width, nb = index_coding(index, m)
        return Sparse(slice_rows(self.values, start), index, torch.Size((n - start, *self.shape[1:])),
                      self.dtype, coding, width, nb)

    def state_dict(self) -> dict:
        v = self.values
        return {"values": v if isinstance(v, torch.Tensor) else None,
                "qvalues": None if isinstance(v, torch.Tensor) else v.state_dict(),
                "index": self.index, "shape": list(self.shape), "dtype": str(self.dtype).replace("torch.", ""),
                "coding": self.coding, "width": self.width, "index_nbytes": self.index_nbytes}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "Sparse":
        from fsl_fast.ops.quantize import QuantizedTensor

        values = sd["values"] if sd["values"] is not None else QuantizedTensor.from_state_dict(sd["qvalues"])
        return cls(values, sd["index"], torch.Size(sd["shape"]), getattr(torch, sd["dtype"]), sd["coding"],
                   int(sd["width"]), int(sd["index_nbytes"]))


def slice_rows(p, start: int):
    """Rows ``start:`` of a message (a tensor, a QuantizedTensor or a Sparse) without decoding."""
    if isinstance(p, torch.Tensor):
        return p[start:]
    return p.slice_rows(start)


def _value_parts(v) -> dict[str, int]:
    if isinstance(v, torch.Tensor):
        return {"values": v.numel() * v.element_size()}
    return {"values": v.codes.numel() * v.codes.element_size(),
            "scales": v.scales.numel() * v.scales.element_size()}


class AtMost(int):
    """A 1-D tensor length known only as an upper bound (the top-k positions in :meth:`Codec.wire_specs`)."""


@dataclass
class Counted:
    """What a message would be on the wire, for tensors without values (the meta device of
    ``python -m fsl_fast.comm``); data-dependent position bytes are their upper bound."""

    shape: torch.Size
    parts: dict

    @property
    def nbytes(self) -> int:
        return sum(self.parts.values())


# ---------------------------------------------------------------------------------------------
# The codec


class Codec:
    """Encode/decode per ``Spec`` (error feedback is the caller's: see the module doc)."""

    def __init__(self, spec: Spec, stochastic: bool = False, default_group: int | None = None):
        self.spec = spec
        self.stochastic = bool(stochastic)
        self.group = spec.group if spec.group is not None else default_group

    @property
    def lossless(self) -> bool:
        return self.spec.lossless

    @property
    def sparse(self) -> bool:
        return self.spec.topk is not None

    def k_of(self, m: int) -> int:
        return min(m, max(1, math.ceil(self.spec.topk * m)))

    def _quantize(self, x2: torch.Tensor, seed: int):
        from fsl_fast.ops import quantize as Q

        return Q.quantize(x2, bits=self.spec.bits, group_size=self.group, stochastic=self.stochastic, seed=seed)

    def encode(self, z: torch.Tensor, seed: int = 0):
        """The message for ``z`` [N, ...]: the tensor itself (none), a QuantizedTensor
        (quantization only), a :class:`Sparse` (top-k), or a :class:`Counted` on the meta device."""
        if self.lossless:
            return z
        if z.device.type == "meta":
            return self._counted(z)
        if self.spec.topk is None:
            return self._quantize(z, seed)
        n = z.shape[0]
        z2 = z.reshape(n, -1)
        m = z2.shape[1]
        k = self.k_of(m)
        if m:
            from fsl_fast.ops.topk import topk_rows

            index, values = topk_rows(z2, k)
        else:
            index, values = z2.new_empty((n, 0), dtype=torch.int64), z2.new_empty((n, 0))
        coding, width, nb = index_coding(index, m)
        if self.spec.bits is not None:
            values = self._quantize(values, seed)
        return Sparse(values, index, z.shape, z.dtype, coding, width, nb)

    def decode(self, payload) -> torch.Tensor:
        if isinstance(payload, torch.Tensor):
            return payload
        if isinstance(payload, Counted):
            return torch.empty(payload.shape, device="meta")
        from fsl_fast.ops import quantize as Q

        if isinstance(payload, Q.QuantizedTensor):
            return Q.dequantize(payload)
        values = payload.values if isinstance(payload.values, torch.Tensor) else Q.dequantize(payload.values)
        n = int(payload.shape[0])
        out = torch.zeros((n, math.prod(payload.shape[1:])), dtype=torch.float32, device=payload.index.device)
        out.scatter_(1, payload.index, values.float())
        return out.view(payload.shape).to(payload.dtype)

    def _layout(self, shape):
        """(n, m, cols, plan) of a message for a tensor of ``shape``: rows, values per row, values
        sent per row (k with top-k), and the quantizer's plan of the sent values (None unquantized)."""
        n = int(shape[0])
        m = math.prod(shape[1:]) if len(shape) > 1 else 1
        cols = self.k_of(m) if self.sparse else m
        if self.spec.bits is None:
            return n, m, cols, None
        from fsl_fast.ops import quantize as Q

        return n, m, cols, Q.quant_plan((n, cols), self.spec.bits, self.group)

    def wire_specs(self, shape) -> list[tuple[str, object, torch.dtype, str | None]]:
        """What the receiver of a message for a tensor of ``shape`` expects, tensor by tensor, as
        :func:`wire` sends it: (component, shape, dtype, check). The positions' length depends on
        the message; their shape is given as an :class:`AtMost` bound."""
        n, m, cols, p = self._layout(shape)
        if p is None:
            out = [("values", (n, cols) if self.sparse else tuple(shape), torch.float32, "finite")]
        else:
            out = [("values", (n, p.code_cols), torch.int8 if p.bits == 8 else torch.uint8, None),
                   ("scales", (n, p.groups), torch.float32, "finite")]
        if self.sparse:
            out += [("header", (1,), torch.uint8, None), ("indices", AtMost(n * -(-m // 8)), torch.uint8, None)]
        return out

    def from_wire(self, shape, tensors: list[torch.Tensor]):
        """The message rebuilt from the tensors of :meth:`wire_specs` (ValueError if malformed)."""
        from fsl_fast.ops import quantize as Q

        shape = torch.Size(shape)
        n, m, cols, p = self._layout(shape)
        if p is None:
            values, rest = tensors[0], tensors[1:]
        else:
            vshape = torch.Size((n, cols)) if self.sparse else shape
            values = Q.QuantizedTensor(tensors[0], tensors[1], vshape, torch.float32, p.bits, p.group_size)
            rest = tensors[2:]
        if not self.sparse:
            return values
        head, pos = rest
        width = int(head[0])
        coding = "bitmap" if width == 0 else "delta"
        index = unpack_positions(pos, n, cols, m, coding, width)
        return Sparse(values, index, shape, torch.float32, coding, width, int(pos.numel()))

    @staticmethod
    def parts(payload) -> dict[str, int]:
        """Wire bytes by component."""
        if isinstance(payload, torch.Tensor):
            return {"values": payload.numel() * payload.element_size()}
        if isinstance(payload, (Sparse, Counted)):
            return dict(payload.parts)
        return _value_parts(payload)

    def _counted(self, z: torch.Tensor) -> Counted:
        n, m, cols, p = self._layout(z.shape)
        parts: dict[str, int] = {}
        if self.sparse:
            parts["indices"] = index_bytes_bound(n, cols, m)
            parts["header"] = 1
        if p is None:
            parts["values"] = n * cols * 4
        else:
            parts["values"] = n * p.code_cols
            parts["scales"] = n * p.groups * 4
        return Counted(z.shape, parts)


def from_config(cfg, direction: str = "up") -> Codec:
    """The uplink (``--uplink``, or ``--quantize`` with ``--quantize-group-size``) or downlink codec."""
    if direction == "up":
        spec = parse(uplink_text(cfg), "--uplink")
        gs = int(getattr(cfg, "quantize_group_size", 0) or 0) or None
        return Codec(spec, getattr(cfg, "stochastic_rounding", False), gs)
    return Codec(parse(getattr(cfg, "downlink", "none"), "--downlink"), getattr(cfg, "stochastic_rounding", False))


def uplink_text(cfg) -> str:
    """``--uplink``, or the ``--quantize`` alias when only it is given."""
    up = getattr(cfg, "uplink", "none") or "none"
    q = getattr(cfg, "quantize", "none") or "none"
    if up == "none" and q != "none":
        return q
    return up


# ---------------------------------------------------------------------------------------------
# Wire form: the tensors that carry a message between processes (the distributed runtime).
# The position bytes are the real packed form whose length the ledger counts in-process.


def _bytes_of_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat 0/1 tensor, least significant bit first, into uint8 bytes (zero-padded)."""
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    w = torch.arange(8, device=bits.device, dtype=torch.int32)
    return (bits.view(-1, 8).to(torch.int32) << w).sum(dim=1).to(torch.uint8)


def _bits_of_bytes(data: torch.Tensor) -> torch.Tensor:
    w = torch.arange(8, device=data.device, dtype=torch.int32)
    return ((data.to(torch.int32)[:, None] >> w) & 1).view(-1)


def pack_positions(index: torch.Tensor, m: int, coding: str, width: int) -> torch.Tensor:
    """The position bytes of ``index`` [N, k] (ascending per row, rows of length m) in
    ``coding``: a bitmap of ceil(m / 8) bytes per row, or the gaps (first position, then the
    distance to the previous one minus one), each ``width`` bits, in one bit stream over the
    tensor. Bits go least significant first. The length is ``index_coding``'s byte count."""
    n, k = index.shape
    if coding == "bitmap":
        bits = torch.zeros((n, -(-m // 8) * 8), dtype=torch.uint8, device=index.device)
        bits.scatter_(1, index, 1)
        return _bytes_of_bits(bits.view(-1))
    gaps = _gaps(index).reshape(-1)
    w = torch.arange(width, device=index.device, dtype=torch.int64)
    return _bytes_of_bits(((gaps[:, None] >> w) & 1).to(torch.uint8).view(-1))


def unpack_positions(data: torch.Tensor, n: int, k: int, m: int, coding: str, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_positions`; ValueError when ``data`` cannot be such a message."""
    expect = n * -(-m // 8) if coding == "bitmap" else -(-n * k * width // 8)
    if data.dim() != 1 or data.numel() != expect:
        raise ValueError(f"top-k positions: {coding} of [{n}, {k}] in rows of {m} takes {expect} bytes, "
                         f"got {data.numel()}")
    bits = _bits_of_bytes(data)
    if coding == "bitmap":
        bits = bits.view(n, -1)
        if bool(bits[:, m:].any()) or bool((bits.sum(dim=1) != k).any()):
            raise ValueError(f"top-k positions: a bitmap row does not hold exactly {k} positions < {m}")
        return bits.nonzero()[:, 1].view(n, k)
    w = torch.arange(width, device=data.device, dtype=torch.int64)
    gaps = (bits[:n * k * width].view(n * k, width).to(torch.int64) << w).sum(dim=1).view(n, k)
    index = torch.cumsum(gaps + 1, dim=1) - 1
    if n and k and int(index[:, -1].max()) >= m:
        raise ValueError(f"top-k positions: a gap-coded row runs past its length {m}")
    return index


def wire(payload) -> list[tuple[str, torch.Tensor]]:
    """The tensors that carry ``payload`` (a tensor, QuantizedTensor or :class:`Sparse`) between
    processes, named by ledger component; their bytes are ``Codec.parts(payload)``."""
    if isinstance(payload, torch.Tensor):
        return [("values", payload)]
    if isinstance(payload, Sparse):
        m = math.prod(payload.shape[1:])
        head = torch.tensor([0 if payload.coding == "bitmap" else payload.width], dtype=torch.uint8,
                            device=payload.index.device)
        pos = pack_positions(payload.index, m, payload.coding, payload.width)
        return wire(payload.values) + [("header", head), ("indices", pos)]
    return [("values", payload.codes), ("scales", payload.scales)]
