"""A server made of Linear and ReLU layers (the cnn's and simple_conv's) stepped without
autograd: the aten ops autograd would run, in its order, so the gradients are the same bits
(tests/test_fused_parity.py compares them)."""
from __future__ import annotations

import torch
from torch import nn

from fsl_fast.engines.executors.base import Executor


def mlp_plan(stack):
    """A flat server stack whose template is an nn.Sequential of Linear and ReLU ending in a
    Linear: [(kind, weight entry, bias entry)], else None."""
    if stack is None or not isinstance(stack.template, nn.Sequential):
        return None
    lay = stack.entries()
    plan = []
    for name, m in stack.template.named_children():
        if isinstance(m, nn.Linear):
            plan.append(("linear", lay[f"{name}.weight"], lay.get(f"{name}.bias")))
        elif isinstance(m, nn.ReLU):
            plan.append(("relu", None, None))
        else:
            return None
    return plan if plan and plan[-1][0] == "linear" else None


def mlp_step(plan, stack, row, z, y, want_grad, record=None):
    """Gradients of CE_mean(server(z), y) written straight into the flat gradient buffer's
    ``row``: addmm forward; nll_loss and log_softmax backward; mm / sum for Linear,
    threshold_backward for ReLU. Returns dCE/dz when ``want_grad``."""
    buf, gbuf = stack.flat.buffer[row], stack.flat.grad_buffer[row]

    def view(t, e):
        return t[e.offset:e.offset + e.numel].view(e.shape)

    acts, h = [], z
    for kind, ew, eb in plan:
        acts.append(h)
        if kind == "linear":
            w = view(buf, ew)
            h = torch.addmm(view(buf, eb), h, w.t()) if eb is not None else h.mm(w.t())
        else:
            h = torch.relu(h)
    logp = torch.log_softmax(h, 1)
    if record is not None:
        record(logp, y)
    total = torch.tensor(float(y.numel()), dtype=logp.dtype, device=logp.device)
    one = torch.ones((), dtype=logp.dtype, device=logp.device)
    g = torch.ops.aten.nll_loss_backward(one, logp, y, None, 1, -100, total)
    g = torch.ops.aten._log_softmax_backward_data(g, logp, 1, logp.dtype)
    for i in range(len(plan) - 1, -1, -1):
        kind, ew, eb = plan[i]
        if kind == "relu":  # never last (the plan ends in a Linear): its output is acts[i + 1]
            g = torch.ops.aten.threshold_backward(g, acts[i + 1], 0)
            continue
        torch.mm(g.t(), acts[i], out=view(gbuf, ew))
        if eb is not None:
            torch.sum(g, 0, out=view(gbuf, eb))
        if i > 0 or want_grad:
            g = g.mm(view(buf, ew))
    return g if want_grad else None


class MLPServer(Executor):
    part, name = "server", "mlp"

    @classmethod
    def matches(cls, eng):
        if eng.server_flat() is None:
            return False, "the server is not kept flat"
        if mlp_plan(eng.server_flat()) is None:
            return False, "the server is not an nn.Sequential of Linear and ReLU ending in a Linear"
        return True, ("Linear/ReLU server: forward and backward by hand into the flat gradient buffer "
                      "(fp32 in either precision)")

    def __init__(self, eng):
        super().__init__(eng)
        self.plan = mlp_plan(eng.server_flat())

    def step(self, k, z, y, want_grad=False):
        eng = self.eng
        stack, row = (eng.servers, k) if eng.servers is not None else (eng.server_stack, 0)
        gz = mlp_step(self.plan, stack, row, z.detach(), y, want_grad,
                      record=lambda logp, y: eng.record_train([k], logp, y, logp=True))
        stack.opt.step([row])
        return gz
