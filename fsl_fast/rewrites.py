"""Exact rewrites of torch modules for the fused engine.

``SmallMapConv2d``: a 2-D convolution whose input map is tiny (at most ``MAX_POSITIONS`` positions,
e.g. the 1x1 and 2x2 maps of the paper's ResNet-18 on 32x32 images, whose ImageNet stem shrinks
them to 8x8 before layer1) is a single matrix product: every output position is a weighted sum of
the input positions it sees, with the kernel tap that joins them. The dense matrix
``M[(oy, ox, co), (iy, ix, ci)] = W[co, ci, iy - oy*s + p, ix - ox*s + p]`` (zero where the tap
falls outside the kernel) is gathered from the weight on each call as whole [Co, Ci] blocks, and
``y = x_rows @ M^T`` with x's rows position-major (a view of channels-last x); y comes back
channels-last, so a chain of such convolutions, its BatchNorms (whose CPU kernels run 4-6x faster
on channels-last 2x2 maps than on NCHW ones) and ReLUs moves no data between layouts. For a 1x1
map under a padded 3x3 kernel, M is the centre tap ``W[:, :, 1, 1]``.

Exactness: the products are those the convolution forms with real (non-padding) inputs; taps that
only ever meet padding get a gradient of exactly zero, as in the convolution. Sums run in another
order than oneDNN's, so results agree to rounding, not bit for bit. Larger maps, and any
non-default convolution (groups, dilation, non-zero padding modes), run the ordinary convolution.

The rewrite keeps the module's parameters, names and state_dict: it only changes ``forward``
(``enable_small_map_convs`` swaps the class of the Conv2d instances in place).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_POSITIONS = 4  # 1x1 and 2x2 input maps; measured no faster than oneDNN on 4x4 maps (16 positions)
# Below this batch a map with several output positions keeps the convolution: gathering M (and
# scattering its gradient) costs about as much as the product there (measured: 256->256 on 2x2,
# batch 32: 7.3 ms rewritten vs 6.2 ms oneDNN fp32; batch 256: 20 vs 32 ms).
MIN_BATCH_SEVERAL_OUTPUTS = 64

__all__ = ["SmallMapConv2d", "enable_small_map_convs", "small_map_tap_index"]

_INDEX_CACHE: dict = {}


def small_map_tap_index(k: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                        hw: tuple[int, int], device) -> tuple[torch.Tensor, int, int, bool]:
    """For each pair (output position o, input position i), row-major over o then i, the kernel
    tap ``ty * kw + tx`` that joins them, or ``kh * kw`` (a zero block) where i lies outside o's
    window; the output size (Ho, Wo); and whether any pair needs the zero block."""
    key = (k, stride, pad, hw, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None:
        return hit
    (kh, kw), (sh, sw), (ph, pw), (h, w) = k, stride, pad, hw
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    oy = torch.arange(ho).view(ho, 1, 1, 1)
    ox = torch.arange(wo).view(1, wo, 1, 1)
    iy = torch.arange(h).view(1, 1, h, 1)
    ix = torch.arange(w).view(1, 1, 1, w)
    ty, tx = iy - oy * sh + ph, ix - ox * sw + pw  # [ho, wo, h, w]
    inside = (ty >= 0) & (ty < kh) & (tx >= 0) & (tx < kw)
    tap = torch.where(inside, ty * kw + tx, torch.full_like(ty, kh * kw))
    out = (tap.reshape(-1).to(device), ho, wo, bool((~inside).any()))
    _INDEX_CACHE[key] = out
    return out


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d that computes tiny input maps as one matrix product (module doc)."""

    def _rewritable(self, x: torch.Tensor) -> bool:
        return (x.dim() == 4 and x.shape[-2] * x.shape[-1] <= MAX_POSITIONS and self.groups == 1
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and tuple(self.dilation) == (1, 1))

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _small_output(self, x: torch.Tensor) -> bool:
        if x.dim() != 4 or isinstance(self.padding, str):
            return False
        ho, wo = self._out_size(x.shape[-2], x.shape[-1])
        return ho * wo <= MAX_POSITIONS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._rewritable(x):
            if self._small_output(x):
                # e.g. layer3's stride-2 entry (4x4 -> 2x2): a channels-last input makes oneDNN
                # return channels-last, so the small-map chain after it (and the gradient coming
                # back) stays in one layout
                x = x.contiguous(memory_format=torch.channels_last)
            return super().forward(x)
        b, cin, h, w = x.shape
        cout = self.out_channels
        k, s, p = tuple(self.kernel_size), tuple(self.stride), tuple(self.padding)
        wt = self.weight
        ho, wo = self._out_size(h, w)
        if (h, w, ho, wo) == (1, 1, 1, 1) and all(pp < kk for pp, kk in zip(p, k)):
            # one input and one output position: the tap joining them is one slice of W (the
            # centre tap for 3x3, pad 1)
            y = F.linear(x.reshape(b, cin), wt[:, :, p[0], p[1]], self.bias)
            return y.view(b, cout, 1, 1)
        if ho * wo > 1 and b < MIN_BATCH_SEVERAL_OUTPUTS:
            return super().forward(x)
        taps, _, _, outside = small_map_tap_index(k, s, p, (h, w), x.device)
        # M[(o, co), (i, ci)] = W[co, ci, tap(o, i)]: whole [Co, Ci] blocks gathered from the
        # kernel's taps (cast first under autocast: the gather moves half the bytes), rows and
        # columns position-major so the input and output are channels-last views
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            wt = wt.to(torch.get_autocast_dtype(dev))
        kk = k[0] * k[1]
        blocks = wt.permute(2, 3, 0, 1).reshape(kk, cout, cin)
        if outside:
            blocks = torch.cat([blocks, blocks.new_zeros(1, cout, cin)])
        m = blocks.index_select(0, taps).view(ho * wo, h * w, cout, cin)
        m = m.permute(0, 2, 1, 3).reshape(ho * wo * cout, h * w * cin)
        bias = None if self.bias is None else self.bias.repeat(ho * wo)
        y = F.linear(x.permute(0, 2, 3, 1).reshape(b, h * w * cin), m, bias)
        return y.view(b, ho, wo, cout).permute(0, 3, 1, 2)  # channels-last memory


def enable_small_map_convs(module: nn.Module) -> int:
    """Give every plain nn.Conv2d in ``module`` the small-map forward (in place; parameters and
    state_dict unchanged). Returns how many were switched."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = SmallMapConv2d
            n += 1
    return n
