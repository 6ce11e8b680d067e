"""Fused engine (``--fused``): the same semantics as the reference engine, computed fast.

State: client models (and server copies where an algorithm keeps one per client, a single server
unless it has BatchNorm in FSL_FAST_BITWISE mode, and the auxiliaries) live in flat [K, P]
buffers (fsl_fast.flat.FlatClients); each client's module is a set of views into its row,
gradients land in a flat [K, P] gradient buffer, one FlatAdam step updates every participating
client, and FedAvg is one flat weighted reduction with broadcast (fsl_fast.ops.fedavg).

Computation is done by *executors* (fsl_fast.engines.executors), one per part: the clients'
forward/backward, the server step, the auxiliaries' estimate, alignment and FedAvg's whole-model
step. For each part the engine takes the first executor whose rule matches the model, algorithm,
device and precision, and records the choice (``executors``: results.json and
``python -m fsl_fast.env --model NAME``). Every part has a generic autograd executor last, so any
network of torch modules runs.

Before that, client networks get fused layers (fsl_fast.ops.layers: conv + ReLU + max-pool,
max-pool + ReLU and LocalResponseNorm kernels), and the convolutions of tiny maps an exact
matrix-product form (fsl_fast.rewrites; off in FSL_FAST_BITWISE mode).

The server's refreshed targets for all clients come from one forward when the server has no
BatchNorm (per-sample gradients do not depend on the batch then), else one forward per client.
"""
from __future__ import annotations

import copy
import os

import torch

from fsl_fast.engines.base import Engine, align_seed, buffer_targets
from fsl_fast.engines.executors import CANDIDATES, choose
from fsl_fast.engines.executors.base import Stack, has_batchnorm
from fsl_fast.optim import torch_optimizer
from fsl_fast.rewrites import enable_small_map_convs


def _fuse(module):
    from fsl_fast.ops.layers import fuse_client_layers

    return fuse_client_layers(module)


def parts_of(algorithm_cls) -> tuple[str, ...]:
    """The executor parts an algorithm uses."""
    if algorithm_cls.whole_model:
        return ("client", "full")
    return (("client", "server") + (("aux",) if algorithm_cls.uses_aux else ())
            + (("alignment",) if algorithm_cls.aligns else ()))


