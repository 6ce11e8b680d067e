"""Alignment of convolutional auxiliary models (the paper's ResNet-18 ``layer3`` auxiliary), fast.

The alignment step (ALGORITHM.md §2) trains an auxiliary model ``a = fc o avgpool o trunk`` so that
its input gradient ``g_hat = d CE_mean(a(Z), Y) / dZ`` matches targets ``T``: loss
``sum((g_hat - T)^2)`` and its gradient with respect to every parameter of ``trunk`` and ``fc``.
The authors compute it by reverse-over-reverse autograd on the nn.Module
(:func:`conv_align_reference`).

:func:`conv_align_grads` computes the same loss and gradients faster by *lowering* the trunk
before differentiating it twice:

- the trunk works on activations laid out as rows ``[B, P, C]`` (P = H*W positions, channels
  last), so every convolution is a plain GEMM and BatchNorm statistics are column reductions;
- a convolution whose input has no more positions than the kernel has taps (``H*W <= kh*kw``:
  layer3's 3x3 convolutions on 2x2 maps) becomes one dense ``[P_out*C_out, P*C_in]`` matrix
  gathered from the kernel: 5 of the 9 taps of every output are padding there, so the dense GEMM
  does 1.05M instead of 2.36M multiply-adds per sample, at GEMM speed;
- 1x1 convolutions are a strided slice and a GEMM; other convolutions are unfold + GEMM;
- BatchNorm (train mode: batch statistics, which depend on Z and so enter the second derivative)
  is written with mean/rsqrt ops whose double backward is cheap, where the double backward of
  ``native_batch_norm`` took ~20% of the reference's time on (256, 256, 2, 2) activations.

Train-mode BatchNorm updates its running statistics exactly once per call, as the reference's
single forward pass does (momentum or cumulative average, ``num_batches_tracked`` + 1).

Supported trunks: ``nn.Sequential`` (nested allowed) of ``Conv2d`` (groups=1, dilation=1),
``BatchNorm2d``, ``ReLU`` and torchvision-style BasicBlocks (attributes ``conv1, bn1, conv2, bn2,
downsample``). Anything else runs the reference (:func:`lowerable` says which).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BasicBlock",
    "Layer3Aux",
    "lowerable",
    "conv_align_reference",
    "conv_align_grads",
    "conv_align_step",
]


# ---------------------------------------------------------------------------------------------
# The paper's layer3 auxiliary (self-contained; the lead's models.py builds the same structure)


class BasicBlock(nn.Module):
    """torchvision-style ResNet BasicBlock (3x3 conv-BN-ReLU, 3x3 conv-BN, residual, ReLU)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Layer3Aux(nn.Module):
    """ResNet-18 layer3 (128 -> 256, stride 2) + global average pool + fc(256 -> C), on the
    (B, 128, 4, 4) cut activations of the paper's resnet18 split. ``pool = True``."""

    pool = True

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.trunk = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256, 1))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, z):
        return self.fc(self.trunk(z).mean((2, 3)))


# ---------------------------------------------------------------------------------------------
# Reference: the authors' reverse-over-reverse autograd


def _params(trunk, fc):
    return list(trunk.parameters()) + [fc.weight, fc.bias]


def conv_align_reference(trunk, fc, Z, Y, T, grad_scale: float = 1.0):
    """``(loss, grads)`` by autograd double backward on the modules, as the official code does:
    ``g_hat = grad(CE_mean(fc(pool(trunk(Z))), Y), Z, create_graph=True)``,
    ``loss = mse_loss(g_hat, T, reduction='sum')``; ``grads`` aligned with
    ``list(trunk.parameters()) + [fc.weight, fc.bias]``. Modules keep their train/eval mode."""
    params = _params(trunk, fc)
    with torch.enable_grad():
        z = Z.detach().requires_grad_(True)
        out = fc(trunk(z).flatten(2).mean(-1))
        ce = F.cross_entropy(out, Y) * grad_scale
        (g,) = torch.autograd.grad(ce, z, create_graph=True)
        loss = F.mse_loss(g, T, reduction="sum")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if d is None else d for p, d in zip(params, grads))
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------------
# Lowering


def _is_block(m) -> bool:
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2", "downsample"))


