"""Adam over flat [K, P] buffers: one optimizer for K clients' parameters.

Element for element this is ``torch.optim.Adam`` (the single-tensor algorithm, L2 weight decay
added to the gradient, bias corrections from each row's own step count), applied to whole rows at
once. Rows are clients; ``step(rows)`` advances only the clients that took part, so clients that
finished their local iterations early keep their state, as separate optimizers would.

The update itself is the op ``adam_step`` (fsl_fast.ops.adam): the C++ kernel (csrc/adam.cpp, one
pass, no temporaries) for float32 CPU tensors, else the eager reference.
"""
from __future__ import annotations

import torch

from fsl_fast.ops import resolve
from fsl_fast.ops import adam as _adam  # noqa: F401 - registers the adam_step op


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
        self.backend, self._impl = resolve("adam_step", params.device, backend)

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


# -- SGD ------------------------------------------------------------------------------------------

def sgd_step_reference(p, g, buf, lr, momentum, nesterov, weight_decay, step) -> None:
    """torch.optim.SGD's single-tensor update of p (and the momentum buffer ``buf``, unused when
    momentum is 0) in place, dampening 0: the same elementwise operations, so the same bits."""
    if weight_decay:
        g = g.add(p, alpha=weight_decay)
    if momentum:
        if step == 1:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.add_(g, alpha=-lr)


class FlatSGD:
    """SGD (optional momentum / Nesterov, L2 weight decay) over flat [K, P] rows, element for
    element ``torch.optim.SGD`` per client; the interface of FlatAdam (``lr``, ``wd``, per-row
    ``steps``, ``step(rows)``)."""

    def __init__(self, params: torch.Tensor, grads: torch.Tensor, lr: float = 1e-2,
                 momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        if params.dim() != 2 or grads.shape != params.shape:
            raise ValueError(f"FlatSGD: params and grads must be [K, P] of one shape, got "
                             f"{tuple(params.shape)} and {tuple(grads.shape)}")
        if nesterov and momentum <= 0:
            raise ValueError("FlatSGD: Nesterov momentum needs momentum > 0")
        self.p, self.g = params, grads
        self.lr, self.wd, self.momentum, self.nesterov = lr, weight_decay, momentum, nesterov
        self.buf = torch.zeros_like(params) if momentum else params.new_zeros(params.shape[0], 0)
        self.steps = [0] * params.shape[0]
        self.backend = "reference"

    def zero_grad(self) -> None:
        self.g.zero_()

    @torch.no_grad()
    def step(self, rows=None) -> None:
        rows = list(range(self.p.shape[0])) if rows is None else list(rows)
        for r in rows:
            self.steps[r] += 1
            sgd_step_reference(self.p[r], self.g[r], self.buf[r], self.lr, self.momentum, self.nesterov,
                               self.wd, self.steps[r])

    def state_dict(self) -> dict:
        return {"momentum_buffer": self.buf, "steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_dict(self, sd: dict) -> None:
        if "momentum_buffer" not in sd:
            raise ValueError("optimizer state is not SGD's (the checkpoint was written with another --optimizer)")
        self.buf.copy_(sd["momentum_buffer"])
        self.steps = [int(s) for s in sd["steps"]]


# -- choosing the client/server optimizer, learning-rate schedules ---------------------------------

def torch_optimizer(params, cfg, lr: float, wd: float) -> torch.optim.Optimizer:
    """The client/server optimizer of ``cfg`` (``--optimizer``, ``--momentum``, ``--nesterov``)
    as a torch optimizer (the reference engine)."""
    if getattr(cfg, "optimizer", "adam") == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def flat_optimizer(params: torch.Tensor, grads: torch.Tensor, cfg, lr: float, wd: float):
    """The same optimizer over flat [K, P] rows (the fused engine). ``cfg`` None: Adam."""
    if cfg is not None and getattr(cfg, "optimizer", "adam") == "sgd":
        return FlatSGD(params, grads, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
    return FlatAdam(params, grads, lr=lr, weight_decay=wd)


def parse_lr_schedule(spec: str):
    """``constant`` | ``cosine[:T]`` | ``multistep:M1,M2,...:GAMMA`` -> (kind, milestones, gamma);
    for cosine, milestones holds T (None: not resolved yet). ValueError with a one-line reason
    for anything else."""
    if not isinstance(spec, str):
        raise ValueError(f"expected a schedule name, got {spec!r}")
    if spec == "constant":
        return spec, (), 1.0
    parts = spec.split(":")
    if parts[0] == "cosine" and len(parts) <= 2:
        if len(parts) == 1:
            return "cosine", (None,), 1.0
        try:
            T = int(parts[1])
        except ValueError:
            T = 0
        if T < 1:
            raise ValueError(f"{spec!r}: cosine:T needs a positive number of rounds T")
        return "cosine", (T,), 1.0
    if parts[0] != "multistep":
        raise ValueError(f"unknown schedule {spec!r} (constant | cosine[:T] | multistep:M1,M2,...:GAMMA)")
    if len(parts) != 3:
        raise ValueError(f"{spec!r}: expected multistep:M1,M2,...:GAMMA (rounds, then the factor)")
    try:
        ms = tuple(int(m) for m in parts[1].split(","))
        gamma = float(parts[2])
    except ValueError:
        raise ValueError(f"{spec!r}: milestones must be integers and GAMMA a number") from None
    if any(m < 1 for m in ms) or list(ms) != sorted(set(ms)):
        raise ValueError(f"{spec!r}: milestones must be increasing positive round numbers")
    if not (gamma > 0 and gamma < float("inf")):
        raise ValueError(f"{spec!r}: GAMMA must be a positive number")
    return "multistep", ms, gamma


def lr_factor(spec: str, t: int, rounds: int) -> float:
    """The learning-rate multiplier of round t (0-based). multistep: GAMMA to the number of
    milestones <= t (torch's MultiStepLR stepped once per round); cosine:T: (1 + cos(pi t / T)) / 2
    (CosineAnnealingLR with eta_min 0 and T_max T, in closed form), 0 from round T on; plain
    ``cosine`` takes T = ``rounds`` (Config.resolved() writes it into the schedule, so a resumed
    run with more --rounds keeps its curve)."""
    import math

    kind, ms, gamma = parse_lr_schedule(spec)
    if kind == "multistep":
        return gamma ** sum(1 for m in ms if m <= t)
    if kind == "cosine":
        T = ms[0] or rounds
        return (1.0 + math.cos(math.pi * min(t, T) / T)) / 2.0
    return 1.0
