"""Clients and server in separate processes: the channel's messages as torch.distributed
point-to-point sends (:class:`fsl_fast.transport.p2p.Transport`), FedAvg as a reduction over ranks.

Every process runs the same algorithm (SPMD); rank 0 is the server, ranks 1..R-1 host the clients
(:class:`~fsl_fast.transport.topology.Topology`). A message is sent by the process that holds its
sender and received by the one that holds its receiver; the other processes skip it, but draw the
same stochastic-rounding keys so that every process stays in step.

- Smashed data go up as :func:`fsl_fast.codec.wire` tensors plus the labels; the server rebuilds
  the message (:meth:`~fsl_fast.codec.Codec.from_wire`) and counts it in the ledger.
- SplitFed's gradients go down the same way; the client's process receives each one when its
  engine needs it (a :class:`PendingRecv` in the client backward), because NCCL runs a pair of
  ranks' operations in posting order.
- After an alignment each auxiliary model goes down to its client's process.
- FedAvg moves flat [P] buffers in which each client rank has pre-reduced its own clients
  (``--dist-fedavg``): ``ordered``, the running sum passed rank 1 -> ... -> R-1 -> 0 so every
  addition happens in the in-process order (bit-equal results), or ``allreduce``, one all-reduce
  (equal up to float32 reassociation); then rank 0 broadcasts the average.

The ledger on rank 0 counts exactly what the in-process run counts. The transport counts the
payload bytes each rank puts on the wire (``wire_*`` metrics): per-client messages equal the
ledger byte for byte; the model exchange differs on purpose (the ledger counts every client's
upload and download, the wire one pre-reduced buffer per client rank each way).
"""
from __future__ import annotations

import torch

from fsl_fast.codec import wire
from fsl_fast.ops.fedavg import weighted_sum
from fsl_fast.transport.base import Channel
from fsl_fast.transport.p2p import PeerLost, Transport

__all__ = ["DistributedChannel", "PendingRecv"]


class PendingRecv:
    """A gradient the client's process receives when it needs it (in the client backward)."""

    def __init__(self, fn):
        self._fn = fn

    def wait(self):
        return self._fn()


