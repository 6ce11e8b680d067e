"""Auxiliary-model gradient estimate and alignment for a linear head, in closed form.

FSL-SAGE (ALGORITHM.md §2) needs, for an auxiliary model ``a`` on cut-layer activations ``feat``:

- the *estimate* ``g_hat = d CE_mean(a(feat), y) / d feat`` (clients backpropagate it), and
- the *alignment* loss ``sum((g_hat - target)^2)`` and its gradient with respect to ``a``'s
  parameters (the server trains ``a`` so that ``g_hat`` matches the server's true gradient).

For a linear head (flatten, or global average pool, then ``Linear(D -> C)``) both have closed forms
(PERF.md, "Closed form of the linear auxiliary head"); the kernels compute them in one pass per row
block without writing logits to memory. The reference is autograd exactly as the authors do it
(``torch.autograd.grad(..., create_graph=True)`` then ``mse_loss(reduction='sum').backward()``).

Scaling (``grad_scale``). ALGORITHM.md §2: alignment targets are gradients of the *buffer* mean
(they carry 1/N_buf) while predictions are gradients of the *align-batch* mean (1/B_align); the
official code only agrees because both sizes are 1000. ``grad_scale`` multiplies ``g_hat``:
``g_hat = grad_scale * d CE_mean / d feat``. The default 1.0 is the official semantics; an engine
that aligns on batches smaller than its buffer passes ``grad_scale = B_align / N_buf`` so that both
sides carry 1/N_buf by construction. The same factor applies to the estimate.

Shapes (one client): ``feat`` [B, D] or [B, Cin, *spatial]; ``weight`` [C, D]; ``bias`` [C];
``labels`` [B] (integer); ``target`` like ``feat``. ``pool=True`` averages ``feat`` over all dims after
the second (``D = Cin``) and spreads the estimate evenly back over them; ``pool=False`` flattens.
Batched form (the fused engine: K clients at once): ``weight`` [K, C, D] selects it; then ``feat``
[K, B, ...], ``bias`` [K, C], ``labels`` [K, B], ``target`` like ``feat``; the loss is [K].
Dtypes: float32 everywhere; float64 on the reference and C++ backends (auto dispatch sends other
dtypes on CUDA to the reference).

Pooled closed form. With S pooled positions, ``u = G W`` and ``g_hat = u / S`` at every position:
``sum_s (u/S - T_s)^2 = S (u/S - mean_s T)^2 + sum_s (T_s - mean_s T)^2``. So the kernels see the
pooled features and the pooled target mean, weight their loss by S, and the second (parameter-free)
term is added here; ``d loss / d u = 2 (u/S - mean_s T)``.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from fsl_fast.ops import _backend, triton_ops

__all__ = [
    "aux_estimate",
    "aux_align",
    "aux_estimate_reference",
    "aux_align_reference",
    "AuxAlign",
    "align_step_grads",
]


# ---------------------------------------------------------------------------------------------
# Validation and normalisation (shared by every backend)


def _check(feat, weight, bias, labels, target, pool):
    """Validate; return (batched, K, B, C, D, S) with S the number of pooled positions."""
    if not isinstance(feat, torch.Tensor) or not feat.is_floating_point():
        raise TypeError(f"aux: feat must be a floating tensor, got "
                        f"{getattr(feat, 'dtype', type(feat).__name__)}")
    if weight.dim() not in (2, 3):
        raise ValueError(f"aux: weight must be [C, D] or [K, C, D], got shape {tuple(weight.shape)}")
    batched = weight.dim() == 3
    lead = 2 if batched else 1  # leading dims of feat before the feature dims: (K, B) or (B,)
    if feat.dim() < lead + 1:
        raise ValueError(f"aux: feat must be {'[K, B, ...]' if batched else '[B, ...]'} with at "
                         f"least one feature dim, got shape {tuple(feat.shape)}")
    K = weight.shape[0] if batched else 1
    C = weight.shape[-2]
    B = feat.shape[lead - 1]
    if batched and feat.shape[0] != K:
        raise ValueError(f"aux: feat has {feat.shape[0]} clients, weight {K} "
                         f"(feat {tuple(feat.shape)}, weight {tuple(weight.shape)})")
    fdims = feat.shape[lead:]
    if pool:
        if len(fdims) < 2:
            raise ValueError(f"aux: pool=True needs feat [.., B, Cin, *spatial], got {tuple(feat.shape)}")
        D, S = fdims[0], 1
        for n in fdims[1:]:
            S *= n
    else:
        D, S = 1, 1
        for n in fdims:
            D *= n
    if weight.shape[-1] != D:
        raise ValueError(f"aux: weight {tuple(weight.shape)} expects D={weight.shape[-1]} features, "
                         f"feat {tuple(feat.shape)} gives D={D} (pool={pool})")
    if C < 1:
        raise ValueError(f"aux: weight has no classes, shape {tuple(weight.shape)}")
    want_b = (K, C) if batched else (C,)
    if tuple(bias.shape) != want_b:
        raise ValueError(f"aux: bias must be {list(want_b)}, got {tuple(bias.shape)}")
    want_y = (K, B) if batched else (B,)
    if tuple(labels.shape) != want_y:
        raise ValueError(f"aux: labels must be {list(want_y)}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"aux: labels must be an integer tensor, got {labels.dtype}")
    others = [("weight", weight), ("bias", bias)] + ([("target", target)] if target is not None else [])
    for name, t in others:
        if t.dtype != feat.dtype:
            raise TypeError(f"aux: {name} dtype {t.dtype} differs from feat dtype {feat.dtype}")
        if t.device != feat.device:
            raise ValueError(f"aux: {name} is on {t.device}, feat on {feat.device}")
    if labels.device != feat.device:
        raise ValueError(f"aux: labels are on {labels.device}, feat on {feat.device}")
    if target is not None and target.shape != feat.shape:
        raise ValueError(f"aux: target must have feat's shape {tuple(feat.shape)}, got {tuple(target.shape)}")
    if B < 1:
        raise ValueError(f"aux: empty batch, feat shape {tuple(feat.shape)}")
    lo, hi = torch.aminmax(labels.reshape(-1))
    if int(lo) < 0 or int(hi) >= C:
        raise ValueError(f"aux: labels must lie in [0, {C}), found range [{int(lo)}, {int(hi)}]")
    return batched, K, B, C, D, S


def _flat(feat, target, K, B, D, S, pool):
    """Kernel inputs: x [K, B, D] (pooled or flattened), target mean [K, B, D], and the
    parameter-free part of the pooled loss (within-pool variance of the target) per client."""
    x = feat.reshape(K, B, D, S)
    t = None if target is None else target.reshape(K, B, D, S)
    if pool and S > 1:
        x = x.mean(-1)
        if t is not None:
            tm = t.mean(-1)
            var = (t - tm.unsqueeze(-1)).square().sum((1, 2, 3))
            return x.contiguous(), tm.contiguous(), var
    x = x.reshape(K, B, D).contiguous()
    t = None if t is None else t.reshape(K, B, D).contiguous()
    return x, t, None


def _unflat(g, feat_shape, K, B, D, S, pool):
    if pool and S > 1:
        g = g.unsqueeze(-1).expand(K, B, D, S)
    return g.reshape(feat_shape).contiguous()


def _batch(weight, bias, labels, batched):
    if batched:
        return weight.contiguous(), bias.contiguous(), labels.to(torch.int64).contiguous()
    return (weight.unsqueeze(0).contiguous(), bias.unsqueeze(0).contiguous(),
            labels.to(torch.int64).reshape(1, -1).contiguous())


# ---------------------------------------------------------------------------------------------
# Reference: autograd as the authors' code does it (one client at a time)


def _ref_client(f, w, b, y, t, pool, grad_scale, need_align):
    with torch.enable_grad():
        f = f.detach().requires_grad_(True)
        w = w.detach().requires_grad_(need_align)
        b = b.detach().requires_grad_(need_align)
        x = f.flatten(2).mean(-1) if pool else f.flatten(1)
        ce = F.cross_entropy(F.linear(x, w, b), y) * grad_scale
        (g,) = torch.autograd.grad(ce, f, create_graph=need_align)
        if not need_align:
            return g.detach()
        loss = F.mse_loss(g, t, reduction="sum")
        dW, db = torch.autograd.grad(loss, (w, b))
    return loss.detach(), dW, db


def aux_estimate_reference(feat, weight, bias, labels, pool=False, grad_scale=1.0):
    """Autograd estimate (same arguments and shapes as :func:`aux_estimate`)."""
    batched, K, B, C, D, S = _check(feat, weight, bias, labels, None, pool)
    if not batched:
        return _ref_client(feat, weight, bias, labels.long(), None, pool, grad_scale, False)
    return torch.stack([_ref_client(feat[k], weight[k], bias[k], labels[k].long(), None, pool,
                                    grad_scale, False) for k in range(K)])


def aux_align_reference(feat, weight, bias, labels, target, pool=False, grad_scale=1.0):
    """Autograd double backward (same arguments and shapes as :func:`aux_align`)."""
    batched, K, B, C, D, S = _check(feat, weight, bias, labels, target, pool)
    if not batched:
        return _ref_client(feat, weight, bias, labels.long(), target, pool, grad_scale, True)
    outs = [_ref_client(feat[k], weight[k], bias[k], labels[k].long(), target[k], pool, grad_scale,
                        True) for k in range(K)]
    return tuple(torch.stack(o) for o in zip(*outs))


# ---------------------------------------------------------------------------------------------
# Kernel backends: all take the normalised batched form and return kernel outputs.


def _ext_estimate(x, w, b, y, inv_spread, scale):
    # torch.ops dispatches on the device: the CPU kernel (csrc/aux.cpp) or CUDA (csrc/aux_kernels.cu).
    _backend.extension()
    return torch.ops.fsl_fast.aux_estimate(x, w, b, y, inv_spread, scale)


def _ext_align(x, w, b, y, t, spread, scale):
    _backend.extension()
    return torch.ops.fsl_fast.aux_align(x, w, b, y, t, spread, scale)


def _triton_estimate(x, w, b, y, inv_spread, scale):
    return triton_ops.ops().aux_estimate(x, w, b, y, float(inv_spread), float(scale))


def _triton_align(x, w, b, y, t, spread, scale):
    return triton_ops.ops().aux_align(x, w, b, y, t, float(spread), float(scale))


def closed_form_estimate(x, w, b, y, inv_spread, scale):
    """Closed form in plain torch ops on the normalised batched form (benchmarks compile this)."""
    p = torch.softmax(torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)), -1)
    G = (p - F.one_hot(y, w.shape[1]).to(p.dtype)) * scale
    return torch.bmm(G, w) * inv_spread


def closed_form_align(x, w, b, y, t, spread, scale):
    """PERF.md closed form in plain torch ops on the normalised batched form."""
    p = torch.softmax(torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)), -1)
    G = (p - F.one_hot(y, w.shape[1]).to(p.dtype)) * scale
    diff = torch.bmm(G, w) / spread - t
    loss = diff.square().sum((1, 2)) * spread
    R = 2 * diff
    dP = torch.bmm(R, w.transpose(1, 2))
    dz = scale * p * (dP - (dP * p).sum(-1, keepdim=True))
    dW = torch.bmm(G.transpose(1, 2), R) + torch.bmm(dz.transpose(1, 2), x)
    return loss, dW, dz.sum(1)


_KERNEL_EST = {"cpp": _ext_estimate, "cuda": _ext_estimate, "triton": _triton_estimate}
_KERNEL_ALIGN = {"cpp": _ext_align, "cuda": _ext_align, "triton": _triton_align}
# Which dtypes each kernel backend computes in; auto dispatch sends other dtypes to the reference.
_KERNEL_DTYPES = {"cpp": (torch.float32, torch.float64), "cuda": (torch.float32,),
                  "triton": (torch.float32,)}


def _pick(op, feat, backend):
    name, impl = _backend.resolve(op, feat.device, backend)
    if name != "reference" and feat.dtype not in _KERNEL_DTYPES[name]:
        asked = backend or os.environ.get(_backend.ENV_BACKEND)
        if asked and asked != "auto":
            raise _backend.BackendUnavailable(
                f"{op}: backend {name!r} computes in {[str(d) for d in _KERNEL_DTYPES[name]]}, "
                f"feat is {feat.dtype}")
        return _backend.resolve(op, feat.device, "reference")
    return name, impl


def _kernel_estimate(name, feat, weight, bias, labels, pool=False, grad_scale=1.0):
    # The kernels are not differentiable ops: inputs enter as data (AuxAlign wraps the gradient).
    feat, weight, bias = feat.detach(), weight.detach(), bias.detach()
    batched, K, B, C, D, S = _check(feat, weight, bias, labels, None, pool)
    x, _, _ = _flat(feat, None, K, B, D, S, pool)
    w, b, y = _batch(weight, bias, labels, batched)
    g = _KERNEL_EST[name](x, w, b, y, 1.0 / S, float(grad_scale) / B)
    return _unflat(g, feat.shape, K, B, D, S, pool)


def _kernel_align(name, feat, weight, bias, labels, target, pool=False, grad_scale=1.0):
    feat, weight, bias, target = feat.detach(), weight.detach(), bias.detach(), target.detach()
    batched, K, B, C, D, S = _check(feat, weight, bias, labels, target, pool)
    x, t, var = _flat(feat, target, K, B, D, S, pool)
    w, b, y = _batch(weight, bias, labels, batched)
    loss, dW, db = _KERNEL_ALIGN[name](x, w, b, y, t, float(S), float(grad_scale) / B)
    if var is not None:
        loss = loss + var
    if not batched:
        return loss[0], dW[0], db[0]
    return loss, dW, db


# The registry holds public-signature implementations; the reference is the autograd one.
_backend.register("aux_estimate", reference=aux_estimate_reference,
                  **{k: functools.partial(_kernel_estimate, k) for k in _KERNEL_EST})
_backend.register("aux_align", reference=aux_align_reference,
                  **{k: functools.partial(_kernel_align, k) for k in _KERNEL_ALIGN})


# ---------------------------------------------------------------------------------------------
# Public API


def aux_estimate(feat, weight, bias, labels, pool=False, backend=None, grad_scale=1.0):
    """``g_hat = grad_scale * d CE_mean(Linear(pool_or_flatten(feat)), labels) / d feat``.

    Args:
        feat: [B, D] or [B, Cin, *spatial] (or [K, B, ...] with a batched ``weight``), float.
        weight: [C, D] or [K, C, D]; bias: [C] or [K, C]; labels: [B] or [K, B], integer in [0, C).
        pool: average ``feat`` over its spatial dims (D = Cin) instead of flattening it.
        backend: None (auto / ``FSL_FAST_BACKEND``), "reference", "cpp", "cuda" or "triton".
        grad_scale: multiplies ``g_hat`` (see the module doc on 1/N_buf versus 1/B_align).
    Returns:
        ``g_hat`` shaped and typed like ``feat`` (spread evenly over the pooled positions).
    """
    _, impl = _pick("aux_estimate", feat, backend)
    return impl(feat, weight, bias, labels, pool=pool, grad_scale=grad_scale)


def aux_align(feat, weight, bias, labels, target, pool=False, backend=None, grad_scale=1.0):
    """Alignment loss ``sum((g_hat - target)^2)`` and its gradients ``(loss, dW, db)``.

    Same arguments as :func:`aux_estimate` plus ``target`` (shaped like ``feat``). Returns ``loss``
    (0-d, or [K] in the batched form), ``dW`` like ``weight`` and ``db`` like ``bias``. ``dW`` is
    reduced in a fixed order on every backend (run-to-run identical, no atomics).
    """
    _, impl = _pick("aux_align", feat, backend)
    return impl(feat, weight, bias, labels, target, pool=pool, grad_scale=grad_scale)


class AuxAlign(torch.autograd.Function):
    """Autograd-compatible alignment loss: ``AuxAlign.apply(weight, bias, feat, labels, target,
    pool, grad_scale, backend) -> loss``; ``loss.backward()`` fills ``weight.grad``/``bias.grad``
    with the closed-form gradients (``feat`` and ``target`` are treated as data: no gradient).
    With a batched ``weight`` [K, C, D] the loss is [K]; ``loss.sum().backward()`` gives each
    client its own gradient."""

    @staticmethod
    def forward(ctx, weight, bias, feat, labels, target, pool=False, grad_scale=1.0, backend=None):
        loss, dW, db = aux_align(feat.detach(), weight.detach(), bias.detach(), labels,
                                 target.detach(), pool=pool, backend=backend, grad_scale=grad_scale)
        ctx.save_for_backward(dW, db)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dW, db = ctx.saved_tensors
        if grad_loss.dim() == 0:
            return dW * grad_loss, db * grad_loss, None, None, None, None, None, None
        return (dW * grad_loss.view(-1, 1, 1), db * grad_loss.view(-1, 1),
                None, None, None, None, None, None)


def align_step_grads(aux_linear, feat, labels, target, pool=False, grad_scale=1.0, backend=None):
    """Set ``aux_linear.weight.grad`` / ``.bias.grad`` to the alignment gradients (replacing any
    previous ``.grad``, as after ``zero_grad()`` + ``backward()``) and return the loss (detached),
    so that ``optimizer.step()`` takes the alignment step."""
    w, b = aux_linear.weight, aux_linear.bias
    if b is None:
        raise ValueError("align_step_grads: the auxiliary Linear must have a bias")
    loss, dW, db = aux_align(feat.detach(), w.detach(), b.detach(), labels, target.detach(),
                             pool=pool, backend=backend, grad_scale=grad_scale)
    w.grad = dW
    b.grad = db
    return loss