def _conv_ok(m) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.dilation == (1, 1)
            and m.padding_mode == "zeros" and isinstance(m.padding, tuple))


def lowerable(trunk: nn.Module) -> bool:
    """Whether :func:`conv_align_grads` lowers ``trunk`` (else it runs the reference)."""
    if isinstance(trunk, nn.Sequential):
        return all(lowerable(m) for m in trunk)
    if _is_block(trunk):
        ds = trunk.downsample
        return (_conv_ok(trunk.conv1) and _conv_ok(trunk.conv2)
                and isinstance(trunk.bn1, nn.BatchNorm2d) and isinstance(trunk.bn2, nn.BatchNorm2d)
                and (ds is None or (isinstance(ds, nn.Sequential) and lowerable(ds))))
    return _conv_ok(trunk) or isinstance(trunk, (nn.BatchNorm2d, nn.ReLU))


# Tap tables of dense convolutions, by (kernel, stride, padding, H, W, device).
_TAPS: dict = {}


def _tap_table(conv, H, W, device):
    """[Po, P] long: which kernel tap (kh * kw_n + kw) links output position po to input position
    p, or kh_n * kw_n (a zero block) where none does."""
    key = (conv.kernel_size, conv.stride, conv.padding, H, W, str(device))
    t = _TAPS.get(key)
    if t is None:
        (kh_n, kw_n), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        Ho, Wo = (H + 2 * ph - kh_n) // sh + 1, (W + 2 * pw - kw_n) // sw + 1
        t = torch.full((Ho * Wo, H * W), kh_n * kw_n, dtype=torch.long)
        for oh in range(Ho):
            for ow in range(Wo):
                for kh in range(kh_n):
                    for kw in range(kw_n):
                        ih, iw = oh * sh - ph + kh, ow * sw - pw + kw
                        if 0 <= ih < H and 0 <= iw < W:
                            t[oh * Wo + ow, ih * W + iw] = kh * kw_n + kw
        t = t.to(device)
        _TAPS[key] = t
    return t


def _conv(conv, x, H, W):
    """x [B, P, Cin] -> ([B, Po, Cout], Ho, Wo)."""
    B = x.shape[0]
    (kh_n, kw_n), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    Ho, Wo = (H + 2 * ph - kh_n) // sh + 1, (W + 2 * pw - kw_n) // sw + 1
    cin, cout = conv.in_channels, conv.out_channels
    w = conv.weight
    if kh_n * kw_n > 1 and H * W <= kh_n * kw_n:
        # Dense: block (po, p) of the [Po*Cout, P*Cin] matrix is the kernel slice of its tap.
        taps = _tap_table(conv, H, W, x.device)
        kp = torch.cat([w.permute(2, 3, 0, 1).reshape(kh_n * kw_n, cout, cin),
                        w.new_zeros(1, cout, cin)])
        M = kp[taps].permute(0, 2, 1, 3).reshape(Ho * Wo * cout, H * W * cin)
        y = (x.reshape(B, H * W * cin) @ M.t()).view(B, Ho * Wo, cout)
    elif (kh_n, kw_n) == (1, 1) and (ph, pw) == (0, 0):
        xs = x.view(B, H, W, cin)[:, ::sh, ::sw, :]
        y = (xs.reshape(B * Ho * Wo, cin) @ w.view(cout, cin).t()).view(B, Ho * Wo, cout)
    else:
        xn = x.view(B, H, W, cin).permute(0, 3, 1, 2)
        cols = F.unfold(xn, (kh_n, kw_n), padding=(ph, pw), stride=(sh, sw))  # [B, Cin*k*k, Po]
        y = cols.transpose(1, 2) @ w.reshape(cout, -1).t()
    if conv.bias is not None:
        y = y + conv.bias
    return y, Ho, Wo


def _bn(bn, x):
    """BatchNorm2d on x [B, P, C] (statistics over B and P), updating running stats like
    nn.BatchNorm2d.forward does."""
    use_batch = bn.training or bn.running_mean is None
    if use_batch:
        mu = x.mean((0, 1))
        xc = x - mu
        var = (xc * xc).mean((0, 1))
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                f = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
                n = x.shape[0] * x.shape[1]
                bn.running_mean.mul_(1 - f).add_(mu.detach(), alpha=f)
                bn.running_var.mul_(1 - f).add_(var.detach() * (n / max(n - 1, 1)), alpha=f)
        inv = torch.rsqrt(var + bn.eps)
    else:
        xc = x - bn.running_mean
        inv = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        return xc * (inv * bn.weight) + bn.bias
    return xc * inv


