"""Clients made only of the C++ conv blocks (conv + ReLU + max-pool, fsl_fast.ops.layers) and
parameter-free per-sample layers (the cnn): all active clients run in one C++ call per layer, the
kernel taking [G, ...] weights, one group per client. On the CPU this beats one client after
another; the grouped torch convolutions of the generic vmap executor did not (docs/PERF_NOTES.md).

- ``conv_blocks_taped``: conv blocks and flattens only. Forward and backward run without
  autograd: the forward keeps the blocks' saved tensors on a tape and the backward walks it in
  reverse, writing weight and bias gradients straight into the flat gradient buffer (the same
  kernels and sums as the autograd path, without the graph and the copies).
- ``conv_blocks``: with other parameter-free layers between the blocks, through autograd.

FedAvg's whole-model step on top of them (part ``full``): ``conv_blocks_mlp_taped`` (the taped
client, then the clients' Linear/ReLU server copies as batched GEMMs by hand) and
``conv_blocks_vmap_server`` (the grouped client, then the server copies vmapped)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsl_fast.engines.base import wide
from fsl_fast.engines.executors.base import Executor, uniform, write_rows
from fsl_fast.engines.executors.generic import BatchedClients, LoopFull
from fsl_fast.engines.executors.mlp_server import mlp_plan


def conv_block_plan(eng):
    """([(kind, what, pool args)], reason) for a client of fused conv blocks, else (None, reason)."""
    from fsl_fast.ops import resolve
    from fsl_fast.ops.layers import LRN, ConvPoolReLU, PoolReLU, conv_pool_relu_supported

    mod = eng.clients.template
    if eng.device.type != "cpu":
        return None, "not on the CPU (the grouped conv-block kernel is C++)"
    if eng.batching != "loop":
        return None, f"client batching is {eng.batching!r}"
    if eng.client_has_bn:
        return None, "the client has BatchNorm"
    if not isinstance(mod, nn.Sequential):
        return None, "the client is not an nn.Sequential"
    if resolve("conv_pool_relu", eng.device)[0] != "cpp":
        return None, "the C++ conv-block kernel is not the backend in use"
    lay = eng.clients.entries()
    steps = []
    for name, m in mod.named_children():
        if isinstance(m, ConvPoolReLU):
            if m.backend not in (None, "cpp") or not conv_pool_relu_supported(m.weight.shape[1], m.weight.shape[2]):
                return None, f"conv block {name!r} has a shape the C++ kernel does not take"
            steps.append(("conv", (lay[f"{name}.weight"], lay.get(f"{name}.bias")),
                          (m.kernel_size, m.stride, m.padding, m.channels_last_out)))
        elif isinstance(m, nn.Identity):
            continue
        elif isinstance(m, (nn.Flatten, PoolReLU, LRN, nn.ReLU)):
            steps.append(("layer", m, None))
        else:
            return None, f"layer {name!r} ({type(m).__name__}) is neither a fused conv block nor a per-sample layer"
    if not any(kind == "conv" for kind, _, _ in steps):
        return None, "the client has no fused conv block"
    return steps, ""


def _taped(steps) -> bool:
    return all(kind == "conv" or isinstance(what, nn.Flatten) for kind, what, _ in steps)


class GroupedConvBlocks(BatchedClients):
    part, name = "client", "conv_blocks"

    @classmethod
    def matches(cls, eng):
        steps, why = conv_block_plan(eng)
        if steps is None:
            return False, why
        return True, "fused C++ conv blocks: all active clients in one grouped call per layer, autograd"

    def __init__(self, eng):
        super().__init__(eng)
        self.steps, _ = conv_block_plan(eng)

    def forward_autograd(self, ks, xs):
        """[G, B, ...] output with a graph to ``self.leaf`` (the flat buffer as a leaf)."""
        from fsl_fast.ops.layers import conv_pool_relu_grouped

        eng = self.eng
        if self.leaf is None:
            self.leaf = eng.clients.flat.buffer.detach().requires_grad_(True)
        G, B = len(ks), xs[0].shape[0]
        rows = self.leaf if G == eng.m else self.leaf.index_select(0, torch.as_tensor(ks))
        h = torch.cat(xs)
        for kind, what, pool in self.steps:
            if kind == "conv":
                ew, eb = what
                w = rows[:, ew.offset:ew.offset + ew.numel].view(G, *ew.shape)
                b = None if eb is None else rows[:, eb.offset:eb.offset + eb.numel]
                h = conv_pool_relu_grouped(h, w, b, *pool)
            else:
                h = what(h)
        return h.view(G, B, *h.shape[1:])

    def forward(self, ks, xs):
        self.out = None
        if not uniform(xs):
            return self.loop.forward(ks, xs)
        return self._keep(ks, self.forward_autograd(ks, xs))


class TapedConvBlocks(GroupedConvBlocks):
    part, name = "client", "conv_blocks_taped"

    @classmethod
    def matches(cls, eng):
        steps, why = conv_block_plan(eng)
        if steps is None:
            return False, why
        if not _taped(steps):
            return False, "layers other than conv blocks and flattens between them (needs autograd)"
        return True, "fused C++ conv blocks and flattens: all active clients per layer, taped backward"

    def __init__(self, eng):
        super().__init__(eng)
        self.tape = None

    def forward_taped(self, ks, xs):
        from fsl_fast.ops.layers import conv_pool_relu_grouped_saving

        eng = self.eng
        buf = eng.clients.flat.buffer
        G, B = len(ks), xs[0].shape[0]
        rows = buf if G == eng.m else buf.index_select(0, torch.as_tensor(ks))
        h = torch.cat(xs)
        tape = []
        with torch.no_grad():
            for kind, what, pool in self.steps:
                if kind == "conv":
                    ew, eb = what
                    w = rows[:, ew.offset:ew.offset + ew.numel].contiguous().view(G, *ew.shape)
                    b = rows[:, eb.offset:eb.offset + eb.numel].contiguous() if eb is not None else None
                    h, saved = conv_pool_relu_grouped_saving(h, w, b, *pool)
                    tape.append(("conv", (ew, eb, saved)))
                else:  # nn.Flatten (the rule allows only that)
                    tape.append(("flatten", h.shape))
                    h = what(h)
        self.tape = (ks, tape)
        return h.view(G, B, *h.shape[1:])

    def backward_taped(self, gz):
        from fsl_fast.ops.layers import conv_pool_relu_grouped_backward

        ks, tape = self.tape
        self.tape = None
        G = len(ks)
        gbuf = self.eng.clients.flat.grad_buffer
        idx_rows = None if G == self.eng.m else torch.as_tensor(ks)
        gy = gz.reshape(-1, *gz.shape[2:])
        first = next(i for i, (kind, _) in enumerate(tape) if kind == "conv")
        for i in range(len(tape) - 1, -1, -1):
            kind, t = tape[i]
            if kind == "flatten":
                gy = gy.reshape(t)
                continue
            ew, eb, saved = t
            gx, gw, gb = conv_pool_relu_grouped_backward(gy, saved, need_input_grad=i > first)
            write_rows(gbuf, ew, idx_rows, gw)
            if eb is not None:
                write_rows(gbuf, eb, idx_rows, gb)
            gy = gx

    def forward(self, ks, xs):
        self.out = self.tape = None
        if not uniform(xs):
            return self.loop.forward(ks, xs)
        return self._keep(ks, self.forward_taped(ks, xs))

    def backward(self, ks, zs, grads, full=None):
        if not self.pending(ks):
            return self.loop.backward(ks, zs, grads)
        full = torch.stack(grads) if full is None else full
        self.out = None
        self.backward_taped(full)


class TapedMLPFull(Executor):
    """FedAvg's whole-model step without autograd (cnn): the taped grouped client, then the
    clients' Linear/ReLU server copies as batched GEMMs over their [G, out, in] weight views,
    each client's mean cross-entropy differentiated by the same aten ops as the ``mlp`` server
    (per row: reduction none with weight 1 / B), and the taped client backward."""

    part, name = "full", "conv_blocks_mlp_taped"

    @classmethod
    def matches(cls, eng):
        if not isinstance(eng.client_exec, TapedConvBlocks):
            return False, "the client executor is not conv_blocks_taped"
        if mlp_plan(eng.servers) is None:
            return False, "the server copies are not Linear/ReLU networks"
        return True, "taped conv-block clients + Linear/ReLU server copies as batched GEMMs, no autograd"

    def __init__(self, eng):
        super().__init__(eng)
        self.plan = mlp_plan(eng.servers)
        self.loop = LoopFull(eng)

    def step(self, ks, xs, ys):
        if not uniform(xs):
            return self.loop.step(ks, xs, ys)
        eng, cl = self.eng, self.eng.client_exec
        z = cl.forward_taped(ks, xs)  # [G, B, ...]
        G, B = z.shape[0], z.shape[1]
        st = eng.servers
        idx = None if G == eng.m else torch.as_tensor(ks)
        buf = st.flat.buffer if idx is None else st.flat.buffer.index_select(0, idx)

        def view(e):
            return buf[:, e.offset:e.offset + e.numel].view(G, *e.shape)

        acts, h = [], z.reshape(G, B, -1)
        for kind, ew, eb in self.plan:
            acts.append(h)
            if kind == "linear":
                wt = view(ew).transpose(1, 2)
                h = torch.baddbmm(view(eb).unsqueeze(1), h, wt) if eb is not None else torch.bmm(h, wt)
            else:
                h = torch.relu(h)
        logp = torch.log_softmax(h.reshape(G * B, -1), 1)
        y = torch.cat(ys)
        eng.record_train(ks, logp, y, logp=True)
        w = torch.full((G * B,), 1.0, dtype=logp.dtype).div_(B)
        total = torch.ones((), dtype=logp.dtype)
        g = torch.ops.aten.nll_loss_backward(w, logp, y, None, 0, -100, total)
        g = torch.ops.aten._log_softmax_backward_data(g, logp, 1, logp.dtype).view(G, B, -1)
        grads = st.flat.grad_buffer
        for i in range(len(self.plan) - 1, -1, -1):
            kind, ew, eb = self.plan[i]
            if kind == "relu":
                g = torch.ops.aten.threshold_backward(g, acts[i + 1], 0)
                continue
            write_rows(grads, ew, idx, torch.bmm(g.transpose(1, 2), acts[i]))
            if eb is not None:
                write_rows(grads, eb, idx, g.sum(1))
            g = torch.bmm(g, view(ew))
        cl.backward_taped(g.view(z.shape))


class GroupedVmapFull(Executor):
    """FedAvg's whole-model step of all active clients at once: the grouped conv-block clients,
    then the clients' server copies vmapped (batched GEMMs for Linear layers); the sum of the
    clients' mean losses gives each client exactly its own gradients."""

    part, name = "full", "conv_blocks_vmap_server"

    @classmethod
    def matches(cls, eng):
        if not isinstance(eng.client_exec, GroupedConvBlocks):
            return False, "the client executor is not a conv-block one"
        if eng.server_has_bn:
            return False, "the server has BatchNorm"
        return True, "grouped conv-block clients + server copies under vmap"

    def __init__(self, eng):
        super().__init__(eng)
        import copy

        from torch.func import functional_call

        base = copy.deepcopy(eng.servers.template)
        self.fn = lambda p, x: functional_call(base, p, (x,))
        self.loop = LoopFull(eng)

    def step(self, ks, xs, ys):
        if not uniform(xs):
            return self.loop.step(ks, xs, ys)
        eng, cl = self.eng, self.eng.client_exec
        z = cl.forward_autograd(ks, xs)  # [G, B, ...], graph to cl.leaf
        G = len(ks)
        idx = torch.as_tensor(ks)
        buf = eng.servers.flat.buffer
        rows = buf if G == eng.m else buf.index_select(0, idx)
        # one leaf per parameter (a [G, ...] view): gradients land per parameter, without a
        # [K, P]-sized zero-filled gradient per parameter that slicing one big leaf would cost
        ents = [e for e in eng.servers.flat.layout.entries if e.kind == "param"]
        params = {e.name: rows[:, e.offset:e.offset + e.numel].view(G, *e.shape).detach().requires_grad_(True)
                  for e in ents}
        with eng.compute():
            out = torch.func.vmap(self.fn)(params, z)  # [G, B, C]
        out = wide(out)
        B = out.shape[1]
        y = torch.cat(ys)
        eng.record_train(ks, out.reshape(G * B, -1), y)
        loss = F.cross_entropy(out.reshape(G * B, -1), y, reduction="none")
        cl.leaf.grad = None
        loss.view(G, B).mean(1).sum().backward()
        cl.leaf_grads_to_buffer(ks)
        for e in ents:
            write_rows(eng.servers.flat.grad_buffer, e, None if G == eng.m else idx, params[e.name].grad)