class DistributedChannel(Channel):
    """``cut_shape``: the smashed data's shape per sample (the server allocates receive buffers
    from it); ``whole_model``, ``server_copies``: the algorithm's (FedAvg trains the server halves
    on the client ranks; SplitFed v1's server copies live on rank 0)."""

    def __init__(self, cfg, ledger, engine, transport: Transport, cut_shape, num_classes: int,
                 whole_model: bool = False, server_copies: bool = False):
        super().__init__(cfg, ledger, engine)
        self.transport = transport
        self.topo = transport.topo
        self.at_server = self.topo.is_server
        self.cut_shape = tuple(cut_shape)
        self.num_classes = int(num_classes)
        self.whole_model = whole_model
        self.server_copies = server_copies
        self.uploads: dict[int, int] = {}  # uploads received from each client this round (rank 0)
        self.z_shapes: dict[int, tuple] = {}  # the last upload's shape of each hosted client

    def _rebuild(self, link, shape, tensors, src, what):
        try:
            return link.from_wire(shape, tensors)
        except ValueError as e:
            raise self.transport.error(f"{what} from rank {src}: {e}") from None

    # -- local training's messages ---------------------------------------------------------------
    def upload(self, k, z, y):
        topo, t = self.topo, self.transport
        owner = topo.owner(k)
        link = self.uplink
        # The stochastic-rounding key counts every upload of the round, on every rank.
        seed = self.stochastic_seed(k) if not link.lossless else 0
        if topo.hosts(k):
            z = z.detach()
            self.z_shapes[k] = tuple(z.shape)
            payload = z if link.lossless else self.encode(link, self.residual_up, k, z, seed, decode=False)[0]
            t.send(0, "smashed", k, [("smashed", w) for _, w in wire(payload)] + [("labels", y)], "up")
            return None, None
        if not topo.is_server or owner in t.lost:
            return None, None  # (lost: --tolerate-dropouts dropped the client's rank)
        b = int(y.shape[0])
        shape = (b,) + self.cut_shape
        labels = ("labels", (b,), torch.int64, ("labels", self.num_classes))
        specs = [("smashed",) + s[1:] for s in link.wire_specs(shape)]
        try:
            *got, y_in = t.recv(owner, "smashed", k, specs + [labels], "up")
            payload = self._rebuild(link, shape, got, owner, f"smashed data of client {k}")
        except PeerLost:
            return None, None  # the algorithm skips an upload that did not arrive
        self.uploads[k] = self.uploads.get(k, 0) + 1
        y.copy_(y_in)  # the algorithm's y on the server is this upload's receive buffer
        self.count_upload(payload, y_in)
        return link.decode(payload), payload

    def reply(self, k, g):
        topo, t = self.topo, self.transport
        link = self.downlink
        # (every rank draws the key, as every rank draws the uplink's)
        seed = self.stochastic_seed(k) ^ (1 << 30) if not link.lossless else 0
        if topo.is_server:
            if g is None:  # client k's upload never arrived (--tolerate-dropouts)
                return None
            g = g.detach()
            payload = g if link.lossless else self.encode(link, self.residual_down, k, g, seed, decode=False)[0]
            # Posted after this iteration's last upload has been received (client_backward):
            # NCCL runs the point-to-point operations of a pair of ranks on one stream in posting
            # order, so sending g_0 before receiving z_1 from the same rank would deadlock.
            t.defer_send(topo.owner(k), "gradients", k, [("gradients", w) for _, w in wire(payload)], "down")
            self.count_gradient(payload)
            return None
        if not topo.hosts(k):
            return None
        shape = self.z_shapes[k]
        specs = [("gradients",) + s[1:] for s in link.wire_specs(shape)]

        def receive():
            got = t.recv(0, "gradients", k, specs, "down")
            return link.decode(self._rebuild(link, shape, got, 0, f"gradient of client {k}"))

        return PendingRecv(receive)

    # -- models ----------------------------------------------------------------------------------
    def reachable(self, ks):
        # A client of a dropped rank is aligned only if its upload of this iteration arrived
        # (as an in-process dropout after that iteration would be).
        if not self.topo.is_server:
            return list(ks)
        lost = self.transport.lost
        return [k for k in ks if self.topo.owner(k) not in lost or self.uploads.get(k, 0)]

    def send_aux(self, ks) -> None:
        topo, t, models = self.topo, self.transport, self.engine
        if topo.is_server:
            nbytes = models.aux_bytes()
            for k in ks:
                f, i = models.export_model("aux", k)
                items = [("aux_model", f)] + ([("aux_model", i)] if i.numel() else [])
                t.send(topo.owner(k), "aux_model", k, items, "down")
                self.ledger.add("down", "aux_model", nbytes)
            t.flush()
            return
        for k in ks:
            if not topo.hosts(k):
                continue
            f0, i0 = models.export_model("aux", k)
            specs = [("aux_model", tuple(f0.shape), torch.float32, "finite")]
            if i0.numel():
                specs.append(("aux_model", tuple(i0.shape), torch.int64, None))
            got = t.recv(0, "aux_model", k, specs, "down")
            models.import_model("aux", k, got[0], got[1] if len(got) > 1 else i0)

    def average(self, weights, clients=True, aux=False, servers=False):
        kinds = (["client"] if clients else []) + (["aux"] if aux else [])
        if servers and self.whole_model:
            kinds.append("server")  # FedAvg: server halves are trained on the client ranks
        elif servers and self.server_copies and self.topo.is_server:
            # SplitFed v1: the per-client server copies live on rank 0; averaged there, unsent.
            self.engine.aggregate(weights, clients=False, aux=False, servers=True)
        for kind in kinds:
            self._fedavg(kind, weights)

    def _fedavg(self, kind: str, weights) -> None:
        """Weighted average of every client's ``kind`` model as flat float32 [P] (plus float32 [Q]
        for integer buffers, truncated at the end, as fsl_fast.ops.fedavg). Each client rank adds
        ``x_k * w_k`` for its own clients in client order, then reduces as the module doc says."""
        topo, t, models = self.topo, self.transport, self.engine
        rank, live = topo.rank, topo.live  # (live: every rank unless --tolerate-dropouts lost some)
        pos = live.index(rank)
        # Every rank holds every model slot with the same layout, so any slot describes it.
        f0, i0 = models.export_model(kind, 0)
        has_int = i0.numel() > 0
        wire_kind = {"client": "client_model", "aux": "aux_model", "server": "server_model"}[kind]
        specs = [(wire_kind, tuple(f0.shape), torch.float32, "finite")]
        if has_int:
            specs.append((wire_kind, tuple(i0.shape), torch.float32, "finite"))
        ordered = self.cfg.dist_fedavg == "ordered"
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
            f, i = models.export_model(kind, k)
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
        models.import_model_all(kind, acc, ints)

    def unreachable(self) -> dict[int, dict]:
        """Clients whose rank left the run during this round's local training (every rank gets
        the same keys; rank 0's records say how many of their uploads arrived)."""
        new = self.transport.settle()
        uploads, self.uploads = self.uploads, {}
        out = {}
        for r in new:
            why = self.transport.lost_why.get(r, "")
            for k in self.topo.blocks[r]:
                out[k] = {"client": k, "rank": r, "uploads_received": uploads.get(k, 0)}
                if why:
                    out[k]["why"] = why
        return out
