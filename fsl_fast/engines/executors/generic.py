"""Generic executors: any torch modules, through autograd. The last candidate of every part, so
a model the specialised executors do not recognise (a user's ``--model package.module:factory``)
always runs; they are also what the specialised ones fall back to for a call whose shapes they do
not take (clients' batches of different sizes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fsl_fast.engines.base import wide
from fsl_fast.engines.executors.base import Executor


class LoopClients(Executor):
    part, name = "client", "loop"

    @classmethod
    def matches(cls, eng):
        return True, "any client network: one client after another over its flat views, autograd"

    def forward(self, ks, xs):
        eng = self.eng
        with eng.compute():
            zs = [eng.clients.mods[k](x) for k, x in zip(ks, xs)]
        return [wide(z) for z in zs]  # the wire carries fp32 smashed data in any precision

    def backward(self, ks, zs, grads, full=None):
        for z, g in zip(zs, grads):
            z.backward(g)


class BatchedClients(Executor):
    """Base of the client executors that run all active clients as one autograd computation
    over ``leaf`` (the flat buffer as a leaf tensor): they keep the [K, ...] output of the last
    forward, backpropagate into the leaf and copy its gradient rows into the flat gradient
    buffer; calls whose clients' batches differ in shape run the loop executor."""

    def __init__(self, eng):
        super().__init__(eng)
        self.leaf = None
        self.out = None  # (ks, [K, ...] output, its rows as a list) of the last forward
        self.loop = LoopClients(eng)

    def _keep(self, ks, z):
        self.out = (ks, z, list(z.unbind(0)))
        return self.out[2]

    def batched(self, tensors):
        return self.out[1] if self.out is not None and tensors is self.out[2] else None

    def leaf_grads_to_buffer(self, ks):
        leaf_grads_to_buffer(self.eng, self.leaf, ks)

    def backward(self, ks, zs, grads, full=None):
        if not self.pending(ks):
            return self.loop.backward(ks, zs, grads)
        full = torch.stack(grads) if full is None else full
        self.leaf.grad = None
        self.out[1].backward(full)
        self.out = None
        self.leaf_grads_to_buffer(ks)


class VmapClients(BatchedClients):
    """All active clients' forward/backward as one vmapped computation over their flat rows
    (``torch.func.functional_call`` on a [K, ...] view per parameter)."""

    part, name = "client", "vmap"

    @classmethod
    def matches(cls, eng):
        if eng.batching != "vmap":
            return False, (f"client batching is {eng.batching!r} (vmap is the default on CUDA; on this "
                           f"CPU grouped torch convolutions measured slower than the loop)")
        if eng.client_has_bn:
            return False, "the client has BatchNorm (per-client statistics under vmap are not supported)"
        return True, "client batching vmap, no BatchNorm: one vmapped forward/backward for all clients"

    def __init__(self, eng):
        super().__init__(eng)
        from torch.func import functional_call

        base = eng.plain_client
        self.fn = lambda p, x: functional_call(base, p, (x,))

    def forward(self, ks, xs):
        from fsl_fast.engines.executors.base import uniform

        self.out = None
        if not uniform(xs):
            return self.loop.forward(ks, xs)
        eng = self.eng
        flat = eng.clients.flat
        if self.leaf is None:
            self.leaf = flat.buffer.detach().requires_grad_(True)
        idx = torch.as_tensor(ks, device=self.leaf.device)
        rows = self.leaf if len(ks) == eng.m else self.leaf.index_select(0, idx)
        params = {e.name: rows[:, e.offset:e.offset + e.numel].view(len(ks), *e.shape)
                  for e in flat.layout.entries}
        with eng.compute():
            z = torch.func.vmap(self.fn)(params, torch.stack(xs))
        return self._keep(ks, wide(z))