class FusedEngine(Engine):
    def __init__(self, cfg, split, num_clients, algorithm_cls, device):
        super().__init__(cfg, split, num_clients, algorithm_cls, device)
        dev = self.device
        lr, wd, K = cfg.lr, cfg.weight_decay, num_clients
        # (the C++ layer kernels are fp32 in any precision; under bf16 they widen their input)
        client = _fuse(split.client).to(dev)
        # FSL_FAST_BITWISE=1: keep the results bit-identical to the reference engine wherever the
        # fused kernels allow it (no small-map rewrite; a BatchNorm server keeps torch's Adam);
        # the parity tests use it to compare elementwise.
        self.bitwise = os.environ.get("FSL_FAST_BITWISE", "0") == "1"
        # exact rewrite of the torch convolutions left after fusing: those of 1x1 / 2x2 maps run
        # as one matrix product (fsl_fast.rewrites; other maps keep the convolution at run time)
        self.small_map_convs = 0
        if not self.bitwise:
            self.small_map_convs = sum(enable_small_map_convs(m) for m in (client, split.server, split.aux))
        self.clients = Stack(client, K, dev, lr, wd, cfg)
        # the vmap executor runs the unfused modules (the fused-layer autograd Functions are CPU
        # kernels without vmap rules; on CUDA the layer ops are torch's own anyway). Same keys.
        self.plain_client = copy.deepcopy(split.client).to(dev)
        mode = getattr(cfg, "client_batching", "auto")
        if mode == "auto":
            mode = "vmap" if dev.type == "cuda" else "loop"
        self.batching = mode
        self.client_has_bn = has_batchnorm(self.clients.template)
        self.server_global = split.server.to(dev)
        self.servers = None
        if algorithm_cls.server_copies:
            self.servers = Stack(self.server_global, K, dev, lr, wd, cfg)
            self.server_global = self.servers.global_mod
        self.server_has_bn = has_batchnorm(self.server_global)
        self.server_stack = None
        if self.servers is None and not (self.server_has_bn and self.bitwise):
            # one server: flat too, one fused Adam pass per step (0.16 ms instead of torch's
            # 0.7 ms for the cnn server's 0.2M parameters; resnet18's 10.5M-parameter server:
            # torch's Adam allocated ~15 ms of temporaries per step). In FSL_FAST_BITWISE mode a
            # BatchNorm server keeps torch's Adam, bit-identical to the reference engine's: there
            # a last-bit difference is amplified through BatchNorm and Adam into visible drift
            # within one round (tests/test_fused_parity.py compares elementwise).
            self.server_stack = Stack(self.server_global, 1, dev, lr, wd, cfg)
            self.server_global = self.server_stack.mods[0]
        elif self.servers is None:
            self.server_opt = torch_optimizer(self.server_global.parameters(), cfg, lr, wd)
        self.aux = None
        if algorithm_cls.uses_aux:
            self.aux = Stack(split.aux.to(dev), K, dev, cfg.aux_lr, 0.0)
            self.align_gens = [torch.Generator().manual_seed(align_seed(cfg.seed, k)) for k in range(K)]
        # executors, in dependency order (the full-step ones build on the client executor)
        self.executors = {}
        self.executor_candidates = {}
        self.client_exec = self.server_exec = self.aux_exec = self.align_exec = self.full_exec = None
        for part in ("client", "server", "aux", "alignment", "full"):
            if part not in parts_of(algorithm_cls):
                continue
            ex, why, tried = choose(part, CANDIDATES[part], self)
            setattr(self, {"alignment": "align_exec"}.get(part, f"{part}_exec"), ex)
            self.executors[part] = {"executor": ex.name, "why": why}
            self.executor_candidates[part] = tried

    def server_flat(self):
        """The flat stack holding the server(s), or None (a BatchNorm server in FSL_FAST_BITWISE)."""
        return self.servers if self.servers is not None else self.server_stack

    def server_optimizer_step(self, k):
        if self.servers is not None:
            self.servers.opt.step([k])
        elif self.server_stack is not None:
            self.server_stack.opt.step([0])
        else:
            self.server_opt.step()

    def executor_record(self) -> dict:
        """{part: executor name} of this engine (results.json's ``executors``)."""
        return {"engine": "fused", **{part: d["executor"] for part, d in self.executors.items()}}

    # -- the operations, by executor -------------------------------------------------------------
    def client_forward(self, ks, xs):
        self.clients.zero_grad(ks)
        return self.client_exec.forward(ks, xs)

    def client_backward(self, ks, zs, grads):
        # the estimate's own [K, ...] tensor when these are its rows (no re-stack)
        full = self.aux_exec.batched(grads) if self.aux_exec is not None else None
        if self.aux_exec is not None and hasattr(self.aux_exec, "forget"):
            self.aux_exec.forget()
        self.client_exec.backward(ks, zs, grads, full)
        self.clients.opt.step(ks)

    def server_step(self, k, z, y, want_grad=False):
        return self.server_exec.step(k, z, y, want_grad)

    def aux_estimate(self, ks, zs, ys):
        return self.aux_exec.estimate(ks, zs, ys)

    def aux_local_step(self, ks, zs, ys):
        self.aux.zero_grad(ks)
        return self.aux_exec.local_step(ks, zs, ys)

    def full_step(self, ks, xs, ys):
        self.full_exec.step(ks, xs, ys)  # writes (or zeroes and accumulates) the active rows' gradients
        self.clients.opt.step(ks)
        self.servers.opt.step(ks)

    def _targets(self, data):
        """True gradients d CE_mean(s(Z_k), Y_k)/dZ_k of each client's buffer, server in train
        mode, its BatchNorm running statistics left untouched."""
        server = self.server_global
        if not self.server_has_bn and len(data) > 1:
            Z = torch.cat([d[0] for d in data]).detach().requires_grad_(True)
            Y = torch.cat([d[1] for d in data])
            # per-sample gradients are independent of the batch without BatchNorm: one forward,
            # each client's rows scaled by 1/n_k (its own batch mean)
            scale = torch.cat([torch.full((d[0].shape[0],), 1.0 / d[0].shape[0], device=Z.device)
                               for d in data])
            loss = (self.ce_loss(server, Z, Y, reduction="none") * scale).sum()
            (T,) = torch.autograd.grad(loss, Z)
            return list(T.split([d[0].shape[0] for d in data]))
        return buffer_targets(server, data, self.compute)

    def align(self, ks, data):
        self.align_exec.align(ks, data, self._targets(data))

    # -- aggregation and evaluation ------------------------------------------------------------
    def aggregate(self, weights, clients=True, aux=False, servers=False):
        with torch.no_grad():
            if clients:
                self.clients.average(weights)
            if servers and self.servers is not None:
                self.servers.average(weights)
            if aux:
                self.aux.average(weights)

    def restore(self, ks, clients=True, aux=False, servers=False):
        with torch.no_grad():
            if clients:
                self.clients.restore(ks)
            if servers and self.servers is not None:
                self.servers.restore(ks)
            if aux:
                self.aux.restore(ks)

    def eval_models(self):
        return self.clients.global_mod, self.server_global

    def aux_module(self, k):
        return self.aux.mods[k]

    # -- divergence checks, hyperparameters -----------------------------------------------------
    def batched_view(self, tensors):
        for ex in (self.client_exec, self.aux_exec):
            t = ex.batched(tensors) if ex is not None else None
            if t is not None:
                return t
        return None

    def _stack(self, kind):
        st = {"client": self.clients, "server": self.servers, "aux": self.aux}[kind]
        if st is None:
            raise ValueError(f"the fused engine keeps no per-client {kind} models here")
        return st

    def export_model(self, kind, k):
        fc = self._stack(kind).flat
        return fc.buffer[k].float(), fc.int_buffers[k]

    @torch.no_grad()
    def import_model(self, kind, k, f, i):
        fc = self._stack(kind).flat
        fc.buffer[k].copy_(f)
        fc.int_buffers[k].copy_(i)

    @torch.no_grad()
    def import_model_all(self, kind, f, i):
        st = self._stack(kind)
        fc = st.flat
        fc.buffer.copy_(f.expand_as(fc.buffer))
        fc.int_buffers.copy_(i.expand_as(fc.int_buffers))
        fc.global_buffer.copy_(f)
        fc.global_int_buffer.copy_(i)
        fc.load_into(st.global_mod)

    def state_tensors(self, part, k=None):
        if part == "client":
            return [self.clients.flat.global_buffer if k is None else self.clients.flat.buffer[k]]
        if part == "aux":
            return [self.aux.flat.buffer[k]]
        if self.servers is not None:
            return [self.servers.flat.global_buffer if k is None else self.servers.flat.buffer[k]]
        if self.server_stack is not None:
            return [self.server_stack.flat.buffer[0]]
        m = self.server_global
        return [t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]

    def set_hyperparameters(self, lr, weight_decay, aux_lr):
        for st in (self.clients, self.servers, self.server_stack):
            if st is not None:
                st.opt.lr, st.opt.wd = lr, weight_decay
        if self.servers is None and self.server_stack is None:
            for g in self.server_opt.param_groups:
                g["lr"], g["weight_decay"] = lr, weight_decay
        if self.aux is not None:
            self.aux.opt.lr = aux_lr

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        sd = {"clients": self.clients.state_dict()}
        if self.servers is not None:
            sd["servers"] = self.servers.state_dict()
        elif self.server_stack is not None:
            sd["server_flat"] = self.server_stack.state_dict()
        else:
            sd["server"] = self.server_global.state_dict()
            sd["server_opt"] = self.server_opt.state_dict()
        if self.aux is not None:
            sd["aux"] = self.aux.state_dict()
            sd["align_gens"] = [g.get_state() for g in self.align_gens]
        return sd

    def load_state_dict(self, sd):
        with torch.no_grad():
            self.clients.load_state_dict(sd["clients"])
            if self.servers is not None:
                self.servers.load_state_dict(sd["servers"])
            elif self.server_stack is not None:
                if "server_flat" not in sd:
                    from fsl_fast.config import ConfigError

                    raise ConfigError("--resume: this checkpoint keeps the server with torch's Adam "
                                      "(written in FSL_FAST_BITWISE mode); resume with FSL_FAST_BITWISE=1")
                self.server_stack.load_state_dict(sd["server_flat"])
            else:
                if "server" not in sd:
                    from fsl_fast.config import ConfigError

                    raise ConfigError("--resume: this checkpoint keeps the server flat (written without "
                                      "FSL_FAST_BITWISE); resume without FSL_FAST_BITWISE=1")
                self.server_global.load_state_dict(sd["server"])
                self.server_opt.load_state_dict(sd["server_opt"])
            if self.aux is not None:
                self.aux.load_state_dict(sd["aux"])
                for g, s in zip(self.align_gens, sd["align_gens"]):
                    g.set_state(s)

    def load_models(self, client, server, auxes=None):
        """Warm start: every client and the global client take ``client``, the server (every
        copy) ``server``, auxiliary k ``auxes[k]`` (None: the auxiliaries stay as built)."""
        with torch.no_grad():
            self.clients.load_models(client)
            st = self.server_flat()
            if st is not None:
                st.load_models(server)
            else:
                self.server_global.load_state_dict(server)
            if auxes is not None and self.aux is not None:
                self.aux.load_models(list(auxes))

    def named_state(self):
        out = {"client": self.clients.global_mod.state_dict(), "server": self.server_global.state_dict()}
        if self.aux is not None:
            for k, a in enumerate(self.aux.mods):
                out[f"aux{k}"] = a.state_dict()
        return out
