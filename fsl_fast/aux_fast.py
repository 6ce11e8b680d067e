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
    raise TypeError(f"aux_fast: cannot lower {type(m).__name__}")


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
# elementwise passes (BatchNorm's second-order terms are ~10 fused-friendly ops here).


class _Conv:
    def __init__(self, conv, H, W):
        self.m = conv
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = conv.kernel_size, conv.stride, conv.padding
        self.H, self.W = H, W
        self.Ho = (H + 2 * self.ph - self.kh) // self.sh + 1
        self.Wo = (W + 2 * self.pw - self.kw) // self.sw + 1
        self.ci, self.co = conv.in_channels, conv.out_channels
        if self.kh * self.kw > 1 and H * W <= self.kh * self.kw:
            self.kind = "dense"
        elif (self.kh, self.kw) == (1, 1) and (self.ph, self.pw) == (0, 0):
            self.kind = "1x1"
        else:
            self.kind = "unfold"

    def _apply(self, x):
        """y [B, Po, Co] = A x (no bias); keeps the operand the weight gradient needs."""
        B = x.shape[0]
        if self.kind == "dense":
            return (x.reshape(B, -1) @ self.M.t()).view(B, self.Ho * self.Wo, self.co), x
        if self.kind == "1x1":
            xs = x.view(B, self.H, self.W, self.ci)[:, ::self.sh, ::self.sw, :].reshape(-1, self.ci)
            return (xs @ self.Wm.t()).view(B, -1, self.co), xs
        xn = x.reshape(B, self.H, self.W, self.ci).permute(0, 3, 1, 2)
        # 2-D operands: a 3-D non-contiguous left operand makes matmul fall back to a bmm of B
        # tiny GEMMs (100 ms instead of ~3 ms for layer3's first conv at B=256).
        cols = F.unfold(xn, (self.kh, self.kw), padding=(self.ph, self.pw),
                        stride=(self.sh, self.sw)).transpose(1, 2).reshape(B * self.Ho * self.Wo, -1)
        return (cols @ self.Wm.t()).view(B, self.Ho * self.Wo, self.co), cols

    def _adjoint(self, dy):
        B = dy.shape[0]
        if self.kind == "dense":
            return (dy.reshape(B, -1) @ self.M).view(B, self.H * self.W, self.ci)
        if self.kind == "1x1":
            dx = dy.new_zeros(B, self.H, self.W, self.ci)
            dx[:, ::self.sh, ::self.sw, :] = (dy.reshape(-1, self.co) @ self.Wm).view(
                B, self.Ho, self.Wo, self.ci)
            return dx.view(B, -1, self.ci)
        dcols = (dy.reshape(-1, self.co) @ self.Wm).view(B, self.Ho * self.Wo, -1).transpose(1, 2)
        dx = F.fold(dcols, (self.H, self.W), (self.kh, self.kw), padding=(self.ph, self.pw),
                    stride=(self.sh, self.sw))
        return dx.permute(0, 2, 3, 1).reshape(B, -1, self.ci)

    def fwd(self, x):
        w = self.m.weight.detach()
        if self.kind == "dense":
            taps = _tap_table(self.m, self.H, self.W, x.device)
            kp = torch.cat([w.permute(2, 3, 0, 1).reshape(-1, self.co, self.ci),
                            w.new_zeros(1, self.co, self.ci)])
            self.taps = taps
            self.M = kp[taps].permute(0, 2, 1, 3).reshape(self.Ho * self.Wo * self.co, -1)
        else:
            self.Wm = w.reshape(self.co, -1)
        y, self.xop = self._apply(x)
        if self.m.bias is not None:
            y = y + self.m.bias.detach()
        return y

    def bwd(self, dy):
        self.dy = dy
        return self._adjoint(dy)

    def tfwd(self, xt):
        y, self.xtop = self._apply(xt)
        return y

    def tbwd(self, dyt, grads, need_input):
        B = dyt.shape[0]
        if self.kind == "dense":
            gM = dyt.reshape(B, -1).t() @ self.xop.reshape(B, -1)
            gM.addmm_(self.dy.reshape(B, -1).t(), self.xtop.reshape(B, -1))
            blocks = gM.view(self.Ho * self.Wo, self.co, self.H * self.W, self.ci).permute(0, 2, 1, 3)
            gk = blocks.new_zeros(self.kh * self.kw + 1, self.co, self.ci)
            gk.index_add_(0, self.taps.reshape(-1), blocks.reshape(-1, self.co, self.ci))
            gw = gk[:-1].view(self.kh, self.kw, self.co, self.ci).permute(2, 3, 0, 1)
        else:
            a, b = dyt.reshape(-1, self.co), self.dy.reshape(-1, self.co)
            gw = a.t() @ self.xop.reshape(a.shape[0], -1)
            gw.addmm_(b.t(), self.xtop.reshape(b.shape[0], -1))
            gw = gw.view_as(self.m.weight)
        _acc(grads, self.m.weight, gw)
        if self.m.bias is not None:
            _acc(grads, self.m.bias, dyt.sum((0, 1)))
        return self._adjoint(dyt) if need_input else None


