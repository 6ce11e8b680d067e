"""Reference engine: one nn.Module and one optimizer per client, autograd exactly as the authors'
code uses it (double backward for alignment, per-key state_dict averaging). Slow and obvious: the
ground truth that the fused engine and the distributed runtime are checked against."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fsl_fast.engines.base import Engine, align_seed, buffer_targets, wide
from fsl_fast.flat import FlatLayout
from fsl_fast.ops.fedavg import fedavg_state_dicts as average_state_dicts
from fsl_fast.optim import torch_optimizer


class ReferenceEngine(Engine):
    def __init__(self, cfg, split, num_clients, algorithm_cls, device):
        super().__init__(cfg, split, num_clients, algorithm_cls, device)
        dev = self.device
        lr, wd = cfg.lr, cfg.weight_decay

        def _adam(module, lr, wd):  # the client/server optimizer (--optimizer; Adam by default)
            return torch_optimizer(module.parameters(), cfg, lr, wd)

        self.client_global = split.client.to(dev)
        self.clients = [copy.deepcopy(self.client_global) for _ in range(num_clients)]
        self.client_opts = [_adam(c, lr, wd) for c in self.clients]
        self.server_global = split.server.to(dev)
        if algorithm_cls.server_copies:
            self.servers = [copy.deepcopy(self.server_global) for _ in range(num_clients)]
            self.server_opts = [_adam(s, lr, wd) for s in self.servers]
        else:
            self.servers = [self.server_global]
            self.server_opts = [_adam(self.server_global, lr, wd)]
        self.auxes, self.aux_opts, self.align_gens = [], [], []
        if algorithm_cls.uses_aux:
            aux = split.aux.to(dev)
            self.auxes = [copy.deepcopy(aux) for _ in range(num_clients)]
            self.aux_opts = [torch.optim.Adam(a.parameters(), lr=cfg.aux_lr) for a in self.auxes]
            self.align_gens = [torch.Generator().manual_seed(align_seed(cfg.seed, k))
                               for k in range(num_clients)]
        # the last averaged auxiliary (CSE-FSL averages them), for restore()
        self.aux_global = {k: v.clone() for k, v in self.auxes[0].state_dict().items()} if self.auxes else {}
        self._layouts: dict = {}  # kind -> FlatLayout (export_model / import_model)

    def _server(self, k):
        return (self.servers[k], self.server_opts[k]) if len(self.servers) > 1 else (self.servers[0], self.server_opts[0])

    # -- client side ---------------------------------------------------------------------------
    def client_forward(self, ks, xs):
        with self.compute():
            zs = [self.clients[k](x) for k, x in zip(ks, xs)]
        return [wide(z) for z in zs]  # the wire carries fp32 smashed data in any precision

    def client_backward(self, ks, zs, grads):
        for k, z, g in zip(ks, zs, grads):
            opt = self.client_opts[k]
            opt.zero_grad(set_to_none=True)
            z.backward(g)
            opt.step()

    def aux_estimate(self, ks, zs, ys):
        out = []
        for k, z, y in zip(ks, zs, ys):
            zd = z.detach().requires_grad_(True)
            loss = self.ce_loss(self.auxes[k], zd, y)
            (g,) = torch.autograd.grad(loss, zd)
            out.append(g)
        return out

    def aux_local_step(self, ks, zs, ys):
        out = []
        for k, z, y in zip(ks, zs, ys):
            zd = z.detach().requires_grad_(True)
            opt = self.aux_opts[k]
            opt.zero_grad(set_to_none=True)
            self.ce_loss(self.auxes[k], zd, y).backward()
            opt.step()
            out.append(zd.grad)
        return out

    def full_step(self, ks, xs, ys):
        for k, x, y in zip(ks, xs, ys):
            server, sopt = self._server(k)
            copt = self.client_opts[k]
            copt.zero_grad(set_to_none=True)
            sopt.zero_grad(set_to_none=True)
            self.ce_loss(lambda v: server(wide(self.clients[k](v))), x, y, record=[k]).backward()
            copt.step()
            sopt.step()

    # -- server side ---------------------------------------------------------------------------
    def server_step(self, k, z, y, want_grad=False):
        server, opt = self._server(k)
        zr = z.detach().requires_grad_(want_grad)
        opt.zero_grad(set_to_none=True)
        self.ce_loss(server, zr, y, record=[k]).backward()
        opt.step()
        return zr.grad if want_grad else None

    def align(self, ks, data):
        cfg = self.cfg
        for k, (Z, Y) in zip(ks, data):
            (T,) = buffer_targets(self.servers[0], [(Z, Y)], self.compute)
            aux, opt, gen = self.auxes[k], self.aux_opts[k], self.align_gens[k]
            n = Z.shape[0]
            for _ in range(cfg.align_epochs):
                perm = torch.randperm(n, generator=gen).to(Z.device)
                for i in range(0, n, cfg.align_batch_size):
                    idx = perm[i:i + cfg.align_batch_size]
                    Zb = Z[idx].detach().requires_grad_(True)
                    # Both the prediction and the target carry 1/n (n = buffer rows): with one
                    # alignment batch per pass (the paper's 1000/1000) this is the authors' loss.
                    est = self.ce_loss(aux, Zb, Y[idx], reduction="sum") / n
                    (g,) = torch.autograd.grad(est, Zb, create_graph=True)
                    loss = F.mse_loss(g, T[idx], reduction="sum")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

    # -- aggregation and evaluation ------------------------------------------------------------
    def aggregate(self, weights, clients=True, aux=False, servers=False):
        with torch.no_grad():
            if clients:
                avg = average_state_dicts([c.state_dict() for c in self.clients], weights)
                self.client_global.load_state_dict(avg)
                for c in self.clients:
                    c.load_state_dict(avg)
            if servers and len(self.servers) > 1:
                avg = average_state_dicts([s.state_dict() for s in self.servers], weights)
                self.server_global.load_state_dict(avg)
                for s in self.servers:
                    s.load_state_dict(avg)
            if aux:
                avg = average_state_dicts([a.state_dict() for a in self.auxes], weights)
                for a in self.auxes:
                    a.load_state_dict(avg)
                self.aux_global = {k: v.clone() for k, v in avg.items()}

    def restore(self, ks, clients=True, aux=False, servers=False):
        with torch.no_grad():
            for k in ks:
                if clients:
                    self.clients[k].load_state_dict(self.client_global.state_dict())
                if servers and len(self.servers) > 1:
                    self.servers[k].load_state_dict(self.server_global.state_dict())
                if aux:
                    self.auxes[k].load_state_dict(self.aux_global)

    def eval_models(self):
        return self.client_global, self.server_global

    def aux_module(self, k):
        return self.auxes[k]

    # -- divergence checks, hyperparameters -----------------------------------------------------
    def _copies(self, kind):
        """(per-client modules, averaged modules) of model ``kind``."""
        return {"client": (self.clients, [self.client_global]),
                "server": (self.servers, [self.server_global] if self.servers[0] is not self.server_global else []),
                "aux": (self.auxes, [])}[kind]

    def _layout(self, kind):
        if kind not in self._layouts:
            self._layouts[kind] = FlatLayout.from_module(self._copies(kind)[0][0])
        return self._layouts[kind]

    def export_model(self, kind, k):
        copies, _ = self._copies(kind)
        mod = copies[k if len(copies) > 1 else 0]
        lay = self._layout(kind)
        return lay.flatten(mod), lay.flatten_int(mod)

    def import_model(self, kind, k, f, i):
        lay = self._layout(kind)
        mod = self._copies(kind)[0][k]
        lay.load_flat(mod, f)
        lay.load_int(mod, i)

    def import_model_all(self, kind, f, i):
        lay = self._layout(kind)
        copies, averaged = self._copies(kind)
        for mod in list(copies) + averaged:
            lay.load_flat(mod, f)
            lay.load_int(mod, i)

    def state_tensors(self, part, k=None):
        if part == "client":
            m = self.client_global if k is None else self.clients[k]
        elif part == "server":
            m = self.server_global if k is None else self._server(k)[0]
        else:
            m = self.auxes[k]
        return [t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]

    def set_hyperparameters(self, lr, weight_decay, aux_lr):
        for opt in self.client_opts + self.server_opts:
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = lr, weight_decay
        for opt in self.aux_opts:
            for g in opt.param_groups:
                g["lr"] = aux_lr

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        return {
            "client_global": self.client_global.state_dict(),
            "server_global": self.server_global.state_dict(),
            "clients": [c.state_dict() for c in self.clients],
            "client_opts": [o.state_dict() for o in self.client_opts],
            "servers": [s.state_dict() for s in self.servers],
            "server_opts": [o.state_dict() for o in self.server_opts],
            "auxes": [a.state_dict() for a in self.auxes],
            "aux_opts": [o.state_dict() for o in self.aux_opts],
            "align_gens": [g.get_state() for g in self.align_gens],
            "aux_global": self.aux_global,
        }

    def load_state_dict(self, sd):
        self.client_global.load_state_dict(sd["client_global"])
        self.server_global.load_state_dict(sd["server_global"])
        for obj, key in ((self.clients, "clients"), (self.client_opts, "client_opts"),
                         (self.servers, "servers"), (self.server_opts, "server_opts"),
                         (self.auxes, "auxes"), (self.aux_opts, "aux_opts")):
            for o, s in zip(obj, sd[key]):
                o.load_state_dict(s)
        for g, s in zip(self.align_gens, sd["align_gens"]):
            g.set_state(s)
        if self.auxes:  # (checkpoints before partial participation: every aux row was the average)
            src = sd.get("aux_global") or sd["auxes"][0]
            self.aux_global = {k: v.clone() for k, v in src.items()}

    def load_models(self, client, server, auxes=None):
        """Warm start (see FusedEngine.load_models)."""
        with torch.no_grad():
            for m in [self.client_global] + self.clients:
                m.load_state_dict(client)
            for m in {id(s): s for s in [self.server_global] + self.servers}.values():
                m.load_state_dict(server)
            if auxes is not None and self.auxes:
                for a, sd in zip(self.auxes, auxes):
                    a.load_state_dict(sd)
                self.aux_global = {k: v.clone() for k, v in self.auxes[0].state_dict().items()}

    # parameters of every model, for parity tests
    def named_state(self):
        out = {"client": self.client_global.state_dict(), "server": self.server_global.state_dict()}
        for k, a in enumerate(self.auxes):
            out[f"aux{k}"] = a.state_dict()
        return out
