"""Adam over flat [K, P] buffers: one optimizer for K clients' parameters.

Element for element this is ``torch.optim.Adam`` (the single-tensor algorithm, L2 weight decay
added to the gradient, bias corrections from each row's own step count), applied to whole rows at
once. Rows are clients; ``step(rows)`` advances only the clients that took part, so clients that
finished their local iterations early keep their state, as separate optimizers would.

The update itself is the op ``adam_step``: the C++ kernel (csrc/adam.cpp, one pass, no
temporaries) for float32 CPU tensors, else the eager reference below (also the ground truth of
tests/test_optim.py).
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


class FlatAdam:
    CHUNK = 1 << 22  # elements per pass of the update

    def __init__(self, params: torch.Tensor, grads: torch.Tensor, lr: float = 1e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 backend: str | None = None):
        if params.dim() != 2 or grads.shape != params.shape:
            raise ValueError(f"FlatAdam: params and grads must be [K, P] of one shape, got "
                             f"{tuple(params.shape)} and {tuple(grads.shape)}")
        self.p, self.g = params, grads
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.m = torch.zeros_like(params)
        self.v = torch.zeros_like(params)
        self.steps = [0] * params.shape[0]
        self.backend, self._impl = _backend.resolve("adam_step", params.device, backend)

    def zero_grad(self) -> None:
        self.g.zero_()

    def _update(self, p, g, m, v, step: int) -> None:
        self._impl(p, g, m, v, self.lr, self.b1, self.b2, self.eps, self.wd, step)

    @torch.no_grad()
    def step(self, rows=None) -> None:
        """Advance ``rows`` (a list of client indices; None = all)."""
        K = self.p.shape[0]
        rows = list(range(K)) if rows is None else list(rows)
        if not rows:
            return
        for r in rows:
            self.steps[r] += 1
        same = len({self.steps[r] for r in rows}) == 1
        lo, hi = rows[0], rows[-1] + 1
        if same and rows == list(range(lo, hi)):
            # contiguous rows at one step count: whole blocks of rows per pass, sized so the
            # reference update's temporaries stay small (100 ResNet-18 clients would otherwise
            # allocate several [K, P] temporaries, ~0.3 GB each); the C++ kernel has none
            per = max(1, self.CHUNK // max(1, self.p.shape[1])) if self.backend == "reference" else hi - lo
            for a in range(lo, hi, per):
                sl = slice(a, min(hi, a + per))
                self._update(self.p[sl], self.g[sl], self.m[sl], self.v[sl], self.steps[lo])
        else:
            for r in rows:
                self._update(self.p[r], self.g[r], self.m[r], self.v[r], self.steps[r])

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_dict(self, sd: dict) -> None:
        self.m.copy_(sd["m"])
        self.v.copy_(sd["v"])
        self.steps = [int(s) for s in sd["steps"]]