class _BN:
    def __init__(self, bn):
        self.m = bn
        self.batch = bn.training or bn.running_mean is None

    def fwd(self, x):
        bn = self.m
        n = x.shape[0] * x.shape[1]
        if self.batch:
            mu = x.mean((0, 1))
            xc = x - mu
            var = (xc * xc).mean((0, 1))
            if bn.training and bn.track_running_stats and bn.running_mean is not None:
                with torch.no_grad():
                    bn.num_batches_tracked.add_(1)
                    f = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
                    bn.running_mean.mul_(1 - f).add_(mu, alpha=f)
                    bn.running_var.mul_(1 - f).add_(var * (n / max(n - 1, 1)), alpha=f)
            self.inv = torch.rsqrt(var + bn.eps)
        else:
            xc = x - bn.running_mean
            self.inv = torch.rsqrt(bn.running_var + bn.eps)
        self.xhat = xc * self.inv
        self.gamma = bn.weight.detach() if bn.affine else None
        self.gi = self.inv if self.gamma is None else self.gamma * self.inv  # gamma / sigma
        if self.gamma is None:
            return self.xhat
        return torch.addcmul(bn.bias.detach(), self.xhat, self.gamma)

    def bwd(self, dy):
        self.dy = dy
        if not self.batch:
            self.dx = dy * self.gi
            return self.dx
        self.m1 = dy.mean((0, 1))
        self.m2 = (dy * self.xhat).mean((0, 1))
        self.dx = (dy - self.m1 - self.xhat * self.m2) * self.gi
        return self.dx

    def tfwd(self, xt):
        if not self.batch:
            self.xhat_t = xt * self.inv
        else:
            self.sig_t = (self.xhat * xt).mean((0, 1)) * self.inv  # sigma' / sigma
            self.xhat_t = (xt - xt.mean((0, 1))) * self.inv - self.xhat * self.sig_t
        return self.xhat_t if self.gamma is None else self.xhat_t * self.gamma

    def tbwd(self, dyt, grads, need_input):
        if self.gamma is not None:
            _acc(grads, self.m.weight, (dyt * self.xhat + self.dy * self.xhat_t).sum((0, 1)))
            _acc(grads, self.m.bias, dyt.sum((0, 1)))
        if not need_input:
            return None
        if not self.batch:
            return dyt * self.gi
        m1t = dyt.mean((0, 1))
        m2t = (dyt * self.xhat + self.dy * self.xhat_t).mean((0, 1))
        inner = dyt - m1t - self.xhat_t * self.m2 - self.xhat * m2t
        return inner * self.gi - self.dx * self.sig_t


class _ReLU:
    def fwd(self, x):
        self.mask = x > 0
        return x.clamp_min(0)

    def bwd(self, dy):
        return dy * self.mask

    def tfwd(self, xt):
        return xt * self.mask

    def tbwd(self, dyt, grads, need_input):
        return dyt * self.mask if need_input else None


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


