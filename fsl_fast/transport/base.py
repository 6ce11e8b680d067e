"""The channel between the clients and the server: the algorithms' only way to the other side.

An algorithm (:mod:`fsl_fast.algorithms`) computes through its engine and communicates through a
:class:`Channel`: the upload of smashed data, the gradient the server returns, the auxiliary
models the server sends after an alignment, and the model exchange of FedAvg. The channel applies
the link's codec (``--uplink`` / ``--quantize`` and ``--downlink``, with error feedback's
residuals kept by the sender), counts every message in the run's one :class:`~fsl_fast.ledger.Ledger`
and moves it:

- :class:`fsl_fast.transport.local.InProcessChannel`: clients and server share the process; the
  receiver gets the decoded message at once.
- :class:`fsl_fast.transport.torchdist.DistributedChannel`: clients and server in separate
  processes; messages are torch.distributed point-to-point sends, FedAvg a reduction over ranks.

Both count the same bytes, so a run's ledger does not depend on where it runs.
"""
from __future__ import annotations

import torch

from fsl_fast import codec
from fsl_fast.ledger import Ledger, tensor_bytes

__all__ = ["Channel"]


class Channel:
    """What the algorithms send and receive for the ``cfg.clients`` clients of a run. ``engine`` is
    the engine the algorithm computes with (the channel moves its models: FedAvg, the aligned
    auxiliaries)."""

    at_server = True  # whether this process holds the server (its buffers, its alignment)

    def __init__(self, cfg, ledger: Ledger, engine):
        self.cfg = cfg
        self.ledger = ledger
        self.engine = engine
        self.m = clients = cfg.clients
        self.uplink = codec.from_config(cfg, "up")
        self.downlink = codec.from_config(cfg, "down")
        # with ef, the residual of each client's last message (uplink: kept by the client;
        # downlink: kept by the server for that client)
        self.residual_up: list = [None] * clients
        self.residual_down: list = [None] * clients
        self.round = 0
        self._uploads = 0  # messages drawn a stochastic-rounding key this round
        self.last_up_bytes = 0  # the bytes of the last upload (the simulated clock's record)
        for direction, kind, c in (("up", "smashed", self.uplink), ("down", "gradients", self.downlink)):
            if not c.lossless:
                ledger.declare_parts(direction, kind, ["values"] + (["scales"] if c.spec.bits else [])
                                     + (["indices", "header"] if c.sparse else []))

    # -- the round -----------------------------------------------------------------------------
    def begin_round(self, t: int) -> None:
        self.round = t
        self._uploads = 0

    def stochastic_seed(self, k: int) -> int:
        """A distinct, reproducible counter-RNG key per (run seed, round, client, message); every
        process draws the keys in the same order."""
        self._uploads += 1
        return (self.cfg.seed * 1_000_003 + self.round * 10_007 + k * 101 + self._uploads) % (2**31)

    @staticmethod
    def encode(link: codec.Codec, residuals, k: int, x: torch.Tensor, seed: int, decode: bool = True):
        """(message, what the receiver decodes) of ``x`` from client k's side of the link; with
        ``ef`` the residual of k's last message of this shape is added first and the new one kept.
        ``decode=False`` (a sender in another process than its receiver): the decoded tensor is
        computed only when ``ef`` needs it, and returned as None otherwise."""
        if link.spec.ef:
            r = residuals[k]
            if r is not None and r.shape == x.shape:
                x = x + r
        payload = link.encode(x, seed)
        decoded = link.decode(payload) if decode or link.spec.ef else None
        if link.spec.ef:
            residuals[k] = (x - decoded).detach()
        return payload, decoded

    def decode(self, payload) -> torch.Tensor:
        """An uplink message (as kept in an alignment buffer) as the server uses it."""
        return self.uplink.decode(payload)

    def count_upload(self, payload, y: torch.Tensor) -> None:
        parts = None if self.uplink.lossless else self.uplink.parts(payload)
        nbytes = tensor_bytes(payload) if parts is None else sum(parts.values())
        self.ledger.add("up", "smashed", nbytes, parts=parts)
        self.ledger.add("up", "labels", tensor_bytes(y), paper=False)
        self.last_up_bytes = nbytes + tensor_bytes(y)

    def count_gradient(self, payload) -> None:
        if self.downlink.lossless:
            self.ledger.add("down", "gradients", tensor_bytes(payload))
        else:
            parts = self.downlink.parts(payload)
            self.ledger.add("down", "gradients", sum(parts.values()), parts=parts)

    # -- local training's messages ---------------------------------------------------------------
    def upload(self, k: int, z: torch.Tensor, y: torch.Tensor):
        """Client k uploads smashed data ``z`` and labels ``y``. Returns (the server's view of z,
        the message as sent) where this process is the server; (None, None) where it is not, or
        when the upload never arrived (its sender's process was lost)."""
        raise NotImplementedError

    def reply(self, k: int, g):
        """The server returns the cut-layer gradient ``g`` to client k (SplitFed). Returns what
        client k receives: a tensor, or a handle with ``wait()`` that the engine resolves when it
        needs the gradient; None where client k is not in this process."""
        raise NotImplementedError

    # -- models ----------------------------------------------------------------------------------
    def reachable(self, ks) -> list[int]:
        """The clients among ``ks`` whose uploads the server can still use for an alignment."""
        return list(ks)

    def send_aux(self, ks) -> None:
        """After an alignment the server sends each client in ``ks`` its auxiliary model."""
        raise NotImplementedError

    def average(self, weights, clients: bool = True, aux: bool = False, servers: bool = False) -> None:
        """FedAvg with ``weights`` (one per client, summing to 1 over the round's survivors) of the
        chosen models; every client gets the average. The bytes are counted by
        :meth:`count_models` (the papers' convention, whatever the wire carries)."""
        raise NotImplementedError

    def count_models(self, kind: str, nbytes: int, clients: int) -> None:
        """FedAvg's exchange: ``clients`` clients each upload a ``kind`` model of ``nbytes`` and
        download the average."""
        self.ledger.add("up", kind, nbytes, count=clients)
        self.ledger.add("down", kind, nbytes, count=clients)

    def count_initial(self, kind: str, nbytes: int, clients: int) -> None:
        """Round 0's broadcast of the initial ``kind`` model to ``clients`` clients (outside the
        paper's convention)."""
        self.ledger.add("down", kind, nbytes, paper=False, count=clients)

    def unreachable(self) -> dict[int, dict]:
        """Clients found gone during this round's local training, {client: record}: none in one
        process; in a distributed run the clients of a process that died (--tolerate-dropouts)."""
        return {}

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.uplink.spec.ef or self.downlink.spec.ef:
            return {"residual_up": list(self.residual_up), "residual_down": list(self.residual_down)}
        return {}

    def load_state_dict(self, sd: dict) -> None:
        if self.uplink.spec.ef or self.downlink.spec.ef:
            self.residual_up = list(sd.get("residual_up", [None] * self.m))
            self.residual_down = list(sd.get("residual_down", [None] * self.m))
