"""Alignment of convolutional auxiliary models (the paper's ResNet-18 ``layer3`` auxiliary), fast.

The alignment step (ALGORITHM.md §2) trains an auxiliary model ``a = fc o avgpool o trunk`` so that
its input gradient ``g_hat = d CE_mean(a(Z), Y) / dZ`` matches targets ``T``: loss
``sum((g_hat - T)^2)`` and its gradient with respect to every parameter of ``trunk`` and ``fc``.
The authors compute it by reverse-over-reverse autograd on the nn.Module
(:func:`conv_align_reference`).

:func:`conv_align_grads` computes the same loss and gradients faster. It first *lowers* the
trunk:

- activations are laid out as rows ``[B, P, C]`` (P = H*W positions, channels last), so every
  convolution is a plain GEMM and BatchNorm statistics are column reductions;
- a convolution whose input has no more positions than the kernel has taps (``H*W <= kh*kw``:
  layer3's 3x3 convolutions on 2x2 maps) becomes one dense ``[P_out*C_out, P*C_in]`` matrix
  gathered from the kernel: 5 of the 9 taps of every output are padding there, so the dense GEMM
  does 1.05M instead of 2.36M multiply-adds per sample, at GEMM speed;
- 1x1 convolutions are a strided slice and a GEMM; other convolutions are unfold + GEMM.

Then (``method="manual"``, the default) it differentiates twice by hand, forward-over-reverse:
``dL/dtheta = d/d eps grad_theta f(theta, Z + eps R)`` with ``R = 2 (g_hat - T)``, in four sweeps
(forward, adjoints, tangents, tangent adjoints) that share the primal passes; BatchNorm's
second-order terms in train mode (batch statistics depend on Z) are written out. ``method=
"autograd"`` instead runs reverse-over-reverse autograd through the lowered trunk (slower: autograd's
double backward of BatchNorm is many elementwise passes).

Train-mode BatchNorm updates its running statistics exactly once per call, as the reference's
single forward pass does (momentum or cumulative average, ``num_batches_tracked`` + 1).

``gemm_dtype=torch.bfloat16`` (the fused engine under ``--precision bf16``) runs the convolutions'
matrix products in bfloat16 (operands rounded to bf16, products accumulated by oneDNN in fp32,
results rounded to bf16 and widened): im2col operands are gathered in bf16, weight gradients sum
their two products in fp32; BatchNorm, ReLU, the head, the loss and the targets stay fp32.

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
    "conv_align_grads_batched",
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
    """A two-convolution residual block (models.BasicBlock's shape); a bottleneck (conv3) is not."""
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2", "downsample")) and not hasattr(m, "conv3")


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
        xn = x.reshape(B, H, W, cin).permute(0, 3, 1, 2)
        cols = F.unfold(xn, (kh_n, kw_n), padding=(ph, pw), stride=(sh, sw))  # [B, Cin*k*k, Po]
        cols = cols.transpose(1, 2).reshape(B * Ho * Wo, -1)  # 2-D: see _Conv._apply
        y = (cols @ w.reshape(cout, -1).t()).view(B, Ho * Wo, cout)
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
    raise TypeError(f"aux_conv: cannot lower {type(m).__name__}")


# ---------------------------------------------------------------------------------------------
# Hand-written second-order pass (forward-over-reverse, sharing the primal passes)
#
# dL/dtheta = d/d eps [grad_theta f(theta, Z + eps R)] at eps = 0, with R = 2 (g_hat - T) and
# f = grad_scale * CE_mean (symmetry of mixed partials). Four sweeps over the lowered trunk:
#   fwd   primal activations (BatchNorm running statistics updated here, once)
#   bwd   adjoints delta (input gradients only) -> g_hat, R
#   tfwd  tangents of the activations in direction R (weights fixed)
#   tbwd  tangents of the adjoints; every parameter's gradient is the tangent of its first-order
#         gradient, e.g. conv: d(delta_y^T x) = delta_y'^T x + delta_y^T x'.
# Each node keeps what its later sweeps need. The GEMM count equals reverse-over-reverse's (six
# forward-equivalents); what it saves is autograd's double-backward bookkeeping and its many
# elementwise passes (BatchNorm's second-order terms are a handful of ops here).
#
# Every node works on K clients at once: activations [K, B, P, C], weights stacked [K, ...],
# GEMMs as bmm, BatchNorm statistics per client. One client is K = 1.


class _Conv:
    def __init__(self, convs, H, W, gemm_dtype=torch.float32):
        c = convs[0]
        self.convs = convs
        self.gd = gemm_dtype  # operand dtype of the products (float32 or bfloat16)
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = c.kernel_size, c.stride, c.padding
        self.H, self.W = H, W
        self.Ho = (H + 2 * self.ph - self.kh) // self.sh + 1
        self.Wo = (W + 2 * self.pw - self.kw) // self.sw + 1
        self.ci, self.co = c.in_channels, c.out_channels
        self.has_bias = c.bias is not None
        if self.kh * self.kw > 1 and H * W <= self.kh * self.kw:
            self.kind = "dense"
        elif (self.kh, self.kw) == (1, 1) and (self.ph, self.pw) == (0, 0):
            self.kind = "1x1"
        else:
            self.kind = "gather"

    def _lp(self, t):
        """``t`` in the product dtype (unchanged unless products run in bf16)."""
        return t if self.gd == torch.float32 else t.to(self.gd)

    def _mm(self, a, b):
        """bmm with operands in the product dtype, result fp32 (any dtype unless bf16)."""
        if self.gd == torch.float32:
            return torch.bmm(a, b)
        return torch.bmm(a.to(self.gd), b.to(self.gd)).float()

    def _apply(self, x):
        """y [K, B, Po, Co] = A x (no bias); keeps the operand the weight gradient needs (in
        the product dtype)."""
        K, B = x.shape[:2]
        Po = self.Ho * self.Wo
        x = self._lp(x)
        if self.kind == "dense":
            xo = x.reshape(K, B, -1)
            return self._mm(xo, self.M.transpose(1, 2)).view(K, B, Po, self.co), xo
        if self.kind == "1x1":
            xs = x.reshape(K, B, self.H, self.W, self.ci)[:, :, ::self.sh, ::self.sw, :]
            xs = xs.reshape(K, B * Po, self.ci)
            return self._mm(xs, self.Wm.transpose(1, 2)).view(K, B, Po, self.co), xs
        # im2col in the row layout: one index_select of whole Ci-channel rows (padding reads a
        # zero row appended at position P); cheaper than unfold/fold through NCHW permutes.
        xp = torch.cat([x, x.new_zeros(K, B, 1, self.ci)], 2)
        cols = xp.index_select(2, self.gidx).reshape(K, B * Po, -1)
        return self._mm(cols, self.Wm.transpose(1, 2)).view(K, B, Po, self.co), cols

    def _adjoint(self, dy):
        K, B = dy.shape[:2]
        Po = self.Ho * self.Wo
        if self.kind == "dense":
            return self._mm(dy.reshape(K, B, -1), self.M).view(K, B, self.H * self.W, self.ci)
        if self.kind == "1x1":
            dx = dy.new_zeros(K, B, self.H, self.W, self.ci)
            dx[:, :, ::self.sh, ::self.sw, :] = self._mm(
                dy.reshape(K, B * Po, self.co), self.Wm).view(K, B, self.Ho, self.Wo, self.ci)
            return dx.view(K, B, -1, self.ci)
        dcols = self._mm(dy.reshape(K, B * Po, self.co), self.Wm).view(K, B, -1, self.ci)
        dxp = dy.new_zeros(K, B, self.H * self.W + 1, self.ci)
        dxp.index_add_(2, self.gidx, dcols)
        return dxp[:, :, :-1]

    def fwd(self, x):
        K = x.shape[0]
        w = _stack([c.weight for c in self.convs])  # [K, Co, Ci, kh, kw]
        if self.kind == "dense":
            self.taps = _tap_table(self.convs[0], self.H, self.W, x.device)
            kp = torch.cat([w.permute(0, 3, 4, 1, 2).reshape(K, -1, self.co, self.ci),
                            w.new_zeros(K, 1, self.co, self.ci)], 1)
            self.M = self._lp(kp[:, self.taps].permute(0, 1, 3, 2, 4).reshape(
                K, self.Ho * self.Wo * self.co, -1))
        elif self.kind == "gather":
            # tap table [Po, kk] -> input position, or P for padding; weight as [Co, (kh, kw, Ci)]
            taps = _tap_table(self.convs[0], self.H, self.W, x.device)  # [Po, P] -> tap or kk
            kk = self.kh * self.kw
            pos = torch.full((taps.shape[0], kk + 1), self.H * self.W, dtype=torch.long,
                             device=x.device)
            pos.scatter_(1, taps, torch.arange(self.H * self.W, device=x.device).expand_as(taps))
            self.gidx = pos[:, :kk].reshape(-1)
            self.Wm = self._lp(w.permute(0, 1, 3, 4, 2).reshape(K, self.co, -1))
        else:
            self.Wm = self._lp(w.reshape(K, self.co, -1))
        y, self.xop = self._apply(x)
        if self.has_bias:
            y = y + _stack([c.bias for c in self.convs]).view(K, 1, 1, self.co)
        return y

    def bwd(self, dy):
        self.dy = dy
        return self._adjoint(dy)

    def tfwd(self, xt):
        y, self.xtop = self._apply(xt)
        return y

    def tbwd(self, dyt, grads, need_input):
        K, B = dyt.shape[:2]
        if self.kind == "dense":
            a, b = dyt.reshape(K, B, -1), self.dy.reshape(K, B, -1)
            if self.gd == torch.float32:
                gM = torch.bmm(a.transpose(1, 2), self.xop)
                gM.baddbmm_(b.transpose(1, 2), self.xtop)
            else:
                gM = self._mm(a.transpose(1, 2), self.xop) + self._mm(b.transpose(1, 2), self.xtop)
            blocks = gM.view(K, self.Ho * self.Wo, self.co, self.H * self.W, self.ci)
            blocks = blocks.permute(0, 1, 3, 2, 4).reshape(K, -1, self.co, self.ci)
            gk = blocks.new_zeros(K, self.kh * self.kw + 1, self.co, self.ci)
            gk.index_add_(1, self.taps.reshape(-1), blocks)
            gw = gk[:, :-1].reshape(K, self.kh, self.kw, self.co, self.ci).permute(0, 3, 4, 1, 2)
        else:
            a, b = dyt.reshape(K, -1, self.co), self.dy.reshape(K, -1, self.co)
            if self.gd == torch.float32:
                gw = torch.bmm(a.transpose(1, 2), self.xop)
                gw.baddbmm_(b.transpose(1, 2), self.xtop)
            else:
                gw = self._mm(a.transpose(1, 2), self.xop) + self._mm(b.transpose(1, 2), self.xtop)
            if self.kind == "gather":
                gw = gw.view(K, self.co, self.kh, self.kw, self.ci).permute(0, 1, 4, 2, 3)
            else:
                gw = gw.view(K, self.co, self.ci, self.kh, self.kw)
        for k, c in enumerate(self.convs):
            _acc(grads, c.weight, gw[k])
        if self.has_bias:
            gb = dyt.sum((1, 2))
            for k, c in enumerate(self.convs):
                _acc(grads, c.bias, gb[k])
        return self._adjoint(dyt) if need_input else None


def _stack(ts):
    """[K, ...] from K per-client tensors (a view when K = 1: stacking copies 8 MB of layer3)."""
    if len(ts) == 1:
        return ts[0].detach().unsqueeze(0)
    return torch.stack([t.detach() for t in ts])


def _stack_c(ts, K):
    """[K, 1, 1, C] from K per-client [C] tensors."""
    return _stack(ts).view(K, 1, 1, -1)


def _update_running(bn, mu, var, n):
    """One train-mode forward's update of ``bn``'s running statistics from the batch mean and
    biased variance over ``n`` values per channel, as nn.BatchNorm2d makes it (momentum or
    cumulative average, unbiased variance, ``num_batches_tracked`` + 1)."""
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(mu.view(-1), alpha=f)
            bn.running_var.mul_(1 - f).add_(var.view(-1) * (n / max(n - 1, 1)), alpha=f)


class _BN:
    def __init__(self, bns):
        self.bns = bns
        b0 = bns[0]
        self.batch = b0.training or b0.running_mean is None
        self.affine = b0.affine
        self.eps = b0.eps

    def fwd(self, x):
        K = x.shape[0]
        n = x.shape[1] * x.shape[2]
        # One client in train mode: torch's fused batch-norm kernels on the [B*P, C] rows (one
        # or two passes per sweep instead of a chain of elementwise ops; see _rows_*).
        self.rows = self.batch and K == 1
        if self.rows:
            return self._rows_fwd(x, n)
        if self.batch:
            mu = x.mean((1, 2), keepdim=True)
            xc = x - mu
            var = (xc * xc).mean((1, 2), keepdim=True)
            for k, bn in enumerate(self.bns):
                _update_running(bn, mu[k], var[k], n)
            self.inv = torch.rsqrt(var + self.eps)
        else:
            xc = x - _stack_c([bn.running_mean for bn in self.bns], K)
            self.inv = torch.rsqrt(_stack_c([bn.running_var for bn in self.bns], K) + self.eps)
        self.xhat = xc * self.inv
        if not self.affine:
            self.gi = self.inv
            return self.xhat
        self.gamma = _stack_c([bn.weight for bn in self.bns], K)
        self.gi = self.gamma * self.inv  # gamma / sigma
        return torch.addcmul(_stack_c([bn.bias for bn in self.bns], K), self.xhat, self.gamma)

    def bwd(self, dy):
        self.dy = dy
        if self.rows:
            return self._rows_bwd(dy)
        if not self.batch:
            self.dx = dy * self.gi
            return self.dx
        self.m2 = (dy * self.xhat).mean((1, 2), keepdim=True)
        self.dx = (dy - dy.mean((1, 2), keepdim=True) - self.xhat * self.m2) * self.gi
        return self.dx

    def tfwd(self, xt):
        if self.rows:
            return self._rows_tfwd(xt)
        if not self.batch:
            self.xhat_t = xt * self.inv
        else:
            self.sig_t = (self.xhat * xt).mean((1, 2), keepdim=True) * self.inv  # sigma'/sigma
            self.xhat_t = (xt - xt.mean((1, 2), keepdim=True)) * self.inv - self.xhat * self.sig_t
        return self.xhat_t * self.gamma if self.affine else self.xhat_t

    def tbwd(self, dyt, grads, need_input):
        if self.rows:
            return self._rows_tbwd(dyt, grads, need_input)
        t2 = dyt * self.xhat + self.dy * self.xhat_t  # tangent of dy * xhat
        if self.affine:
            gg, gb = t2.sum((1, 2)), dyt.sum((1, 2))
            for k, bn in enumerate(self.bns):
                _acc(grads, bn.weight, gg[k])
                _acc(grads, bn.bias, gb[k])
        if not need_input:
            return None
        if not self.batch:
            return dyt * self.gi
        inner = (dyt - dyt.mean((1, 2), keepdim=True) - self.xhat_t * self.m2
                 - self.xhat * t2.mean((1, 2), keepdim=True))
        return inner * self.gi - self.dx * self.sig_t

    # The same four sweeps for one client in train mode, on rows [N = B*P, C]. Two identities
    # make them torch's batch-norm kernels: with xhat = (x - mu) * inv,
    #   native_batch_norm_backward(u, weight w) = w * inv * (u - mean(u) - xhat * mean(u * xhat))
    # (and sum(u * xhat), sum(u) as the weight/bias gradients), which is the backward sweep for
    # u = dy and, with w = 1, the tangent sweep's xhat_t for u = xt (the normalization's Jacobian
    # is symmetric); the tangent adjoint is that operator on dyt plus three per-channel terms.

    def _rows_fwd(self, x, n):
        shape, C = x.shape, x.shape[-1]
        self.x2 = x.reshape(-1, C)
        xhat, self.mu, self.inv = torch.native_batch_norm(
            self.x2, None, None, None, None, True, 0.0, self.eps)
        bn = self.bns[0]
        # the biased batch variance, from the kernel's 1 / sqrt(var + eps)
        _update_running(bn, self.mu, self.inv.reciprocal().square().sub_(self.eps), n)
        self.xhat = xhat
        self.n = n
        if not self.affine:
            self.gamma = None
            self.gi = self.inv
            return xhat.view(shape)
        self.gamma = bn.weight.detach()
        self.gi = self.gamma * self.inv
        return torch.addcmul(bn.bias.detach(), xhat, self.gamma).view(shape)

    def _native_bwd(self, u, w, mask):
        return torch.ops.aten.native_batch_norm_backward(
            u, self.x2, w, None, None, self.mu, self.inv, True, self.eps, mask)

    def _rows_bwd(self, dy):
        C = dy.shape[-1]
        dx, sdx, _ = self._native_bwd(dy.reshape(-1, C), self.gamma, [True, True, False])
        self.m2 = sdx / self.n   # mean(dy * xhat)
        self.dx = dx
        return dx.view(dy.shape)

    def _rows_tfwd(self, xt):
        C = xt.shape[-1]
        xhat_t, s, _ = self._native_bwd(xt.reshape(-1, C), None, [True, True, False])
        self.sig_t = s / self.n * self.inv  # sigma'/sigma
        self.xhat_t = xhat_t
        return (xhat_t * self.gamma if self.affine else xhat_t).view(xt.shape)

    def _rows_tbwd(self, dyt, grads, need_input):
        shape, C = dyt.shape, dyt.shape[-1]
        d2 = dyt.reshape(-1, C)
        dy2 = self.dy.reshape(-1, C)
        q = torch.linalg.vecdot(dy2, self.xhat_t, dim=0)  # sum(dy * xhat_t)
        if self.affine or need_input:
            out, s_xhat, s_dyt = self._native_bwd(d2, self.gamma, [need_input, True, True])
        if self.affine:
            _acc(grads, self.bns[0].weight, s_xhat + q)
            _acc(grads, self.bns[0].bias, s_dyt)
        if not need_input:
            return None
        out.addcmul_(self.xhat, self.gi * (q / self.n), value=-1)
        out.addcmul_(self.xhat_t, self.gi * self.m2, value=-1)
        out.addcmul_(self.dx, self.sig_t, value=-1)
        return out.view(shape)


class _ReLU:
    # The output is the mask: threshold_backward(u, y, 0) passes u where y > 0 in one pass
    # (building a float mask from x > 0 cost more than the products it served).
    def fwd(self, x):
        self.y = torch.relu(x)
        return self.y

    def _pass(self, u):
        return torch.ops.aten.threshold_backward(u, self.y, 0)

    def bwd(self, dy):
        return self._pass(dy)

    def tfwd(self, xt):
        return self._pass(xt)

    def tbwd(self, dyt, grads, need_input):
        return self._pass(dyt) if need_input else None


class _Seq:
    def __init__(self, nodes):
        self.nodes = nodes

    def fwd(self, x):
        for n in self.nodes:
            x = n.fwd(x)
        return x

    def bwd(self, dy):
        for n in reversed(self.nodes):
            dy = n.bwd(dy)
        return dy

    def tfwd(self, xt):
        for n in self.nodes:
            xt = n.tfwd(xt)
        return xt

    def tbwd(self, dyt, grads, need_input):
        for i in range(len(self.nodes) - 1, -1, -1):
            dyt = self.nodes[i].tbwd(dyt, grads, need_input or i > 0)
        return dyt


class _Identity:
    def fwd(self, x):
        return x

    def bwd(self, dy):
        return dy

    def tfwd(self, xt):
        return xt

    def tbwd(self, dyt, grads, need_input):
        return dyt if need_input else None


class _Block:
    def __init__(self, main, short):
        self.main, self.short, self.out = main, short, _ReLU()

    def fwd(self, x):
        return self.out.fwd(self.main.fwd(x) + self.short.fwd(x))

    def bwd(self, dy):
        ds = self.out.bwd(dy)
        return self.main.bwd(ds) + self.short.bwd(ds)

    def tfwd(self, xt):
        return self.out.tfwd(self.main.tfwd(xt) + self.short.tfwd(xt))

    def tbwd(self, dyt, grads, need_input):
        ds = self.out.tbwd(dyt, grads, True)
        a = self.main.tbwd(ds, grads, need_input)
        b = self.short.tbwd(ds, grads, need_input)
        return a + b if need_input else None


def _acc(grads, p, g):
    k = id(p)
    grads[k] = g if k not in grads else grads[k] + g


def _same(ms, what):
    """All K modules must match in type and hyperparameters to be batched together."""
    m0 = ms[0]
    for m in ms[1:]:
        if type(m) is not type(m0):
            raise ValueError(f"conv_align: client trunks differ at {what}: {type(m0).__name__} vs "
                             f"{type(m).__name__}")
        if isinstance(m0, nn.Conv2d) and (m.kernel_size, m.stride, m.padding, m.in_channels,
                                          m.out_channels, m.bias is None) != (
                m0.kernel_size, m0.stride, m0.padding, m0.in_channels, m0.out_channels,
                m0.bias is None):
            raise ValueError(f"conv_align: client trunks differ at {what}: {m0} vs {m}")
        if isinstance(m0, nn.BatchNorm2d) and (m.training, m.affine, m.eps, m.num_features,
                                               m.running_mean is None) != (
                m0.training, m0.affine, m0.eps, m0.num_features, m0.running_mean is None):
            raise ValueError(f"conv_align: client trunks differ at {what}: {m0} vs {m} "
                             f"(or train/eval mode)")
        if isinstance(m0, nn.Sequential) and len(m) != len(m0):
            raise ValueError(f"conv_align: client trunks differ in length at {what}")


def _build(ms, H, W, what="trunk", gd=torch.float32):
    """Nodes of the lowered trunk for K structurally identical modules, and the output size;
    ``gd``: the convolutions' product dtype."""
    _same(ms, what)
    m = ms[0]
    if isinstance(m, nn.Sequential):
        nodes = []
        for i in range(len(m)):
            n, H, W = _build([x[i] for x in ms], H, W, f"{what}.{i}", gd)
            nodes.append(n)
        return _Seq(nodes), H, W
    if _is_block(m):
        if any((x.downsample is None) != (m.downsample is None) for x in ms):
            raise ValueError(f"conv_align: client trunks differ at {what}.downsample")
        sub = lambda a: [getattr(x, a) for x in ms]  # noqa: E731
        for a in ("conv1", "bn1", "conv2", "bn2"):
            _same(sub(a), f"{what}.{a}")
        c1 = _Conv(sub("conv1"), H, W, gd)
        c2 = _Conv(sub("conv2"), c1.Ho, c1.Wo, gd)
        main = _Seq([c1, _BN(sub("bn1")), _ReLU(), c2, _BN(sub("bn2"))])
        short = (_Identity() if m.downsample is None
                 else _build(sub("downsample"), H, W, f"{what}.downsample", gd)[0])
        return _Block(main, short), c1.Ho, c1.Wo
    if isinstance(m, nn.Conv2d):
        c = _Conv(ms, H, W, gd)
        return c, c.Ho, c.Wo
    if isinstance(m, nn.BatchNorm2d):
        return _BN(ms), H, W
    if isinstance(m, nn.ReLU):
        return _ReLU(), H, W
    raise TypeError(f"aux_conv: cannot lower {type(m).__name__}")


@torch.no_grad()
def _manual_align_k(trunks, fcs, Z, Y, T, grad_scale, gemm_dtype=torch.float32):
    """K clients: Z, T [K, B, C, H, W], Y [K, B] -> (loss [K], [grads of client k])."""
    K, B, C, H, W = Z.shape
    net, _, _ = _build(list(trunks), H, W, gd=gemm_dtype)
    x = Z.permute(0, 1, 3, 4, 2).reshape(K, B, H * W, C)
    h = net.fwd(x)                                    # [K, B, P, Ct]
    P = h.shape[2]
    feat = h.mean(2)
    Wfc = _stack([fc.weight for fc in fcs])  # [K, classes, Ct]
    bfc = _stack([fc.bias for fc in fcs])
    p = torch.softmax(torch.baddbmm(bfc.unsqueeze(1), feat, Wfc.transpose(1, 2)), -1)
    s = grad_scale / B
    G = (p - F.one_hot(Y, Wfc.shape[1]).to(p.dtype)) * s
    dh = torch.bmm(G, Wfc) / P                        # adjoint of every position of h
    dx = net.bwd(dh.unsqueeze(2).expand_as(h))
    g_hat = dx.reshape(K, B, H, W, C).permute(0, 1, 4, 2, 3)
    diff = g_hat - T
    loss = diff.square().sum((1, 2, 3, 4))
    R = (2 * diff).permute(0, 1, 3, 4, 2).reshape(K, B, H * W, C)
    feat_t = net.tfwd(R).mean(2)
    zt = torch.bmm(feat_t, Wfc.transpose(1, 2))
    Gt = s * p * (zt - (zt * p).sum(-1, keepdim=True))
    grads: dict = {}
    gW = torch.bmm(Gt.transpose(1, 2), feat).baddbmm_(G.transpose(1, 2), feat_t)
    gb = Gt.sum(1)
    for k, fc in enumerate(fcs):
        _acc(grads, fc.weight, gW[k])
        _acc(grads, fc.bias, gb[k])
    dht = torch.bmm(Gt, Wfc) / P
    net.tbwd(dht.unsqueeze(2).expand_as(h), grads, False)
    out = []
    for trunk, fc in zip(trunks, fcs):
        out.append(tuple(grads.get(id(q), torch.zeros_like(q)) for q in _params(trunk, fc)))
    return loss, out


def _manual_align(trunk, fc, Z, Y, T, grad_scale, gemm_dtype=torch.float32):
    loss, grads = _manual_align_k([trunk], [fc], Z[None], Y[None], T[None], grad_scale, gemm_dtype)
    return loss[0], grads[0]


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


def conv_align_grads(trunk, fc, Z, Y, T, grad_scale: float = 1.0, method: str = "manual",
                     gemm_dtype: torch.dtype = torch.float32):
    """Alignment loss and gradients of ``fc o avgpool o trunk`` (same contract and results as
    :func:`conv_align_reference`, within floating-point tolerance), through the lowered trunk.

    Args:
        trunk: nn.Module (see :func:`lowerable`); fc: nn.Linear(C_trunk -> num_classes).
        Z: [B, Cin, H, W] cut activations; Y: [B] integer labels; T: [B, Cin, H, W] targets.
        grad_scale: multiplies ``g_hat`` (see fsl_fast.ops.aux on 1/N_buf versus 1/B).
        method: "manual" (default: the hand-written forward-over-reverse pass), "autograd"
            (reverse-over-reverse autograd through the lowered trunk) or "reference" (the
            modules themselves). Trunks that are not :func:`lowerable` always use "reference".
        gemm_dtype: float32 (default) or bfloat16: the convolutions' products of the "manual"
            pass (module doc); the other methods ignore it.
    Returns:
        ``(loss, grads)``: 0-d loss and a tuple aligned with
        ``list(trunk.parameters()) + [fc.weight, fc.bias]``.
    """
    _check(trunk, fc, Z, Y, T)
    if method not in ("manual", "autograd", "reference"):
        raise ValueError(f"conv_align_grads: method must be manual, autograd or reference, got {method!r}")
    if method == "reference" or not lowerable(trunk):
        return conv_align_reference(trunk, fc, Z, Y, T, grad_scale)
    if gemm_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"conv_align_grads: gemm_dtype must be float32 or bfloat16, got {gemm_dtype}")
    if method == "manual":
        return _manual_align(trunk, fc, Z, Y, T, grad_scale, gemm_dtype)
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