def _build(m, H, W):
    """Nodes of the lowered trunk and the output map size."""
    if isinstance(m, nn.Sequential):
        nodes = []
        for sub in m:
            n, H, W = _build(sub, H, W)
            nodes.append(n)
        return _Seq(nodes), H, W
    if _is_block(m):
        c1 = _Conv(m.conv1, H, W)
        c2 = _Conv(m.conv2, c1.Ho, c1.Wo)
        main = _Seq([c1, _BN(m.bn1), _ReLU(), c2, _BN(m.bn2)])
        short = _Identity() if m.downsample is None else _build(m.downsample, H, W)[0]
        return _Block(main, short), c1.Ho, c1.Wo
    if isinstance(m, nn.Conv2d):
        c = _Conv(m, H, W)
        return c, c.Ho, c.Wo
    if isinstance(m, nn.BatchNorm2d):
        return _BN(m), H, W
    if isinstance(m, nn.ReLU):
        return _ReLU(), H, W
    raise TypeError(f"aux_fast: cannot lower {type(m).__name__}")


@torch.no_grad()
def _manual_align(trunk, fc, Z, Y, T, grad_scale):
    B, C, H, W = Z.shape
    net, Ho, Wo = _build(trunk, H, W)
    x = Z.permute(0, 2, 3, 1).reshape(B, H * W, C)
    h = net.fwd(x)                                    # [B, P, Ct]
    P = h.shape[1]
    feat = h.mean(1)
    Wfc, bfc = fc.weight.detach(), fc.bias.detach()
    p = torch.softmax(torch.addmm(bfc, feat, Wfc.t()), -1)
    s = grad_scale / B
    G = (p - F.one_hot(Y, Wfc.shape[0]).to(p.dtype)) * s
    dh = (G @ Wfc) / P                                # adjoint of every position of h
    dx = net.bwd(dh.unsqueeze(1).expand_as(h))
    g_hat = dx.view(B, H, W, C).permute(0, 3, 1, 2)
    diff = g_hat - T
    loss = diff.square().sum()
    R = (2 * diff).permute(0, 2, 3, 1).reshape(B, H * W, C)
    ht = net.tfwd(R)
    feat_t = ht.mean(1)
    zt = feat_t @ Wfc.t()
    Gt = s * p * (zt - (zt * p).sum(-1, keepdim=True))
    grads: dict = {}
    _acc(grads, fc.weight, Gt.t() @ feat + G.t() @ feat_t)
    _acc(grads, fc.bias, Gt.sum(0))
    dht = (Gt @ Wfc) / P
    net.tbwd(dht.unsqueeze(1).expand_as(h), grads, False)
    params = _params(trunk, fc)
    return loss, tuple(grads.get(id(q), torch.zeros_like(q)) for q in params)


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


def conv_align_grads(trunk, fc, Z, Y, T, grad_scale: float = 1.0, method: str = "manual"):
    """Alignment loss and gradients of ``fc o avgpool o trunk`` (same contract and results as
    :func:`conv_align_reference`, within floating-point tolerance), through the lowered trunk.

    Args:
        trunk: nn.Module (see :func:`lowerable`); fc: nn.Linear(C_trunk -> num_classes).
        Z: [B, Cin, H, W] cut activations; Y: [B] integer labels; T: [B, Cin, H, W] targets.
        grad_scale: multiplies ``g_hat`` (see fsl_fast.ops.aux on 1/N_buf versus 1/B).
        method: "manual" (default: the hand-written forward-over-reverse pass), "autograd"
            (reverse-over-reverse autograd through the lowered trunk) or "reference" (the
            modules themselves). Trunks that are not :func:`lowerable` always use "reference".
    Returns:
        ``(loss, grads)``: 0-d loss and a tuple aligned with
        ``list(trunk.parameters()) + [fc.weight, fc.bias]``.
    """
    _check(trunk, fc, Z, Y, T)
    if method not in ("manual", "autograd", "reference"):
        raise ValueError(f"conv_align_grads: method must be manual, autograd or reference, got {method!r}")
    if method == "reference" or not lowerable(trunk):
        return conv_align_reference(trunk, fc, Z, Y, T, grad_scale)
    if method == "manual":
        return _manual_align(trunk, fc, Z, Y, T, grad_scale)
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


def conv_align_step(aux, Z, Y, T, grad_scale: float = 1.0, method: str = "manual"):
    """Set ``.grad`` of every parameter of ``aux`` (attributes ``trunk`` and ``fc``) to its
    alignment gradient and return the loss; then ``optimizer.step()``."""
    loss, grads = conv_align_grads(aux.trunk, aux.fc, Z, Y, T, grad_scale, method)
    for p, d in zip(_params(aux.trunk, aux.fc), grads):
        p.grad = d
    return loss
