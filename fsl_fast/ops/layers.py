"""Fused client layers: ``pool_relu`` (ReLU + max-pool in one pass) and ``lrn`` (local response norm).

Why: on one CPU thread, torch's NCHW ``max_pool2d`` and ``LocalResponseNorm`` dominate the client
time of the small CNNs (LRN fwd+bwd on (64, 64, 32, 32) takes 379 ms in torch 2.13). The C++ kernels
in ``csrc/layers.cpp`` compute the same values; docs/layers.md has the contracts and measurements.

- ``pool_relu(x, kernel_size, stride, padding)``: ``relu(max_pool2d(x, k, s, p))`` for x float32
  or bfloat16 [N, C, H, W] -> [N, C, Ho, Wo] of x's dtype (-inf padding, floor sizes; bf16 is
  pooled exactly, its gradient summed in fp32 per cell and rounded once). This equals
  ``max_pool2d(relu(x), k, s, p)`` exactly, values and gradients: ReLU is monotone, so it commutes
  with max; where the window max is > 0 both route the gradient to the first maximal cell in scan
  order, and where it is <= 0 both give zero gradient (``relu``'s backward passes gradient only
  where its input is > 0). So it replaces a model's "ReLU then MaxPool2d" pair.
- ``lrn(x, size, alpha, beta, k)``: ``nn.LocalResponseNorm`` across channels for x float32
  [N, C, H, W] (same shape out).
- ``conv_pool_relu(x, weight, bias, kernel_size, stride, padding)``:
  ``max_pool2d(relu(conv2d(x, weight, bias, padding=K // 2)), kernel_size, stride, padding)`` for a
  square odd K x K stride-1 "same" convolution: the whole conv block of the small client CNNs in
  one pass (csrc/conv.cpp). Its backward visits only the conv-output cells the pool routes a
  gradient to (one per window at most), instead of two dense convolutions.

Backends: ``cpp`` (CPU tensors) and ``reference`` (torch's own kernels; used for CUDA tensors too,
which is fine: on a GPU torch's kernels are not the bottleneck these ops remove on a CPU).
``fuse_client_layers(module)`` rewrites a model to use both.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fsl_fast.ops import _backend
from fsl_fast.ops.library import ops

__all__ = [
    "pool_relu",
    "lrn",
    "pool_relu_reference",
    "lrn_reference",
    "conv_pool_relu",
    "conv_pool_relu_grouped",
    "conv_pool_relu_grouped_saving",
    "conv_pool_relu_grouped_backward",
    "conv_pool_relu_reference",
    "conv_pool_relu_supported",
    "PoolReLU",
    "LRN",
    "ConvPoolReLU",
    "fuse_client_layers",
]


# ---------------------------------------------------------------------------------------------
# argument checks (the same for every backend, so errors do not depend on the backend)


def _check_x(op: str, x, dtypes=(torch.float32,)) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)} "
                         f"(dtype {x.dtype})")
    if x.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: x must be {names}, got {x.dtype} with shape {tuple(x.shape)}")
    return x


def _as_int(op: str, name: str, v, lo: int) -> int:
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{op}: {name} must be one int (square windows only), got {v!r}")
        v = v[0]
    if isinstance(v, bool) or int(v) != v or int(v) < lo:
        raise ValueError(f"{op}: {name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _pool_args(x, kernel_size, stride, padding):
    _check_x("pool_relu", x, (torch.float32, torch.bfloat16))
    k = _as_int("pool_relu", "kernel_size", kernel_size, 1)
    s = k if stride is None else _as_int("pool_relu", "stride", stride, 1)
    p = _as_int("pool_relu", "padding", padding, 0)
    if 2 * p > k:
        raise ValueError(f"pool_relu: padding must be at most kernel_size / 2, got padding {p} "
                         f"for kernel_size {k}")
    h, w = x.shape[2], x.shape[3]
    if h + 2 * p < k or w + 2 * p < k:
        raise ValueError(f"pool_relu: input of shape {tuple(x.shape)} is smaller than "
                         f"kernel_size {k} with padding {p}")
    return k, s, p


def _lrn_args(x, size, alpha, beta, k):
    _check_x("lrn", x)
    n = _as_int("lrn", "size", size, 1)
    return n, float(alpha), float(beta), float(k)


# ---------------------------------------------------------------------------------------------
# references (plain PyTorch, the ground truth)


def pool_relu_reference(x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """``max_pool2d(relu(x))``, the order the models use (``== relu(max_pool2d(x))``)."""
    return F.max_pool2d(F.relu(x), kernel_size, stride, padding)


def lrn_reference(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    return F.local_response_norm(x, size, alpha, beta, k)


def conv_pool_relu_reference(x, weight, bias, kernel_size: int, stride: int, padding: int):
    """``max_pool2d(relu(conv2d(x, weight, bias, padding=K // 2)))``, the models' order."""
    return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=weight.shape[2] // 2)),
                        kernel_size, stride, padding)


# ---------------------------------------------------------------------------------------------
# C++ backend: torch.ops.fsl_fast.{pool_relu,lrn,conv_pool_relu}_{fwd,bwd}; the forward ops carry
# their autograd formulas (fsl_fast.ops.library)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """The C++ layer kernels are fp32: a bf16 input (autocast) is widened, exactly."""
    return x.float() if x.dtype == torch.bfloat16 else x


def _pool_relu_cpp(x, kernel_size, stride, padding):
    return ops().pool_relu_fwd(x.contiguous(), kernel_size, stride, padding)[0]


def _lrn_cpp(x, size, alpha, beta, k):
    return ops().lrn_fwd(x.contiguous(), size, alpha, beta, k)[0]


def _layout(x: torch.Tensor) -> torch.Tensor:
    """x as the C++ kernel takes it: contiguous NCHW, or channels-last when it already is."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _conv_block_apply(x, w, b, k, s, p, cl_out):
    bias = b if b is not None else w.new_empty(0)
    # without autograd (evaluation) the kernel skips the argmax it would save for the backward
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
    return ops().conv_pool_relu_fwd(_layout(x), w, bias, k, s, p, cl_out, save)[0]


def conv_pool_relu_supported(in_channels: int, kernel: int) -> bool:
    """Shapes the C++ kernel handles: K in (1, 3, 5) with K * Cin <= 64 floats per patch row, or
    K = 7 with K * Cin <= 32 (the first layers of small CNNs). Others run the reference."""
    rows = -(-kernel * in_channels // 16)
    return (kernel in (1, 3, 5) and rows <= 4) or (kernel == 7 and rows <= 2)


def _conv_pool_relu_cpp(x, weight, bias, kernel_size, stride, padding, channels_last_out=False):
    if not conv_pool_relu_supported(weight.shape[1], weight.shape[2]):
        return conv_pool_relu_reference(x, weight, bias, kernel_size, stride, padding)
    return _conv_block_apply(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                             kernel_size, stride, padding, bool(channels_last_out))


def _conv_pool_relu_ref(x, weight, bias, kernel_size, stride, padding, channels_last_out=False):
    return conv_pool_relu_reference(x, weight, bias, kernel_size, stride, padding)


_backend.register("conv_pool_relu", reference=_conv_pool_relu_ref, cpp=_conv_pool_relu_cpp)
_backend.register("pool_relu", reference=pool_relu_reference, cpp=_pool_relu_cpp)
_backend.register("lrn", reference=lrn_reference, cpp=_lrn_cpp)


# ---------------------------------------------------------------------------------------------
# public functions


def pool_relu(x: torch.Tensor, kernel_size, stride=None, padding=0, backend: str | None = None):
    """``relu(max_pool2d(x, kernel_size, stride, padding))``; x float32 or bfloat16 [N, C, H, W]
    (made contiguous if needed; the result has x's dtype), square windows, -inf padding, floor
    output size. Differentiable. ``stride=None`` means ``kernel_size`` (as in ``F.max_pool2d``)."""
    k, s, p = _pool_args(x, kernel_size, stride, padding)
    _, impl = _backend.resolve("pool_relu", x.device, backend)
    return impl(x, k, s, p)


def lrn(x: torch.Tensor, size, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
        backend: str | None = None):
    """Local response norm across channels with ``nn.LocalResponseNorm``'s semantics; x float32
    [N, C, H, W] (made contiguous if needed) -> same shape. Differentiable."""
    n, a, b, kk = _lrn_args(x, size, alpha, beta, k)
    _, impl = _backend.resolve("lrn", x.device, backend)
    return impl(x, n, a, b, kk)


def _conv_args(x, weight, bias):
    op = "conv_pool_relu"
    _check_x(op, x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{op}: weight must be a 4-D tensor [Cout, Cin, K, K], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    co, ci, kh, kw = weight.shape
    if ci != x.shape[1] or kh != kw or kh % 2 == 0:
        raise ValueError(f"{op}: weight must be [Cout, Cin={x.shape[1]}, K, K] with K odd, got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != torch.float32 or weight.device != x.device:
        raise TypeError(f"{op}: weight must be float32 on {x.device}, got {weight.dtype} on "
                        f"{weight.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (co,)
                             or bias.dtype != torch.float32 or bias.device != x.device):
        raise ValueError(f"{op}: bias must be None or float32 [{co}] on {x.device}, got "
                         f"{getattr(bias, 'shape', type(bias).__name__)}")


def conv_pool_relu_grouped(x: torch.Tensor, weight: torch.Tensor, bias, kernel_size: int,
                           stride: int, padding: int, channels_last_out: bool = False) -> torch.Tensor:
    """G clients' conv blocks in one call: x [G * B, Cin, H, W] (client g's samples are rows
    g*B .. g*B+B-1), weight [G, Cout, Cin, K, K], bias [G, Cout] or None. Differentiable in all
    three (gradients of weight and bias keep their [G, ...] shapes). CPU tensors, C++ kernel; the
    caller checks ``conv_pool_relu_supported`` (the fused engine's client batching)."""
    if weight.dim() != 5 or x.shape[0] % weight.shape[0] != 0:
        raise ValueError(f"conv_pool_relu_grouped: weight must be [G, Cout, Cin, K, K] with G "
                         f"dividing the batch {x.shape[0]}, got {tuple(weight.shape)}")
    _conv_args(x, weight[0], None if bias is None else bias[0])
    k, s, p = _pool_args(x, kernel_size, stride, padding)
    return _conv_block_apply(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                             k, s, p, bool(channels_last_out))


def conv_pool_relu_grouped_saving(x: torch.Tensor, weight: torch.Tensor, bias, kernel_size: int,
                                  stride: int, padding: int, channels_last_out: bool = False):
    """``conv_pool_relu_grouped``'s forward without autograd: ``(y, saved)``, where ``saved``
    holds what :func:`conv_pool_relu_grouped_backward` needs (pool argmax, the padded input, the
    weight). For callers that keep their own tape instead of an autograd graph (the fused engine's
    ``conv_blocks_taped`` executor). Arguments as ``conv_pool_relu_grouped``."""
    if weight.dim() != 5 or x.shape[0] % weight.shape[0] != 0:
        raise ValueError(f"conv_pool_relu_grouped_saving: weight must be [G, Cout, Cin, K, K] with G "
                         f"dividing the batch {x.shape[0]}, got {tuple(weight.shape)}")
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w.new_empty(0)
    x = _layout(x)
    y, idx, xp = ops().conv_pool_relu_fwd(x, w, b, kernel_size, stride, padding, bool(channels_last_out), True)
    return y, (idx, xp, w, (kernel_size, stride, padding), not x.is_contiguous())


def conv_pool_relu_grouped_backward(gy: torch.Tensor, saved, need_input_grad: bool = True):
    """Gradients ``(gx, gw [G, ...], gb [G, Cout])`` of a :func:`conv_pool_relu_grouped_saving`
    call given the gradient ``gy`` of its output; ``gx`` is undefined unless ``need_input_grad``."""
    idx, xp, w, pool, x_cl = saved
    return ops().conv_pool_relu_bwd(gy, idx, xp, w, bool(need_input_grad), *pool, x_cl)


def conv_pool_relu(x: torch.Tensor, weight: torch.Tensor, bias, kernel_size, stride=None,
                   padding=0, backend: str | None = None, channels_last_out: bool = False):
    """``max_pool2d(relu(conv2d(x, weight, bias, padding=K // 2)), kernel_size, stride, padding)``
    for x float32 [N, Cin, H, W], weight [Cout, Cin, K, K] (K odd, stride 1, zero padding K // 2),
    bias [Cout] or None. Differentiable in x, weight and bias. Pool arguments as ``pool_relu``.
    ``channels_last_out``: the C++ kernel may return y in channels-last memory (same values; the
    next conv block reads it without a transpose); other backends return NCHW."""
    _conv_args(x, weight, bias)
    k, s, p = _pool_args(x, kernel_size, stride, padding)
    _, impl = _backend.resolve("conv_pool_relu", x.device, backend)
    return impl(x, weight, bias, k, s, p, channels_last_out)


class PoolReLU(nn.Module):
    """Module form of :func:`pool_relu` (no parameters)."""

    def __init__(self, kernel_size, stride=None, padding=0, backend: str | None = None):
        super().__init__()
        self.kernel_size = _as_int("PoolReLU", "kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _as_int("PoolReLU", "stride", stride, 1)
        self.padding = _as_int("PoolReLU", "padding", padding, 0)
        self.backend = backend

    def forward(self, x):
        # bf16 activations (--precision bf16) are pooled in bf16: no widening copy in, and the
        # next autocast op takes the result as it is
        return pool_relu(x, self.kernel_size, self.stride, self.padding, backend=self.backend)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class LRN(nn.Module):
    """Module form of :func:`lrn`, a drop-in for ``nn.LocalResponseNorm`` (no parameters)."""

    def __init__(self, size, alpha=1e-4, beta=0.75, k=1.0, backend: str | None = None):
        super().__init__()
        self.size = _as_int("LRN", "size", size, 1)
        self.alpha, self.beta, self.k = float(alpha), float(beta), float(k)
        self.backend = backend

    def forward(self, x):
        return lrn(_fp32(x), self.size, self.alpha, self.beta, self.k, backend=self.backend)

    def extra_repr(self):
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class ConvPoolReLU(nn.Module):
    """``Conv2d`` (K odd, stride 1, padding K // 2) + ``ReLU`` + ``MaxPool2d`` as one module. Its
    parameters are named ``weight`` and ``bias`` like the Conv2d's, so in a Sequential where it
    takes the conv's slot the state_dict keys are unchanged."""

    def __init__(self, conv: nn.Conv2d, pool: nn.MaxPool2d, backend: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=conv.weight.requires_grad)
        self.bias = (None if conv.bias is None
                     else nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad))
        self.kernel_size = _as_int("ConvPoolReLU", "kernel_size", pool.kernel_size, 1)
        st = pool.stride if pool.stride is not None else pool.kernel_size
        self.stride = _as_int("ConvPoolReLU", "stride", st, 1)
        self.padding = _as_int("ConvPoolReLU", "padding", pool.padding, 0)
        self.backend = backend
        self.channels_last_out = False  # set by the rewriter when another conv block follows

    def forward(self, x):
        return conv_pool_relu(_fp32(x), self.weight, self.bias, self.kernel_size, self.stride,
                              self.padding, backend=self.backend,
                              channels_last_out=self.channels_last_out)

    def extra_repr(self):
        co, ci, k, _ = self.weight.shape
        return (f"{ci}, {co}, kernel={k}, bias={self.bias is not None}, pool=({self.kernel_size}, "
                f"{self.stride}, {self.padding})")


# ---------------------------------------------------------------------------------------------
# model rewriter


def _conv_fusable(m: nn.Module) -> bool:
    if type(m) is not nn.Conv2d or m.groups != 1 or m.padding_mode != "zeros":
        return False
    k = m.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0 or tuple(m.stride) != (1, 1) or tuple(m.dilation) != (1, 1):
        return False
    if isinstance(m.padding, str) or tuple(m.padding) != (k[0] // 2, k[0] // 2):
        return False
    return m.weight.dtype == torch.float32 and conv_pool_relu_supported(m.in_channels, k[0])


def _pool_fusable(m: nn.Module) -> bool:
    if not isinstance(m, nn.MaxPool2d) or m.ceil_mode or m.return_indices:
        return False
    d = m.dilation if isinstance(m.dilation, int) else tuple(m.dilation)
    if d not in (1, (1, 1)):
        return False
    try:
        for v in (m.kernel_size, m.stride if m.stride is not None else m.kernel_size, m.padding):
            _as_int("", "", v, 0)
    except ValueError:
        return False  # non-square windows stay torch's
    return True


def _rewrite(seq: nn.Module, backend: str | None) -> None:
    for name, child in list(seq.named_children()):
        if isinstance(child, nn.LocalResponseNorm):
            setattr(seq, name, LRN(child.size, child.alpha, child.beta, child.k, backend=backend))
        else:
            _rewrite(child, backend)
    if not isinstance(seq, nn.Sequential):
        return
    names = [n for n, _ in seq.named_children()]
    i = 0
    while i + 1 < len(names):
        a, b = getattr(seq, names[i]), getattr(seq, names[i + 1])
        c = getattr(seq, names[i + 2]) if i + 2 < len(names) else None
        if _conv_fusable(a) and c is not None and type(b) is nn.ReLU and _pool_fusable(c):
            # Conv, ReLU, MaxPool: the block becomes ConvPoolReLU in the conv's slot (same
            # parameter names) and two Identities (no state), so every key stays the same.
            setattr(seq, names[i], ConvPoolReLU(a, c, backend=backend))
            setattr(seq, names[i + 1], nn.Identity())
            setattr(seq, names[i + 2], nn.Identity())
            i += 3
        elif type(a) is nn.ReLU and _pool_fusable(b):
            # The ReLU slot becomes an Identity (no parameters, no state keys) so the Sequential
            # keeps its indices: parameters after the pair keep their state_dict keys.
            setattr(seq, names[i], nn.Identity())
            setattr(seq, names[i + 1], PoolReLU(b.kernel_size, b.stride, b.padding, backend=backend))
            i += 2
        elif type(a) is nn.ReLU and isinstance(b, LRN) and c is not None and _pool_fusable(c):
            # ReLU, LRN, MaxPool (simple_conv's second block): the pool's input is >= 0, so the
            # pool may as well be a PoolReLU: equal values, and equal gradients, because where a
            # window's max is 0 every cell is 0, so LRN's input there is 0, and the gradient
            # torch's pool routes to that cell dies in LRN (its cross term is g * x * ... = 0) and
            # in ReLU (whose backward passes nothing where its output is 0).
            setattr(seq, names[i + 2], PoolReLU(c.kernel_size, c.stride, c.padding, backend=backend))
            i += 3
        else:
            i += 1
    # a conv block whose next module (past Identities) is another conv block hands it
    # channels-last activations: the consumer copies rows instead of transposing
    mods = [m for m in seq.children() if not isinstance(m, nn.Identity)]
    for a, b in zip(mods, mods[1:]):
        if isinstance(a, ConvPoolReLU) and isinstance(b, ConvPoolReLU):
            a.channels_last_out = True


def fuse_client_layers(module: nn.Module, backend: str | None = None) -> nn.Module:
    """A deep copy of ``module`` in which every fusable ``nn.Conv2d`` (K odd, stride 1, padding
    K // 2, a shape ``conv_pool_relu_supported`` accepts) directly followed by ``nn.ReLU`` and a
    fusable ``nn.MaxPool2d`` becomes ``ConvPoolReLU, Identity, Identity``, every other ``nn.ReLU``
    directly followed by a fusable
    ``nn.MaxPool2d`` (square window, no dilation/ceil_mode/indices) inside an ``nn.Sequential``
    (at any depth) becomes ``Identity, PoolReLU``, every ``nn.LocalResponseNorm`` becomes ``LRN``,
    and in ``ReLU, LRN, MaxPool2d`` the pool becomes a ``PoolReLU`` (its input is >= 0; values
    and gradients are equal, see the comment in ``_rewrite``). Parameters and buffers are copied
    (nothing shared with ``module``), and state_dict keys are unchanged, so state dicts load both
    ways. ``backend`` is passed to the new modules.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse_client_layers: module must be an nn.Module, got {type(module).__name__}")
    out = copy.deepcopy(module)
    if isinstance(out, nn.LocalResponseNorm):
        return LRN(out.size, out.alpha, out.beta, out.k, backend=backend)
    _rewrite(out, backend)
    return out
