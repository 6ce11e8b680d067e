"""Adam's element update as an op: ``adam_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay,
step)`` updates p, m, v in place exactly as ``torch.optim.Adam``'s single-tensor algorithm (L2
weight decay added to the gradient, bias corrections from ``step``).

Backends: ``cpp`` (csrc/adam.cpp: one pass over the four tensors, no temporaries; float32 CPU
tensors) and ``reference`` (the eager ops below; the ground truth of tests/test_optim.py, and the
path for other dtypes and devices). Kept because it measures faster than
``torch.optim.Adam(fused=True)`` on the client stacks (bench/bench_optim.py, README).
"""
from __future__ import annotations

import torch

from fsl_fast.ops import _backend


def adam_step_reference(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """torch.optim.Adam's single-tensor update of (p, m, v) in place, in eager ops."""
    if weight_decay:
        g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)


def _adam_step_cpp(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    if p.dtype != torch.float32:
        return adam_step_reference(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    _backend.extension()
    torch.ops.fsl_fast.adam_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)


_backend.register("adam_step", reference=adam_step_reference, cpp=_adam_step_cpp)
