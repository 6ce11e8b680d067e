"""The C++/CUDA ops of fsl_fast as torch.library citizens.

The extension (csrc/) defines each op's schema and registers its kernels by dispatch key: CPU
(C++/OpenMP) and, when compiled in, CUDA. This module adds, once the extension is loaded
(:func:`fsl_fast.ops._backend.extension` calls :func:`register`):

- a fake kernel for every op (output shapes, dtypes and layouts without computing: FakeTensor,
  the meta device, ``torch.compile``); ``aux_estimate``/``aux_align`` have C++ Meta kernels;
- autograd formulas for the differentiable forward ops (``pool_relu_fwd``, ``lrn_fwd``,
  ``conv_pool_relu_fwd``): their backward is the matching ``*_bwd`` op, itself not differentiable
  (double backward raises, naming ``once_differentiable``).

``OPS`` names every op of the ``fsl_fast`` namespace; tests/test_opcheck.py runs
``torch.library.opcheck`` on each and fails if the extension defines an op not listed here.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

NS = "fsl_fast"
# op -> what registers its fake kernel ("python" here, "meta" in C++)
OPS = {
    "adam_step": "python",
    "aux_estimate": "meta",
    "aux_align": "meta",
    "conv_pool_relu_fwd": "python",
    "conv_pool_relu_bwd": "python",
    "fedavg": "python",
    "fedavg_broadcast": "python",
    "lrn_fwd": "python",
    "lrn_bwd": "python",
    "pool_relu_fwd": "python",
    "pool_relu_bwd": "python",
    "quantize_rows_": "python",
    "quantize_dequantize_": "python",
    "topk_rows_": "python",
}

_done: list = []


def defined_ops() -> list[str]:
    """Every op the loaded extension defines in the ``fsl_fast`` namespace (overload names dropped)."""
    names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith(NS + "::")}
    return sorted(names)


def ops():
    """``torch.ops.fsl_fast`` with the extension loaded (its kernels and these registrations)."""
    from fsl_fast.ops import _backend

    _backend.extension()
    return torch.ops.fsl_fast


# ---------------------------------------------------------------------------------------------
# Fake kernels


def _pool_out(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


def _fmt(cl: bool):
    return torch.channels_last if cl else torch.contiguous_format


def _pool_relu_fwd_fake(x, kernel_size, stride, padding):
    n, c, h, w = x.shape
    shape = (n, c, _pool_out(h, kernel_size, stride, padding), _pool_out(w, kernel_size, stride, padding))
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int32)


def _pool_relu_bwd_fake(grad_y, idx, H, W):
    return grad_y.new_empty((grad_y.shape[0], grad_y.shape[1], H, W))


def _lrn_fwd_fake(x, size, alpha, beta, k):
    return torch.empty_like(x), torch.empty_like(x)


def _lrn_bwd_fake(grad_y, x, s, size, alpha, beta, k):
    return torch.empty_like(x)


def _conv_pool_relu_fwd_fake(x, weight, bias, kernel_size, stride, padding, channels_last_out=False,
                             save_for_backward=True):
    n, ci, h, w = x.shape
    co, K = weight.shape[-4], weight.shape[-1]
    shape = (n, co, _pool_out(h, kernel_size, stride, padding), _pool_out(w, kernel_size, stride, padding))
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_fmt(channels_last_out))
    idx = (torch.empty(shape, dtype=torch.int32, device=x.device, memory_format=_fmt(channels_last_out))
           if save_for_backward else x.new_empty((0,), dtype=torch.int32))
    q = K // 2
    xp = x.new_empty((n, h + 2 * q, w + 2 * q, ci))  # padded channels-last input (C++: with slack)
    return y, idx, xp


def _conv_pool_relu_bwd_fake(grad_y, idx, xp, weight, need_x, kernel_size=0, stride=0, padding=0,
                             grad_x_channels_last=False):
    n, co = grad_y.shape[0], grad_y.shape[1]
    K = weight.shape[-1]
    q = K // 2
    h, w, ci = xp.shape[1] - 2 * q, xp.shape[2] - 2 * q, xp.shape[3]
    g = weight.shape[0] if weight.dim() == 5 else 1
    gw = weight.new_empty(weight.shape)
    gb = weight.new_empty((g, co)) if weight.dim() == 5 else weight.new_empty((co,))
    gx = (torch.empty((n, ci, h, w), dtype=xp.dtype, device=xp.device, memory_format=_fmt(grad_x_channels_last))
          if need_x else xp.new_empty((0,)))
    return gx, gw, gb


def _nothing(*args, **kwargs):
    """In-place ops (``Tensor(a!)`` outputs, ``-> ()``): nothing to allocate."""
    return None


_FAKES = {
    "pool_relu_fwd": _pool_relu_fwd_fake,
    "pool_relu_bwd": _pool_relu_bwd_fake,
    "lrn_fwd": _lrn_fwd_fake,
    "lrn_bwd": _lrn_bwd_fake,
    "conv_pool_relu_fwd": _conv_pool_relu_fwd_fake,
    "conv_pool_relu_bwd": _conv_pool_relu_bwd_fake,
    "adam_step": _nothing,
    "fedavg": _nothing,
    "fedavg_broadcast": _nothing,
    "quantize_rows_": _nothing,
    "quantize_dequantize_": _nothing,
    "topk_rows_": _nothing,
}


# ---------------------------------------------------------------------------------------------
# Autograd
#
# Every setup turns off the materialization of missing output gradients: the ops' second and third
# outputs (LRN's s, the conv block's padded input) are saved state that no loss reads, and
# autograd would otherwise fill a zero gradient of their full size on every backward (measured:
# 1.7-1.8 ms per LRN call on simple_conv's [128, 64, 16, 16] activations, three per client step).


def _pool_relu_setup(ctx, inputs, output):
    x = inputs[0]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.hw = (x.shape[2], x.shape[3])
    ctx.mark_non_differentiable(output[1])


@once_differentiable  # the C++ backward has no derivative; double backward raises clearly
def _pool_relu_backward(ctx, gy, _gidx):
    if gy is None:
        return None, None, None, None
    (idx,) = ctx.saved_tensors
    gx = torch.ops.fsl_fast.pool_relu_bwd(gy.contiguous(), idx, ctx.hw[0], ctx.hw[1])
    return gx, None, None, None


def _lrn_setup(ctx, inputs, output):
    x, size, alpha, beta, k = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, output[1])
    ctx.args = (size, alpha, beta, k)
    ctx.mark_non_differentiable(output[1])


@once_differentiable
def _lrn_backward(ctx, gy, _gs):
    if gy is None:
        return None, None, None, None, None
    x, s = ctx.saved_tensors
    gx = torch.ops.fsl_fast.lrn_bwd(gy.contiguous(), x, s, *ctx.args)
    return gx, None, None, None, None


def _conv_setup(ctx, inputs, output):
    x, w, b, k, s, p = inputs[:6]
    save = inputs[7] if len(inputs) > 7 else True
    y, idx, xp = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(idx, xp, w)
    ctx.pool = (k, s, p)
    ctx.saved_argmax = bool(save)
    # grad_x comes back in x's layout (channels-last from a previous conv block)
    ctx.x_cl = not x.is_contiguous()
    ctx.mark_non_differentiable(idx, xp)


@once_differentiable
def _conv_backward(ctx, gy, _gidx, _gxp):
    if not ctx.saved_argmax:
        raise RuntimeError("conv_pool_relu_fwd: called with save_for_backward=False, so it cannot "
                           "be differentiated")
    if gy is None:
        return (None,) * 8
    idx, xp, w = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw, gb = torch.ops.fsl_fast.conv_pool_relu_bwd(gy, idx, xp, w, bool(need_x), *ctx.pool, ctx.x_cl)
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None,
            None, None, None, None, None)


_AUTOGRAD = {
    "pool_relu_fwd": (_pool_relu_backward, _pool_relu_setup),
    "lrn_fwd": (_lrn_backward, _lrn_setup),
    "conv_pool_relu_fwd": (_conv_backward, _conv_setup),
}


def register() -> None:
    """Fake kernels and autograd formulas for the ops the extension defines (idempotent)."""
    if _done:
        return
    _done.append(True)
    have = set(defined_ops())
    for name, fn in _FAKES.items():
        if name in have:
            torch.library.register_fake(f"{NS}::{name}", fn)
    for name, (backward, setup) in _AUTOGRAD.items():
        if name in have:
            torch.library.register_autograd(f"{NS}::{name}", backward, setup_context=setup)