def _run(m, x, H, W):
    if isinstance(m, nn.Sequential):
        for sub in m:
            x, H, W = _run(sub, x, H, W)
        return x, H, W
    if _is_block(m):
        out, Ho, Wo = _conv(m.conv1, x, H, W)
        out = F.relu(_bn(m.bn1, out))
        out, _, _ = _conv(m.conv2, out, Ho, Wo)
        out = _bn(m.bn2, out)
        identity = x if m.downsample is None else _run(m.downsample, x, H, W)[0]
        return F.relu(out + identity), Ho, Wo
    if isinstance(m, nn.Conv2d):
        return _conv(m, x, H, W)
    if isinstance(m, nn.BatchNorm2d):
        return _bn(m, x), H, W
    if isinstance(m, nn.ReLU):
        return F.relu(x), H, W
    raise TypeError(f"aux_fast: cannot lower {type(m).__name__}")


def _check(trunk, fc, Z, Y, T):
    if Z.dim() != 4:
        raise ValueError(f"conv_align: Z must be [B, C, H, W], got shape {tuple(Z.shape)}")
    if T.shape != Z.shape:
        raise ValueError(f"conv_align: T must have Z's shape {tuple(Z.shape)}, got {tuple(T.shape)}")
    if Y.shape != Z.shape[:1] or Y.is_floating_point():
        raise ValueError(f"conv_align: Y must be integer labels [{Z.shape[0]}], got "
                         f"{Y.dtype} {tuple(Y.shape)}")
    if not isinstance(fc, nn.Linear) or fc.bias is None:
        raise TypeError(f"conv_align: fc must be an nn.Linear with bias, got {type(fc).__name__}")
    if T.dtype != Z.dtype:
        raise TypeError(f"conv_align: T dtype {T.dtype} differs from Z dtype {Z.dtype}")


def conv_align_grads(trunk, fc, Z, Y, T, grad_scale: float = 1.0):
    """Alignment loss and gradients of ``fc o avgpool o trunk`` (same contract and results as
    :func:`conv_align_reference`, within floating-point tolerance), through the lowered trunk.

    Args:
        trunk: nn.Module (see :func:`lowerable`); fc: nn.Linear(C_trunk -> num_classes).
        Z: [B, Cin, H, W] cut activations; Y: [B] integer labels; T: [B, Cin, H, W] targets.
        grad_scale: multiplies ``g_hat`` (see fsl_fast.ops.aux on 1/N_buf versus 1/B).
    Returns:
        ``(loss, grads)``: 0-d loss and a tuple aligned with
        ``list(trunk.parameters()) + [fc.weight, fc.bias]``.
    """
    _check(trunk, fc, Z, Y, T)
    if not lowerable(trunk):
        return conv_align_reference(trunk, fc, Z, Y, T, grad_scale)
    params = _params(trunk, fc)
    B, C, H, W = Z.shape
    with torch.enable_grad():
        z = Z.detach().requires_grad_(True)
        rows = z.permute(0, 2, 3, 1).reshape(B, H * W, C)
        h, _, _ = _run(trunk, rows, H, W)
        ce = F.cross_entropy(F.linear(h.mean(1), fc.weight, fc.bias), Y) * grad_scale
        (g,) = torch.autograd.grad(ce, z, create_graph=True)
        loss = (g - T).square().sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if d is None else d for p, d in zip(params, grads))
    return loss.detach(), grads


def conv_align_step(aux, Z, Y, T, grad_scale: float = 1.0):
    """Set ``.grad`` of every parameter of ``aux`` (attributes ``trunk`` and ``fc``) to its
    alignment gradient and return the loss; then ``optimizer.step()``."""
    loss, grads = conv_align_grads(aux.trunk, aux.fc, Z, Y, T, grad_scale)
    for p, d in zip(_params(aux.trunk, aux.fc), grads):
        p.grad = d
    return loss
