"""fsl_fast.rewrites: convolutions of tiny maps as one matrix product equal the convolution
(float64, forward and both gradients), keep the module's state, and leave other maps alone."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsl_fast import rewrites
from fsl_fast.models import build_split_model
from fsl_fast.rewrites import SmallMapConv2d, enable_small_map_convs

CASES = [  # cin, cout, kernel, stride, padding, (H, W), bias, batch
    (8, 6, 3, 1, 1, (1, 1), False, 3),     # centre tap
    (8, 6, 3, 2, 1, (1, 1), True, 3),
    (8, 6, 3, 2, 1, (2, 2), True, 70),     # ResNet-18 layer4's stride-2 entry
    (8, 6, 1, 2, 0, (2, 2), False, 70),    # its 1x1 stride-2 shortcut
    (8, 6, 3, 1, 1, (2, 2), True, 70),     # layer3 on 2x2 maps
    (5, 7, 3, 1, 1, (1, 2), False, 70),
    (4, 4, 5, 1, 2, (2, 1), True, 70),
    (4, 3, (3, 1), (1, 2), (1, 0), (2, 2), True, 70),
    (8, 6, 3, 1, 1, (2, 2), False, 3),     # several outputs, small batch: the convolution
    (8, 6, 3, 1, 1, (4, 4), False, 70),    # 16 positions: the convolution
]


@pytest.mark.parametrize("cin,cout,k,s,p,hw,bias,b", CASES)
def test_equals_the_convolution_in_float64(cin, cout, k, s, p, hw, bias, b):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, bias=bias).double()
    fast = copy.deepcopy(conv)
    fast.__class__ = SmallMapConv2d
    x = torch.randn(b, cin, *hw, dtype=torch.double, requires_grad=True)
    y0, y1 = conv(x), fast(x)
    assert y0.shape == y1.shape
    g = torch.randn_like(y0)
    params0 = [x] + list(conv.parameters())
    params1 = [x] + list(fast.parameters())
    for a, c in zip(torch.autograd.grad(y0, params0, g), torch.autograd.grad(y1, params1, g)):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)


def test_taps_that_only_meet_padding_get_exactly_zero_gradient():
    conv = nn.Conv2d(4, 5, 3, 1, 1, bias=False)
    conv.__class__ = SmallMapConv2d
    conv(torch.randn(2, 4, 1, 1)).sum().backward()
    g = conv.weight.grad
    assert torch.count_nonzero(g[:, :, 1, 1]) > 0
    g[:, :, 1, 1] = 0
    assert torch.count_nonzero(g) == 0


def test_index_is_cached_and_the_module_state_is_unchanged():
    torch.manual_seed(0)
    split = build_split_model("resnet18", (3, 32, 32), 10, aux="layer3")
    before = {k: v.clone() for k, v in split.server.state_dict().items()}
    n = enable_small_map_convs(split.server)
    assert n == sum(isinstance(m, nn.Conv2d) for m in split.server.modules()) > 0
    assert split.server.state_dict().keys() == before.keys()
    z = torch.randn(80, 128, 4, 4)
    split.server.eval()
    split.server(z)
    size = len(rewrites._INDEX_CACHE)
    split.server(z)
    assert len(rewrites._INDEX_CACHE) == size
    ref = build_split_model("resnet18", (3, 32, 32), 10, aux="layer3")
    ref.server.load_state_dict(before)
    ref.server.eval()
    torch.testing.assert_close(split.server(z), ref.server(z), rtol=1e-4, atol=1e-5)


def test_grouped_convolutions_keep_the_convolution():
    conv = nn.Conv2d(4, 4, 3, 1, 1, groups=2)
    fast = copy.deepcopy(conv)
    fast.__class__ = SmallMapConv2d
    x = torch.randn(2, 4, 1, 1)
    assert torch.equal(fast(x), F.conv2d(x, conv.weight, conv.bias, 1, 1, 1, 2))


def test_channels_last_in_and_out():
    # 2x2 maps: the output is a channels-last view (so BatchNorm takes its channels-last kernel),
    # a channels-last input is read as it is, and both layouts give the convolution's values and
    # gradients; a convolution with a tiny output from a larger map (layer3's stride-2 entry)
    # returns channels-last too
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, 1, 1).double()
    fast = copy.deepcopy(conv)
    fast.__class__ = SmallMapConv2d
    x = torch.randn(70, 8, 2, 2, dtype=torch.double)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        xin = xin.clone().requires_grad_(True)
        y = fast(xin)
        assert y.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, xin, g)
        x0 = x.clone().requires_grad_(True)
        y0 = conv(x0)
        (gx0,) = torch.autograd.grad(y0, x0, g)
        torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, gx0, rtol=1e-12, atol=1e-12)
    entry = copy.deepcopy(nn.Conv2d(8, 6, 3, 2, 1))
    entry.__class__ = SmallMapConv2d
    assert entry(torch.randn(70, 8, 4, 4)).is_contiguous(memory_format=torch.channels_last)
