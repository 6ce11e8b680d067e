"""The engine interface the algorithms are written against.

Lists are indexed like ``ks`` (the clients taking part in this call, ascending). ``zs`` returned by
``client_forward`` carry whatever the engine needs to backpropagate later (the autograd graph);
algorithms only pass them back to ``client_backward`` or detach them to send them.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fsl_fast.ledger import state_bytes


def wide(t: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 result of the precision context as fp32 (losses, the wire); others unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def cross_entropy(compute, model, x, y, reduction: str = "mean") -> torch.Tensor:
    """CE(model(x), y): the model runs in the precision context ``compute``, the loss on fp32
    logits."""
    with compute():
        logits = model(x)
    return F.cross_entropy(wide(logits), y, reduction=reduction)


@contextlib.contextmanager
def preserved_buffers(module):
    """Run a train-mode forward without keeping its BatchNorm running-statistics updates."""
    saved = [b.clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(module.buffers(), saved):
                b.copy_(s)


class Engine:
    device: torch.device

    def __init__(self, cfg, split, num_clients, algorithm_cls, device):
        self.cfg = cfg
        self.split = split
        self.m = num_clients
        self.algo = algorithm_cls
        self.device = torch.device(device)
        self._client_bytes = state_bytes(split.client)
        self._server_bytes = state_bytes(split.server)
        self._aux_bytes = state_bytes(split.aux)
        self.bf16 = getattr(cfg, "precision", "fp32") == "bf16"

    def compute(self):
        """Context for the models' torch computations: autocast to bfloat16 with --precision
        bf16 (parameters stay fp32 masters; convolutions and matrix products run in bf16), a
        no-op in fp32. Losses are taken on ``wide()`` (fp32) logits outside it."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def ce_loss(self, model, x, y, reduction: str = "mean", record=None) -> torch.Tensor:
        """CE(model(x), y) in the precision context; ``record``: the client ids whose training
        statistics this batch counts in (``record_train``), None for none."""
        if record is None:
            return cross_entropy(self.compute, model, x, y, reduction)
        with self.compute():
            logits = model(x)
        logits = wide(logits)
        self.record_train(record, logits, y)
        return F.cross_entropy(logits, y, reduction=reduction)

    # -- training statistics: loss and accuracy of the whole model on the batches the server
    # trains on (every batch for FedAvg and SplitFed, the uploaded ones for CSE-FSL and FSL-SAGE)
    def reset_train_stats(self) -> None:
        self._train = None

    @torch.no_grad()
    def record_train(self, ks, out, y, logp: bool = False) -> None:
        """Count the batch (``out``: logits, or log-probabilities with ``logp``, of ``len(ks)``
        equal blocks of rows, one per client in ``ks``) into per-client sums of (loss, correct,
        samples) in float64, so a round's totals do not depend on how clients were grouped."""
        out = out.detach().float()
        per = (F.nll_loss if logp else F.cross_entropy)(out, y, reduction="none").double()
        hit = (out.argmax(1) == y).double()
        G = len(ks)
        B = y.numel() // G
        add = torch.stack([per.view(G, B).sum(1), hit.view(G, B).sum(1),
                           torch.full((G,), float(B), dtype=torch.float64, device=out.device)], 1)
        if getattr(self, "_train", None) is None:
            self._train = torch.zeros(self.m, 3, dtype=torch.float64, device=out.device)
        self._train.index_add_(0, torch.as_tensor(list(ks), device=out.device), add)

    def train_stats(self) -> torch.Tensor:
        """[clients, 3] float64 on the CPU: per client the summed loss, correct predictions and
        samples recorded since ``reset_train_stats``."""
        t = getattr(self, "_train", None)
        return torch.zeros(self.m, 3, dtype=torch.float64) if t is None else t.cpu()

    # sizes of the models as sent (fp32 parameters and buffers)
    def client_bytes(self) -> int:
        return self._client_bytes

    def server_bytes(self) -> int:
        return self._server_bytes

    def aux_bytes(self) -> int:
        return self._aux_bytes

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin_round(self, t: int) -> None:
        pass

    # -- for the divergence checks (fsl_fast.faults) ---------------------------------------------
    def computes(self, side: str, k: int | None = None) -> bool:
        """Whether this process computes ``side`` ("client" or "server") for client k (None: the
        shared/global models). Always true in process; the distributed wrapper narrows it."""
        return True

    def batched_view(self, tensors):
        """The one tensor whose rows are ``tensors`` (a list this engine returned for all of its
        clients in one batched computation), or None."""
        return None

    def state_tensors(self, part: str, k: int | None = None) -> list:
        """The float tensors (parameters and buffers) of model ``part`` ("client", "server",
        "aux") of client k; k None: the global client, the shared or global server."""
        raise NotImplementedError

    # -- flat model exchange (the distributed runtime's FedAvg and auxiliary downlink) ------------
    # A model travels as its fsl_fast.flat layout: floating state as float32 [P], integer buffers
    # (BatchNorm's num_batches_tracked) as int64 [Q], the same layout in every process running
    # the same engine. ``kind``: "client", "server" (per-client copies) or "aux".
    def export_model(self, kind: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client k's ``kind`` model as (float32 [P], int64 [Q]) (new tensors or views)."""
        raise NotImplementedError

    def import_model(self, kind: str, k: int, f: torch.Tensor, i: torch.Tensor) -> None:
        """Write (f, i) into client k's ``kind`` model."""
        raise NotImplementedError

    def import_model_all(self, kind: str, f: torch.Tensor, i: torch.Tensor) -> None:
        """Write (f, i) into every client's ``kind`` model and the averaged one (after FedAvg)."""
        raise NotImplementedError

    def executor_record(self) -> dict:
        """{part: how it is computed} for results.json; the reference engine computes every part
        with plain torch modules and autograd."""
        return {"engine": "reference"}

    def set_hyperparameters(self, lr: float, weight_decay: float, aux_lr: float) -> None:
        """Apply learning rates / weight decay after a checkpoint load (``--resume --lr ...``)."""
        raise NotImplementedError

    # The operations (see ReferenceEngine for their exact semantics).
    def client_forward(self, ks, xs): raise NotImplementedError
    def client_backward(self, ks, zs, grads): raise NotImplementedError
    def server_step(self, k, z, y, want_grad=False): raise NotImplementedError
    def aux_estimate(self, ks, zs, ys): raise NotImplementedError
    def aux_local_step(self, ks, zs, ys): raise NotImplementedError
    def full_step(self, ks, xs, ys): raise NotImplementedError
    def align(self, ks, data): raise NotImplementedError
    def aggregate(self, weights, clients=True, aux=False, servers=False): raise NotImplementedError
    # clients ks back to the models of the last aggregation (a round whose participants all dropped)
    def restore(self, ks, clients=True, aux=False, servers=False): raise NotImplementedError
    def eval_models(self): raise NotImplementedError
    def aux_module(self, k): raise NotImplementedError
    def state_dict(self): raise NotImplementedError
    def load_state_dict(self, sd): raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
        """Test accuracy and mean loss of server(client_avg(x)) over the whole test set."""
        client, server = self.eval_models()
        client.eval()
        server.eval()
        correct, loss_sum = 0, 0.0
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(self.device)
            yb = y[i:i + batch_size].to(self.device)
            with self.compute():
                out = server(wide(client(xb)))
            out = wide(out)
            loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
        client.train()
        server.train()
        n = x.shape[0]
        return correct / n, loss_sum / n


def estimate_quality(engine, ks, data) -> list[dict]:
    """For each client k in ``ks`` with buffer (Z, Y): cosine between its auxiliary's gradient
    estimate d CE_mean(aux_k(Z), Y)/dZ and the true cut-layer gradient d CE_mean(s(Z), Y)/dZ of the
    current server, and the norm ratio |estimate| / |true|. Both in the engine's precision context,
    both models in train mode (as training uses them), their BatchNorm statistics left untouched;
    no parameter gradient is touched."""
    server = engine.eval_models()[1]
    targets = buffer_targets(server, data, engine.compute)
    out = []
    for k, (Z, Y), T in zip(ks, data, targets):
        g, T = _aux_estimate(engine, k, Z, Y).double().flatten(), T.double().flatten()
        tn, gn = float(T.norm()), float(g.norm())
        cos = float(g @ T) / (gn * tn) if gn > 0 and tn > 0 else float("nan")
        out.append({"client": int(k), "cosine": cos, "norm_ratio": gn / tn if tn > 0 else float("nan")})
    return out


def _aux_estimate(engine, k, Z, Y) -> torch.Tensor:
    aux = engine.aux_module(k)
    Zr = Z.detach().requires_grad_(True)
    with preserved_buffers(aux):
        (g,) = torch.autograd.grad(engine.ce_loss(aux, Zr, Y), Zr)
    return g


def estimate_norms(engine, ks, data) -> list[float]:
    """|d CE_mean(aux_k(Z), Y)/dZ| on each client's buffer (Z, Y) (no server pass)."""
    return [float(_aux_estimate(engine, k, Z, Y).double().norm()) for k, (Z, Y) in zip(ks, data)]


def buffer_targets(server, data, compute=contextlib.nullcontext) -> list:
    """True cut-layer gradients d CE_mean(s(Z), Y)/dZ of each buffer (Z, Y) in ``data`` with the
    current server, in train mode (as the authors), its BatchNorm running stats left untouched.
    ``compute``: the engine's precision context (the targets are fp32 either way)."""
    out = []
    with preserved_buffers(server):
        for Z, Y in data:
            Zr = Z.detach().requires_grad_(True)
            (T,) = torch.autograd.grad(cross_entropy(compute, server, Zr, Y), Zr)
            out.append(T)
    return out


def align_seed(seed: int, k: int) -> int:
    return (seed * 7_919 + 1_000 + k) % (2**63 - 1)