def conv_align_grads_batched(trunks, fcs, Z, Y, T, grad_scale: float = 1.0):
    """Alignment of K clients' auxiliaries in one computation (the fused engine's form).

    Args:
        trunks, fcs: K structurally identical trunks (see :func:`lowerable`; same layer types,
            shapes and train/eval mode) and their nn.Linear heads.
        Z, T: [K, B, Cin, H, W]; Y: [K, B] integer labels.
    Returns:
        ``(loss [K], grads)`` where ``grads[k]`` is aligned with
        ``list(trunks[k].parameters()) + [fcs[k].weight, fcs[k].bias]``. Each client's BatchNorm
        running statistics advance as in its own call. Activations are stacked [K, B, P, C] and
        every GEMM is one bmm over the K clients (on a GPU this fills the device; on one CPU
        thread it equals K separate calls).
    """
    trunks, fcs = list(trunks), list(fcs)
    K = len(trunks)
    if K == 0 or len(fcs) != K:
        raise ValueError(f"conv_align_grads_batched: need K >= 1 trunks and as many fcs, got "
                         f"{len(trunks)} and {len(fcs)}")
    if Z.dim() != 5 or Z.shape[0] != K:
        raise ValueError(f"conv_align_grads_batched: Z must be [K={K}, B, C, H, W], got "
                         f"{tuple(Z.shape)}")
    if Y.shape != Z.shape[:2]:
        raise ValueError(f"conv_align_grads_batched: Y must be [K, B] = {list(Z.shape[:2])}, "
                         f"got {tuple(Y.shape)}")
    for k in range(K):
        _check(trunks[k], fcs[k], Z[k], Y[k], T[k] if T.shape == Z.shape else T)
    if not all(lowerable(t) for t in trunks):
        outs = [conv_align_reference(trunks[k], fcs[k], Z[k], Y[k], T[k], grad_scale)
                for k in range(K)]
        return torch.stack([o[0] for o in outs]), [o[1] for o in outs]
    return _manual_align_k(trunks, fcs, Z, Y, T, grad_scale)


def conv_align_step(aux, Z, Y, T, grad_scale: float = 1.0, method: str = "manual"):
    """Set ``.grad`` of every parameter of ``aux`` (attributes ``trunk`` and ``fc``) to its
    alignment gradient and return the loss; then ``optimizer.step()``."""
    loss, grads = conv_align_grads(aux.trunk, aux.fc, Z, Y, T, grad_scale, method)
    for p, d in zip(_params(aux.trunk, aux.fc), grads):
        p.grad = d
    return loss
