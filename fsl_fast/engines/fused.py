"""Fused engine (``--fused``): the same semantics as the reference engine, computed fast.

- Client models (and server copies where an algorithm keeps one per client, a single server
  without BatchNorm, and linear auxiliaries) live in flat [K, P] buffers (fsl_fast.flat.FlatClients); each client's module is a
  set of views into its row, gradients land in a flat [K, P] gradient buffer, one FlatAdam step
  updates every participating client, and FedAvg is one flat weighted reduction with broadcast
  (fsl_fast.ops.fedavg).
- Client networks run with fused layers (fsl_fast.ops.layers: max-pool+ReLU and LocalResponseNorm
  kernels; on this CPU those two ops take most of the client time in the reference).
- Clients advance together where the schedule allows: ``client_batching="vmap"`` runs all active
  clients' forward/backward as one vmapped (grouped) computation; ``"loop"`` runs them one after
  another over their flat views. ``"auto"`` picks vmap on CUDA and loop on CPU, where grouped
  torch convolutions measured slower than the loop (docs/PERF_NOTES.md). On the CPU a client made
  only of fused conv blocks (the cnn) runs all active clients in one C++ call per layer instead
  (``_grouped_plan``), forward and backward from a tape of the blocks' saved tensors, without
  autograd (``_client_grouped_taped`` / ``_backward_taped``).
- A server of Linear and ReLU layers (cnn, simple_conv) steps without autograd (``_mlp_step``:
  the ops autograd would run, in its order, so the same bits).
- Linear auxiliaries: the estimate for all clients is one batched fused op; alignment of all
  clients' auxiliaries runs as one batched closed-form op per step (fsl_fast.ops.aux), no double
  backward. Convolutional auxiliaries use the fast path of fsl_fast.aux_fast.
- The server's refreshed targets for all clients come from one forward when the server has no
  BatchNorm (per-sample gradients do not depend on the batch then), else one forward per client.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

from fsl_fast.engines.base import Engine, align_seed, buffer_targets, wide
from fsl_fast.flat import FlatClients
from fsl_fast.models import ConvAux, LinearAux
from fsl_fast.optim import FlatAdam
from fsl_fast.rewrites import enable_small_map_convs


def _backend_name(op: str, device) -> str:
    from fsl_fast.ops import _backend

    return _backend.resolve(op, device)[0]


def _write_rows(buffer: torch.Tensor, e, rows, t: torch.Tensor) -> None:
    """Entry ``e`` of the flat [K, P] ``buffer`` for the active clients: all rows (``rows`` is
    None) or rows ``rows`` (a LongTensor), from ``t`` holding one [e.numel] slice per client."""
    dst = buffer[:, e.offset:e.offset + e.numel]
    src = t.reshape(-1, e.numel)
    if rows is None:
        dst.copy_(src)
    else:
        dst.index_copy_(0, rows, src)


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _fuse(module: nn.Module) -> nn.Module:
    from fsl_fast.ops.layers import fuse_client_layers

    return fuse_client_layers(module)


class _Stack:
    """K copies of one module over a FlatClients buffer, with a FlatAdam on the parameter part."""

    def __init__(self, module: nn.Module, K: int, device, lr: float, wd: float):
        self.template = module
        self.flat = FlatClients(module, K, device=device)
        self.mods = [self.flat.bind(k, copy.deepcopy(module), grads=True) for k in range(K)]
        ents = [e for e in self.flat.layout.entries if e.name in set(self.flat.layout.param_names)]
        self.np = max((e.offset + e.numel for e in ents), default=0)
        if any(e.offset >= self.np for e in ents) or sum(e.numel for e in ents) != self.np:
            raise RuntimeError("flat layout must place parameters before buffers")
        self.opt = FlatAdam(self.flat.buffer[:, :self.np], self.flat.grad_buffer[:, :self.np],
                            lr=lr, weight_decay=wd)
        self.global_mod = copy.deepcopy(module)

    def zero_grad(self, rows) -> None:
        g = self.flat.grad_buffer
        if len(rows) == g.shape[0]:
            g.zero_()
        else:
            for r in rows:
                g[r].zero_()

    def average(self, weights) -> None:
        self.flat.average(weights, broadcast=True)
        self.flat.load_into(self.global_mod)

    def state_dict(self) -> dict:
        return {"buffer": self.flat.buffer, "int_buffers": self.flat.int_buffers,
                "global": self.flat.global_buffer, "global_int": self.flat.global_int_buffer,
                "opt": self.opt.state_dict()}

    def load_state_dict(self, sd) -> None:
        self.flat.buffer.copy_(sd["buffer"])
        self.flat.int_buffers.copy_(sd["int_buffers"])
        self.flat.global_buffer.copy_(sd["global"])
        self.flat.global_int_buffer.copy_(sd["global_int"])
        self.opt.load_state_dict(sd["opt"])
        self.flat.load_into(self.global_mod)


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
        self.clients = _Stack(client, K, dev, lr, wd)
        # vmap runs the unfused modules (the fused-layer autograd Functions are CPU kernels
        # without vmap rules; on CUDA the layer ops are torch's own anyway). Same state keys.
        self._plain_client = copy.deepcopy(split.client).to(dev)
        mode = getattr(cfg, "client_batching", "auto")
        if mode == "auto":
            mode = "vmap" if dev.type == "cuda" else "loop"
        self.batching = mode
        self.client_has_bn = _has_batchnorm(self.clients.template)
        self._grouped = self._grouped_plan() if mode == "loop" else None
        # conv blocks and flattens only: client_forward/backward run without autograd (a tape)
        self._taped = self._grouped is not None and all(
            kind == "conv" or isinstance(what, nn.Flatten) for kind, what, _ in self._grouped)
        self._tape = None
        self.server_global = split.server.to(dev)
        self.servers = None
        if algorithm_cls.server_copies:
            self.servers = _Stack(self.server_global, K, dev, lr, wd)
            self.server_global = self.servers.global_mod
        self.server_has_bn = _has_batchnorm(self.server_global)
        self.server_stack = None
        if self.servers is None and not (self.server_has_bn and self.bitwise):
            # one server: flat too, one fused Adam pass per step (0.16 ms instead of torch's
            # 0.7 ms for the cnn server's 0.2M parameters; resnet18's 10.5M-parameter server:
            # torch's Adam allocated ~15 ms of temporaries per step). In FSL_FAST_BITWISE mode a
            # BatchNorm server keeps torch's Adam, bit-identical to the reference engine's: there
            # a last-bit difference is amplified through BatchNorm and Adam into visible drift
            # within one round (tests/test_fused_parity.py compares elementwise).
            self.server_stack = _Stack(self.server_global, 1, dev, lr, wd)
            self.server_global = self.server_stack.mods[0]
        elif self.servers is None:
            self.server_opt = torch.optim.Adam(self.server_global.parameters(), lr=lr, weight_decay=wd)
        self._srv_plan = self._mlp_plan(self.servers if self.servers is not None else self.server_stack)
        self.aux = None
        if algorithm_cls.uses_aux:
            aux = split.aux.to(dev)
            self.aux_linear = isinstance(aux, LinearAux)
            self.aux_pool = bool(getattr(aux, "pool", False))
            self.aux = _Stack(aux, K, dev, cfg.aux_lr, 0.0)
            if self.aux_linear:
                st = self.aux.flat.stacked(with_int=False)
                self.aux_W, self.aux_b = st["fc.weight"], st["fc.bias"]
                # the same [K, C, D] / [K, C] views into the flat gradient buffer
                lay = {e.name: e for e in self.aux.flat.layout.entries}
                g = self.aux.flat.grad_buffer
                self.aux_gW, self.aux_gb = (g[:, e.offset:e.offset + e.numel].view(K, *e.shape)
                                            for e in (lay["fc.weight"], lay["fc.bias"]))
            self.align_gens = [torch.Generator().manual_seed(align_seed(cfg.seed, k)) for k in range(K)]
        self._vmap_fn = None
        self._leaf = None
        self._server_fn = None
        self._vmap_out = None  # (ks, [K, ...] output) of the last batched client forward
        self._z_list = None  # the grouped forward's per-client outputs (rows of _vmap_out)
        self._est = None  # (list returned by aux_estimate, the [K, ...] tensor it unbinds)

    # -- client side ---------------------------------------------------------------------------
    def _grouped_plan(self):
        """Client networks made only of fused conv blocks and parameter-free per-sample layers
        (cnn; not simple_conv, whose second conv is torch's) run all active clients in one call
        per layer on the CPU: the conv kernel takes [G, ...] weights, one group per client."""
        from fsl_fast.ops.layers import LRN, ConvPoolReLU, PoolReLU, conv_pool_relu_supported

        mod = self.clients.template
        if self.device.type != "cpu" or self.client_has_bn or not isinstance(mod, nn.Sequential):
            return None
        if _backend_name("conv_pool_relu", self.device) != "cpp":
            return None
        lay = {e.name: e for e in self.clients.flat.layout.entries}
        steps = []
        for name, m in mod.named_children():
            if isinstance(m, ConvPoolReLU):
                if m.backend not in (None, "cpp") or not conv_pool_relu_supported(m.weight.shape[1], m.weight.shape[2]):
                    return None
                steps.append(("conv", (lay[f"{name}.weight"], lay.get(f"{name}.bias")),
                              (m.kernel_size, m.stride, m.padding, m.channels_last_out)))
            elif isinstance(m, nn.Identity):
                continue
            elif isinstance(m, (nn.Flatten, PoolReLU, LRN, nn.ReLU)):
                steps.append(("layer", m, None))
            else:
                return None
        return steps if any(kind == "conv" for kind, _, _ in steps) else None

    def _client_grouped_taped(self, ks, xs):
        """The grouped client forward without autograd (cnn: conv blocks and a flatten): the
        C++ forward saves what its backward needs on a tape, and ``_backward_taped`` runs the
        blocks' backward in reverse, writing the weight and bias gradients straight into the flat
        gradient buffer. The same kernels and sums as the autograd path, without the autograd
        graph, the slice backward of the leaf buffer and the copy into the gradient buffer."""
        from fsl_fast.ops.layers import _layout, _ops

        buf = self.clients.flat.buffer
        G, B = len(ks), xs[0].shape[0]
        rows = buf if G == self.m else buf.index_select(0, torch.as_tensor(ks))
        h = torch.cat(xs)
        tape = []
        with torch.no_grad():
            for kind, what, pool in self._grouped:
                if kind == "conv":
                    ew, eb = what
                    w = rows[:, ew.offset:ew.offset + ew.numel].contiguous().view(G, *ew.shape)
                    b = rows[:, eb.offset:eb.offset + eb.numel].contiguous() if eb is not None else w.new_empty(0)
                    x = _layout(h)
                    h, idx, xp = _ops().conv_pool_relu_fwd(x, w, b, *pool)
                    tape.append(("conv", (ew, eb, idx, xp, w, pool[:3], not x.is_contiguous())))
                else:  # nn.Flatten (the plan allows only that with a tape)
                    tape.append(("flatten", h.shape))
                    h = what(h)
        self._tape = (ks, tape)
        return h.view(G, B, *h.shape[1:])

    def _backward_taped(self, gz):
        from fsl_fast.ops.layers import _ops

        ks, tape = self._tape
        self._tape = None
        G = len(ks)
        gbuf = self.clients.flat.grad_buffer
        idx_rows = None if G == self.m else torch.as_tensor(ks)
        gy = gz.reshape(-1, *gz.shape[2:])
        first = next(i for i, (kind, _) in enumerate(tape) if kind == "conv")
        for i in range(len(tape) - 1, -1, -1):
            kind, t = tape[i]
            if kind == "flatten":
                gy = gy.reshape(t)
                continue
            ew, eb, idx, xp, w, pool, x_cl = t
            gx, gw, gb = _ops().conv_pool_relu_bwd(gy, idx, xp, w, i > first, *pool, x_cl)
            _write_rows(gbuf, ew, idx_rows, gw)
            if eb is not None:
                _write_rows(gbuf, eb, idx_rows, gb)
            gy = gx

    def _client_grouped(self, ks, xs):
        from fsl_fast.ops.layers import conv_pool_relu_grouped

        if self._leaf is None:
            self._leaf = self.clients.flat.buffer.detach().requires_grad_(True)
        leaf = self._leaf
        G, B = len(ks), xs[0].shape[0]
        rows = leaf if G == self.m else leaf.index_select(0, torch.as_tensor(ks))
        h = torch.cat(xs)
        for kind, what, pool in self._grouped:
            if kind == "conv":
                ew, eb = what
                w = rows[:, ew.offset:ew.offset + ew.numel].view(G, *ew.shape)
                b = None if eb is None else rows[:, eb.offset:eb.offset + eb.numel]
                h = conv_pool_relu_grouped(h, w, b, *pool)
            else:
                h = what(h)
        return h.view(G, B, *h.shape[1:])

    def _client_vmap(self, ks, xs):
        from torch.func import functional_call

        if self._vmap_fn is None:
            base = self._plain_client
            self._vmap_fn = lambda p, x: functional_call(base, p, (x,))
        if self._leaf is None:
            self._leaf = self.clients.flat.buffer.detach().requires_grad_(True)
        flat = self.clients.flat
        leaf = self._leaf
        idx = torch.as_tensor(ks, device=leaf.device)
        rows = leaf if len(ks) == self.m else leaf.index_select(0, idx)
        params = {e.name: rows[:, e.offset:e.offset + e.numel].view(len(ks), *e.shape)
                  for e in flat.layout.entries}
        with self.compute():
            z = torch.func.vmap(self._vmap_fn)(params, torch.stack(xs))
        return wide(z)

    def client_forward(self, ks, xs):
        self.clients.zero_grad(ks)
        if self.batching == "vmap" and not self.client_has_bn:
            z = self._client_vmap(ks, xs)
            self._vmap_out = (ks, z)
            self._z_list = list(z.unbind(0))
            return self._z_list
        if self._grouped is not None and self._uniform(xs):
            z = self._client_grouped_taped(ks, xs) if self._taped else self._client_grouped(ks, xs)
            self._vmap_out = (ks, z)
            self._z_list = list(z.unbind(0))
            return self._z_list
        self._vmap_out = self._z_list = None
        with self.compute():
            zs = [self.clients.mods[k](x) for k, x in zip(ks, xs)]
        return [wide(z) for z in zs]  # the wire carries fp32 smashed data in any precision

    def _leaf_grads_to_buffer(self, ks):
        """Rows ``ks`` of the batched clients' leaf gradient into the flat gradient buffer."""
        g, gb = self._leaf.grad, self.clients.flat.grad_buffer
        if len(ks) == self.m:
            gb.copy_(g)
        else:
            idx = torch.as_tensor(ks, device=gb.device)
            gb.index_copy_(0, idx, g.index_select(0, idx))

    def client_backward(self, ks, zs, grads):
        if self._vmap_out is not None:
            # the estimate's own [K, ...] tensor when these are its rows (no 2 MB re-stack)
            full = self._est[1] if self._est is not None and grads is self._est[0] else torch.stack(grads)
            self._est = None
            if self._tape is not None:
                self._backward_taped(full)
            else:
                self._leaf.grad = None
                self._vmap_out[1].backward(full)
                self._leaf_grads_to_buffer(ks)
            self._vmap_out = None
        else:
            for z, g in zip(zs, grads):
                z.backward(g)
        self.clients.opt.step(ks)

    def _aux_rows(self, ks):
        if len(ks) == self.m:
            return self.aux_W, self.aux_b
        idx = torch.as_tensor(ks, device=self.aux_W.device)
        return self.aux_W.index_select(0, idx), self.aux_b.index_select(0, idx)

    def _uniform(self, tensors) -> bool:
        return len({tuple(t.shape) for t in tensors}) == 1

    def aux_estimate(self, ks, zs, ys):
        if self.aux_linear and self._uniform(zs):
            from fsl_fast.ops.aux import aux_estimate

            W, b = self._aux_rows(ks)
            if self._vmap_out is not None and zs is self._z_list:
                Z = self._vmap_out[1].detach()  # the batched forward's output, not a re-stack
            else:
                Z = torch.stack([z.detach() for z in zs])
            g = aux_estimate(Z, W, b, torch.stack(ys), pool=self.aux_pool)
            out = list(g.unbind(0))
            self._est = (out, g)
            return out
        out = []
        for k, z, y in zip(ks, zs, ys):
            zd = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.ce_loss(self.aux.mods[k], zd, y), zd)
            out.append(g)
        return out

    def aux_local_step(self, ks, zs, ys):
        """CSE-FSL: the local loss CE(aux(z), y) steps the auxiliary; returns dL/dz."""
        self.aux.zero_grad(ks)
        if self.aux_linear and self._uniform(zs):
            # batched closed form of a linear head's cross-entropy gradients (batched GEMMs)
            W, b = self._aux_rows(ks)
            Z = torch.stack([z.detach() for z in zs])
            Y = torch.stack(ys)
            Kc, B = Z.shape[0], Z.shape[1]
            if self.aux_pool:
                S = Z[0, 0].numel() // Z.shape[2]
                feat = Z.flatten(3).mean(3) if Z.dim() > 3 else Z
            else:
                feat = Z.reshape(Kc, B, -1)
            p = torch.softmax(torch.baddbmm(b.unsqueeze(1), feat, W.transpose(1, 2)), dim=2)
            G = p.scatter_add(2, Y.unsqueeze(2), torch.full_like(p[..., :1], -1.0)).div_(B)
            gW = torch.bmm(G.transpose(1, 2), feat)
            gb = G.sum(1)
            dfeat = torch.bmm(G, W)
            if self.aux_pool:
                dz = (dfeat / S).unsqueeze(-1).expand(Kc, B, Z.shape[2], S).reshape(Z.shape)
            else:
                dz = dfeat.reshape(Z.shape)
            fw, fb = self.aux_gW, self.aux_gb
            for i, k in enumerate(ks):
                fw[k].copy_(gW[i])
                fb[k].copy_(gb[i])
            self.aux.opt.step(ks)
            return list(dz.unbind(0))
        out = []
        for k, z, y in zip(ks, zs, ys):
            zd = z.detach().requires_grad_(True)
            self.ce_loss(self.aux.mods[k], zd, y).backward()
            out.append(zd.grad)
        self.aux.opt.step(ks)
        return out

    def full_step(self, ks, xs, ys):
        if self._taped and self._srv_plan is not None and self._uniform(xs):
            self._full_step_taped(ks, xs, ys)  # overwrites the active rows' gradients
        elif self._grouped is not None and not self.server_has_bn and self._uniform(xs):
            self._full_step_batched(ks, xs, ys)  # overwrites the active rows' gradients
        else:
            self.clients.zero_grad(ks)
            self.servers.zero_grad(ks)
            for k, x, y in zip(ks, xs, ys):
                self.ce_loss(lambda v: self.servers.mods[k](wide(self.clients.mods[k](v))), x, y).backward()
        self.clients.opt.step(ks)
        self.servers.opt.step(ks)

    def _full_step_taped(self, ks, xs, ys):
        """FedAvg's whole-model step without autograd (cnn): the taped grouped client, then the
        clients' Linear/ReLU server copies as batched GEMMs over their [G, out, in] weight views,
        each client's mean cross-entropy differentiated by the same aten ops as ``_mlp_step``
        (per row: reduction none with weight 1 / B), and the taped client backward."""
        z = self._client_grouped_taped(ks, xs)  # [G, B, ...]
        G, B = z.shape[0], z.shape[1]
        st = self.servers
        idx = None if G == self.m else torch.as_tensor(ks)
        buf = st.flat.buffer if idx is None else st.flat.buffer.index_select(0, idx)

        def view(e):
            return buf[:, e.offset:e.offset + e.numel].view(G, *e.shape)

        acts, h = [], z.reshape(G, B, -1)
        for kind, ew, eb in self._srv_plan:
            acts.append(h)
            if kind == "linear":
                wt = view(ew).transpose(1, 2)
                h = torch.baddbmm(view(eb).unsqueeze(1), h, wt) if eb is not None else torch.bmm(h, wt)
            else:
                h = torch.relu(h)
        logp = torch.log_softmax(h.reshape(G * B, -1), 1)
        y = torch.cat(ys)
        w = torch.full((G * B,), 1.0, dtype=logp.dtype).div_(B)
        total = torch.ones((), dtype=logp.dtype)
        g = torch.ops.aten.nll_loss_backward(w, logp, y, None, 0, -100, total)
        g = torch.ops.aten._log_softmax_backward_data(g, logp, 1, logp.dtype).view(G, B, -1)
        grads = st.flat.grad_buffer
        for i in range(len(self._srv_plan) - 1, -1, -1):
            kind, ew, eb = self._srv_plan[i]
            if kind == "relu":
                g = torch.ops.aten.threshold_backward(g, acts[i + 1], 0)
                continue
            _write_rows(grads, ew, idx, torch.bmm(g.transpose(1, 2), acts[i]))
            if eb is not None:
                _write_rows(grads, eb, idx, g.sum(1))
            g = torch.bmm(g, view(ew))
        self._backward_taped(g.view(z.shape))

    def _full_step_batched(self, ks, xs, ys):
        """FedAvg's whole-model step of all active clients at once: the grouped client stack, then
        the clients' server copies vmapped (batched GEMMs for Linear layers); the sum of the
        clients' mean losses gives each client exactly its own gradients."""
        from torch.func import functional_call

        z = self._client_grouped(ks, xs)  # [G, B, ...], graph to self._leaf
        if self._server_fn is None:
            base = copy.deepcopy(self.servers.template)
            self._server_fn = lambda p, x: functional_call(base, p, (x,))
        G = len(ks)
        idx = torch.as_tensor(ks)
        buf = self.servers.flat.buffer
        rows = buf if G == self.m else buf.index_select(0, idx)
        # one leaf per parameter (a [G, ...] view): gradients land per parameter, without a
        # [K, P]-sized zero-filled gradient per parameter that slicing one big leaf would cost
        ents = [e for e in self.servers.flat.layout.entries if e.kind == "param"]
        params = {e.name: rows[:, e.offset:e.offset + e.numel].view(G, *e.shape).detach().requires_grad_(True)
                  for e in ents}
        out = torch.func.vmap(self._server_fn)(params, z)  # [G, B, C]
        B = out.shape[1]
        loss = F.cross_entropy(out.reshape(G * B, -1), torch.cat(ys), reduction="none")
        self._leaf.grad = None
        loss.view(G, B).mean(1).sum().backward()
        self._leaf_grads_to_buffer(ks)
        for e in ents:
            _write_rows(self.servers.flat.grad_buffer, e, None if G == self.m else idx, params[e.name].grad)

    # -- server side ---------------------------------------------------------------------------
    @staticmethod
    def _mlp_plan(stack):
        """A flat server made of Linear and ReLU only, ending in a Linear (the cnn's and
        simple_conv's servers): [(kind, weight entry, bias entry)], else None."""
        if stack is None or not isinstance(stack.template, nn.Sequential):
            return None
        lay = {e.name: e for e in stack.flat.layout.entries}
        plan = []
        for name, m in stack.template.named_children():
            if isinstance(m, nn.Linear):
                plan.append(("linear", lay[f"{name}.weight"], lay.get(f"{name}.bias")))
            elif isinstance(m, nn.ReLU):
                plan.append(("relu", None, None))
            else:
                return None
        return plan if plan and plan[-1][0] == "linear" else None

    def _mlp_step(self, stack, row, z, y, want_grad):
        """Gradients of CE_mean(server(z), y) for an MLP server written straight into the flat
        gradient buffer's row, without autograd: the ops autograd would run (addmm forward;
        nll_loss and log_softmax backward; mm / sum for Linear, threshold_backward for ReLU), in
        its order, so the gradients are the same bits (tests/test_fused_parity.py)."""
        buf, gbuf = stack.flat.buffer[row], stack.flat.grad_buffer[row]

        def view(t, e):
            return t[e.offset:e.offset + e.numel].view(e.shape)

        acts, h = [], z
        for kind, ew, eb in self._srv_plan:
            acts.append(h)
            if kind == "linear":
                w = view(buf, ew)
                h = torch.addmm(view(buf, eb), h, w.t()) if eb is not None else h.mm(w.t())
            else:
                h = torch.relu(h)
        logp = torch.log_softmax(h, 1)
        total = torch.tensor(float(y.numel()), dtype=logp.dtype, device=logp.device)
        one = torch.ones((), dtype=logp.dtype, device=logp.device)
        g = torch.ops.aten.nll_loss_backward(one, logp, y, None, 1, -100, total)
        g = torch.ops.aten._log_softmax_backward_data(g, logp, 1, logp.dtype)
        for i in range(len(self._srv_plan) - 1, -1, -1):
            kind, ew, eb = self._srv_plan[i]
            if kind == "relu":  # never last (the plan ends in a Linear): its output is acts[i + 1]
                g = torch.ops.aten.threshold_backward(g, acts[i + 1], 0)
                continue
            torch.mm(g.t(), acts[i], out=view(gbuf, ew))
            if eb is not None:
                torch.sum(g, 0, out=view(gbuf, eb))
            if i > 0 or want_grad:
                g = g.mm(view(buf, ew))
        return g if want_grad else None

    def server_step(self, k, z, y, want_grad=False):
        if self._srv_plan is not None:
            stack, row = (self.servers, k) if self.servers is not None else (self.server_stack, 0)
            gz = self._mlp_step(stack, row, z.detach(), y, want_grad)
            stack.opt.step([row])
            return gz
        zr = z.detach().requires_grad_(want_grad)
        server = self.servers.mods[k] if self.servers is not None else self.server_global
        if self.servers is not None:
            self.servers.zero_grad([k])
        elif self.server_stack is not None:
            self.server_stack.zero_grad([0])
        else:
            self.server_opt.zero_grad(set_to_none=True)
        self.ce_loss(server, zr, y).backward()
        if self.servers is not None:
            self.servers.opt.step([k])
        elif self.server_stack is not None:
            self.server_stack.opt.step([0])
        else:
            self.server_opt.step()
        return zr.grad if want_grad else None

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
        targets = self._targets(data)
        sizes = {Z.shape[0] for Z, _ in data}
        if self.aux_linear and len(sizes) == 1:
            self._align_linear_batched(ks, data, targets, sizes.pop())
            return
        for k, (Z, Y), T in zip(ks, data, targets):
            self._align_one(k, Z, Y, T)

    def _align_linear_batched(self, ks, data, targets, n):
        """All clients' linear auxiliaries in one closed-form op per alignment step."""
        from fsl_fast.ops.aux import aux_align

        cfg = self.cfg
        Z = torch.stack([d[0] for d in data])
        Y = torch.stack([d[1] for d in data])
        T = torch.stack(targets)
        Kc = len(ks)
        fw, fb = self.aux_gW, self.aux_gb
        full = Kc == self.m
        rowsel = torch.arange(Kc, device=Z.device).unsqueeze(1)
        whole = cfg.align_batch_size >= n
        for _ in range(cfg.align_epochs):
            perm = torch.stack([torch.randperm(n, generator=self.align_gens[k]) for k in ks]).to(Z.device)
            for i in range(0, n, cfg.align_batch_size):
                idx = perm[:, i:i + cfg.align_batch_size]
                b = idx.shape[1]
                W, bias = self._aux_rows(ks)
                # predictions carry 1/n like the targets (reference: CE_sum / n). One batch that
                # holds the whole buffer is a sum over all its samples: the permuted copy would only
                # change the summation order, so the buffer is used in place (the permutation is
                # still drawn: the generators stay in step with the reference engine's).
                zb, yb, tb = (Z, Y, T) if whole else (Z[rowsel, idx], Y[rowsel, idx], T[rowsel, idx])
                _, dW, db = aux_align(zb, W, bias, yb, tb, pool=self.aux_pool, grad_scale=b / n)
                if full:
                    fw.copy_(dW)
                    fb.copy_(db)
                else:
                    for j, k in enumerate(ks):
                        fw[k].copy_(dW[j])
                        fb[k].copy_(db[j])
                self.aux.opt.step(ks)

    def _align_one(self, k, Z, Y, T):
        cfg = self.cfg
        aux = self.aux.mods[k]
        n = Z.shape[0]
        gen = self.align_gens[k]
        for _ in range(cfg.align_epochs):
            perm = torch.randperm(n, generator=gen).to(Z.device)
            for i in range(0, n, cfg.align_batch_size):
                idx = perm[i:i + cfg.align_batch_size]
                b = idx.shape[0]
                self.aux.zero_grad([k])
                if isinstance(aux, ConvAux):
                    from fsl_fast.aux_fast import conv_align_grads

                    _, grads = conv_align_grads(aux.trunk, aux.fc, Z[idx], Y[idx], T[idx], grad_scale=b / n)
                    for p, g in zip(list(aux.trunk.parameters()) + [aux.fc.weight, aux.fc.bias], grads):
                        p.grad.copy_(g)
                else:
                    Zb = Z[idx].detach().requires_grad_(True)
                    est = self.ce_loss(aux, Zb, Y[idx], reduction="sum") / n
                    (g,) = torch.autograd.grad(est, Zb, create_graph=True)
                    F.mse_loss(g, T[idx], reduction="sum").backward()
                self.aux.opt.step([k])

    # -- aggregation and evaluation ------------------------------------------------------------
    def aggregate(self, weights, clients=True, aux=False, servers=False):
        with torch.no_grad():
            if clients:
                self.clients.average(weights)
            if servers and self.servers is not None:
                self.servers.average(weights)
            if aux:
                self.aux.average(weights)

    def eval_models(self):
        return self.clients.global_mod, self.server_global

    def aux_module(self, k):
        return self.aux.mods[k]

    # -- divergence checks, hyperparameters -----------------------------------------------------
    def batched_view(self, tensors):
        if self._vmap_out is not None and tensors is self._z_list:
            return self._vmap_out[1]
        if self._est is not None and tensors is self._est[0]:
            return self._est[1]
        return None

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

    def named_state(self):
        out = {"client": self.clients.global_mod.state_dict(), "server": self.server_global.state_dict()}
        if self.aux is not None:
            for k, a in enumerate(self.aux.mods):
                out[f"aux{k}"] = a.state_dict()
        return out
