"""Linear auxiliaries (``fsl_fast.models.LinearAux``: optional global average pool, then one
Linear) in closed form for all clients at once: the estimate is one batched fused op, CSE-FSL's
local step batched GEMMs, and alignment one batched closed-form op per step (fsl_fast.ops.aux;
no double backward)."""
from __future__ import annotations

import torch

from fsl_fast.engines.executors.base import Executor, uniform
from fsl_fast.engines.executors.generic import AutogradAux, DoubleBackwardAlign
from fsl_fast.models import LinearAux


def _is_linear(eng):
    if eng.aux is None:
        return False, "the algorithm has no auxiliary model"
    if not isinstance(eng.aux.template, LinearAux):
        return False, f"the auxiliary is a {type(eng.aux.template).__name__}, not a LinearAux"
    return True, ""


class _Rows:
    """[K, C, D] / [K, C] views of the auxiliaries' weights, biases and their gradients."""

    def __init__(self, eng):
        K = eng.m
        st = eng.aux.flat.stacked(with_int=False)
        self.W, self.b = st["fc.weight"], st["fc.bias"]
        lay = eng.aux.entries()
        g = eng.aux.flat.grad_buffer
        self.gW, self.gb = (g[:, e.offset:e.offset + e.numel].view(K, *e.shape)
                            for e in (lay["fc.weight"], lay["fc.bias"]))
        self.m = K

    def rows(self, ks):
        if len(ks) == self.m:
            return self.W, self.b
        idx = torch.as_tensor(ks, device=self.W.device)
        return self.W.index_select(0, idx), self.b.index_select(0, idx)


class LinearAuxExecutor(Executor):
    part, name = "aux", "linear_closed_form"

    @classmethod
    def matches(cls, eng):
        ok, why = _is_linear(eng)
        return ok, why or "LinearAux: batched closed-form estimate and local step for all clients"

    def __init__(self, eng):
        super().__init__(eng)
        self.r = _Rows(eng)
        self.pool = bool(eng.aux.template.pool)
        self.generic = AutogradAux(eng)
        self.est = None  # (list returned by estimate, the [K, ...] tensor it unbinds)

    def batched(self, tensors):
        return self.est[1] if self.est is not None and tensors is self.est[0] else None

    def forget(self):
        self.est = None

    def estimate(self, ks, zs, ys):
        from fsl_fast.ops.aux import aux_estimate

        self.est = None
        if not uniform(zs):
            return self.generic.estimate(ks, zs, ys)
        W, b = self.r.rows(ks)
        Z = self.eng.client_exec.batched(zs)  # the batched forward's output, not a re-stack
        Z = torch.stack([z.detach() for z in zs]) if Z is None else Z.detach()
        g = aux_estimate(Z, W, b, torch.stack(ys), pool=self.pool)
        out = list(g.unbind(0))
        self.est = (out, g)
        return out

    def local_step(self, ks, zs, ys):
        """CSE-FSL: the local loss CE(aux(z), y) steps the auxiliary; returns dL/dz."""
        eng = self.eng
        if not uniform(zs):
            return self.generic.local_step(ks, zs, ys)
        W, b = self.r.rows(ks)
        Z = torch.stack([z.detach() for z in zs])
        Y = torch.stack(ys)
        Kc, B = Z.shape[0], Z.shape[1]
        if self.pool:
            S = Z[0, 0].numel() // Z.shape[2]
            feat = Z.flatten(3).mean(3) if Z.dim() > 3 else Z
        else:
            feat = Z.reshape(Kc, B, -1)
        p = torch.softmax(torch.baddbmm(b.unsqueeze(1), feat, W.transpose(1, 2)), dim=2)
        G = p.scatter_add(2, Y.unsqueeze(2), torch.full_like(p[..., :1], -1.0)).div_(B)
        gW = torch.bmm(G.transpose(1, 2), feat)
        gb = G.sum(1)
        dfeat = torch.bmm(G, W)
        if self.pool:
            dz = (dfeat / S).unsqueeze(-1).expand(Kc, B, Z.shape[2], S).reshape(Z.shape)
        else:
            dz = dfeat.reshape(Z.shape)
        for i, k in enumerate(ks):
            self.r.gW[k].copy_(gW[i])
            self.r.gb[k].copy_(gb[i])
        eng.aux.opt.step(ks)
        return list(dz.unbind(0))


class LinearAlign(Executor):
    part, name = "alignment", "linear_closed_form"

    @classmethod
    def matches(cls, eng):
        ok, why = _is_linear(eng)
        return ok, why or ("LinearAux: all clients' alignment steps in one closed-form op (clients "
                           "whose buffers differ in size: double backward)")

    def __init__(self, eng):
        super().__init__(eng)
        self.r = _Rows(eng)
        self.pool = bool(eng.aux.template.pool)
        self.generic = DoubleBackwardAlign(eng)

    def align(self, ks, data, targets):
        sizes = {Z.shape[0] for Z, _ in data}
        if len(sizes) != 1:
            return self.generic.align(ks, data, targets)
        from fsl_fast.ops.aux import aux_align

        eng, cfg, n = self.eng, self.eng.cfg, sizes.pop()
        Z = torch.stack([d[0] for d in data])
        Y = torch.stack([d[1] for d in data])
        T = torch.stack(targets)
        Kc = len(ks)
        fw, fb = self.r.gW, self.r.gb
        full = Kc == eng.m
        rowsel = torch.arange(Kc, device=Z.device).unsqueeze(1)
        whole = cfg.align_batch_size >= n
        for _ in range(cfg.align_epochs):
            perm = torch.stack([torch.randperm(n, generator=eng.align_gens[k]) for k in ks]).to(Z.device)
            for i in range(0, n, cfg.align_batch_size):
                idx = perm[:, i:i + cfg.align_batch_size]
                b = idx.shape[1]
                W, bias = self.r.rows(ks)
                # predictions carry 1/n like the targets (reference: CE_sum / n). One batch that
                # holds the whole buffer is a sum over all its samples: the permuted copy would only
                # change the summation order, so the buffer is used in place (the permutation is
                # still drawn: the generators stay in step with the reference engine's).
                zb, yb, tb = (Z, Y, T) if whole else (Z[rowsel, idx], Y[rowsel, idx], T[rowsel, idx])
                _, dW, db = aux_align(zb, W, bias, yb, tb, pool=self.pool, grad_scale=b / n)
                if full:
                    fw.copy_(dW)
                    fb.copy_(db)
                else:
                    for j, k in enumerate(ks):
                        fw[k].copy_(dW[j])
                        fb[k].copy_(db[j])
                eng.aux.opt.step(ks)