def leaf_grads_to_buffer(eng, leaf, ks):
    """Rows ``ks`` of a batched client leaf's gradient into the clients' flat gradient buffer."""
    g, gb = leaf.grad, eng.clients.flat.grad_buffer
    if len(ks) == eng.m:
        gb.copy_(g)
    else:
        idx = torch.as_tensor(ks, device=gb.device)
        gb.index_copy_(0, idx, g.index_select(0, idx))


class AutogradServer(Executor):
    part, name = "server", "autograd"

    @classmethod
    def matches(cls, eng):
        return True, "any server network: autograd, then its optimizer step"

    def step(self, k, z, y, want_grad=False):
        eng = self.eng
        zr = z.detach().requires_grad_(want_grad)
        if eng.servers is not None:
            server = eng.servers.mods[k]
            eng.servers.zero_grad([k])
        elif eng.server_stack is not None:
            server = eng.server_global
            eng.server_stack.zero_grad([0])
        else:
            server = eng.server_global
            eng.server_opt.zero_grad(set_to_none=True)
        eng.ce_loss(server, zr, y, record=[k]).backward()
        eng.server_optimizer_step(k)
        return zr.grad if want_grad else None


class AutogradAux(Executor):
    part, name = "aux", "autograd"

    @classmethod
    def matches(cls, eng):
        return True, "any auxiliary network: autograd per client"

    def estimate(self, ks, zs, ys):
        eng = self.eng
        out = []
        for k, z, y in zip(ks, zs, ys):
            zd = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(eng.ce_loss(eng.aux.mods[k], zd, y), zd)
            out.append(g)
        return out

    def local_step(self, ks, zs, ys):
        eng = self.eng
        out = []
        for k, z, y in zip(ks, zs, ys):
            zd = z.detach().requires_grad_(True)
            eng.ce_loss(eng.aux.mods[k], zd, y).backward()
            out.append(zd.grad)
        eng.aux.opt.step(ks)
        return out


class DoubleBackwardAlign(Executor):
    """Alignment as the reference engine computes it: per client and alignment batch, the
    estimate's gradient with create_graph, then the MSE to the targets backpropagated through it."""

    part, name = "alignment", "double_backward"

    @classmethod
    def matches(cls, eng):
        return True, "any auxiliary network: double backward through autograd, one client after another"

    def align(self, ks, data, targets):
        for k, (Z, Y), T in zip(ks, data, targets):
            self.align_one(k, Z, Y, T)

    def align_one(self, k, Z, Y, T):
        eng, cfg = self.eng, self.eng.cfg
        aux = eng.aux.mods[k]
        n = Z.shape[0]
        for _ in range(cfg.align_epochs):
            perm = torch.randperm(n, generator=eng.align_gens[k]).to(Z.device)
            for i in range(0, n, cfg.align_batch_size):
                idx = perm[i:i + cfg.align_batch_size]
                eng.aux.zero_grad([k])
                self.batch_grads(aux, Z[idx], Y[idx], T[idx], n)
                eng.aux.opt.step([k])

    def batch_grads(self, aux, Zb, Yb, Tb, n):
        """Gradients of one alignment batch into ``aux``'s .grad (views of the flat buffer);
        ``n``: the buffer's rows (the estimate carries 1/n like the targets, as the reference)."""
        Zb = Zb.detach().requires_grad_(True)
        est = self.eng.ce_loss(aux, Zb, Yb, reduction="sum") / n
        (g,) = torch.autograd.grad(est, Zb, create_graph=True)
        F.mse_loss(g, Tb, reduction="sum").backward()


class LoopFull(Executor):
    part, name = "full", "loop"

    @classmethod
    def matches(cls, eng):
        return True, "any model: client then server copy, autograd, one client after another"

    def step(self, ks, xs, ys):
        eng = self.eng
        eng.clients.zero_grad(ks)
        eng.servers.zero_grad(ks)
        for k, x, y in zip(ks, xs, ys):
            eng.ce_loss(lambda v: eng.servers.mods[k](wide(eng.clients.mods[k](v))), x, y,
                        record=[k]).backward()
