"""Split models: the client front, the server back and the client's auxiliary head (ALGORITHM.md §4).

``build_split_model(name, in_shape, num_classes, aux)`` returns a ``SplitModel``. Models:

- ``resnet18``: torchvision-style ResNet-18 (7x7/2 stem + max-pool, BasicBlocks [2, 2, 2, 2]) applied
  unchanged to small images, written here. Client = stem + layer1 + layer2 (cut 128x4x4 for 32x32
  or 28x28 input); server = layer3 + layer4 + avgpool + fc. Auxiliaries: ``layer3`` (default: a
  fresh layer3 + avgpool + fc, the server minus layer4) and ``linear`` (avgpool + fc).
- ``resnet50``: torchvision-style bottleneck ResNet-50 ([3, 4, 6, 3], stride on the 3x3), split as
  resnet18 (cut 512x4x4 for 32x32); auxiliaries ``layer3`` (default, fc on 1024) and ``linear``.
- ``resnet56`` / ``resnet110``: the CIFAR ResNets (three stages of 9 / 18 BasicBlocks) as the
  authors' code builds them: widths 64/128/256, option-A (parameter-free) shortcuts. Client = 3x3
  stem + stage 1 (cut 64xHxW, the input's resolution: 256 KiB of fp32 per 32x32 sample); server =
  stages 2 and 3 + pool + fc; auxiliaries ``layer2`` (default: a fresh stage 2 + pool + fc) and
  ``linear``.
- ``simple_conv``: the CIFAR-10 tutorial network of the FSL-SAGE paper. Client = two conv5x5 layers
  with ReLU, max-pool and local response norm, flattened (4096 for 32x32, 3136 for 28x28); server =
  fc 384 - 192 - C; auxiliary ``linear`` = one Linear.
- ``cnn``: a small two-conv network for MNIST-sized data that trains in seconds on a CPU. Client =
  conv3x3(16) - ReLU - maxpool2 - conv3x3(32) - ReLU - maxpool2, flattened (1568 for 28x28); server =
  fc 128 - C; auxiliary ``linear`` = one Linear.

Auxiliary heads come in two classes the fused engine recognizes: ``LinearAux`` (optional global
average pool, else flatten, then ``fc``) and ``ConvAux`` (``trunk``, global average pool, ``fc``).

A user's own model: ``name`` of the form ``package.module:factory`` imports ``factory`` and calls
``factory(in_shape, num_classes)`` (plus ``aux=NAME`` when an auxiliary other than ``default`` is
asked for). It returns the three modules ``(client, server, aux)`` (a tuple, or a mapping with those
keys): client maps images to smashed activations, server and aux map those to logits. Both engines
run any such modules; which fast paths the fused engine finds for them is printed by
``python -m fsl_fast.env --model NAME``.

Parameters are initialized from torch's global RNG in the order client, server, aux: seed with
``torch.manual_seed`` before building for reproducible weights.
"""
from __future__ import annotations

import importlib
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "MODEL_NAMES",
    "AUX_NAMES",
    "SplitModel",
    "LinearAux",
    "ConvAux",
    "BasicBlock",
    "build_split_model",
    "full",
    "is_factory_name",
]

MODEL_NAMES = ("resnet18", "resnet50", "resnet56", "resnet110", "simple_conv", "cnn")
AUX_NAMES = ("default", "linear", "layer3", "layer2")
# Which auxiliaries each model supports; the first is what "default" means.
_MODEL_AUX = {"resnet18": ("layer3", "linear"), "resnet50": ("layer3", "linear"),
              "resnet56": ("layer2", "linear"), "resnet110": ("layer2", "linear"),
              "simple_conv": ("linear",), "cnn": ("linear",)}


@dataclass
class SplitModel:
    """client: images [B, *in_shape] -> smashed activations [B, *cut_shape].
    server, aux: smashed activations -> logits [B, num_classes].
    cut_shape: one sample's smashed activations, (C, H, W) for a convolutional cut or (D,) when
    the client flattens.
    """

    client: nn.Module
    server: nn.Module
    aux: nn.Module
    cut_shape: tuple[int, ...]
    num_classes: int


class LinearAux(nn.Module):
    """Auxiliary head: global-average-pool over H, W (``pool=True``) or flatten, then ``fc``."""

    def __init__(self, in_features: int, num_classes: int, pool: bool):
        super().__init__()
        self.pool = bool(pool)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z.mean(dim=(2, 3)) if self.pool else z.flatten(1)
        return self.fc(h)


class ConvAux(nn.Module):
    """Auxiliary head with a convolutional trunk: ``fc(mean_hw(trunk(z)))``."""

    def __init__(self, trunk: nn.Module, trunk_channels: int, num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.pool = True
        self.fc = nn.Linear(trunk_channels, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(z).mean(dim=(2, 3)))


def full(client: nn.Module, server: nn.Module) -> nn.Sequential:
    """The whole model (client then server), e.g. what FedAvg trains. Shares the modules' parameters."""
    return nn.Sequential(client, server)


# ----------------------------------------------------------------------------------------------
# ResNet-18


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _projection(cin: int, cout: int, stride: int):
    """The residual shortcut's 1x1 convolution + BN when the shape changes, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; the shortcut is a 1x1 conv + BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


def _resnet_layer(cin: int, cout: int, stride: int, blocks: int = 2) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), *[BasicBlock(cout, cout) for _ in range(blocks - 1)])


def _resnet_init(module: nn.Module) -> None:
    # torchvision's ResNet init: He-normal (fan_out) convs, BN as identity; Linear keeps the default.
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


def _split_resnet(in_shape, num_classes: int, aux: str, make_layer, channels):
    """A torchvision-style ResNet (7x7/2 stem + max-pool, four layers) split as the authors split
    it: client = stem + layer1 + layer2, server = layer3 + layer4 + pool + fc; the "layer3"
    auxiliary is a fresh layer3 + pool + fc, "linear" pool + fc. ``make_layer(i)`` builds layer i;
    ``channels[i]`` is its output width."""
    client = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False),
        bn1=nn.BatchNorm2d(64),
        relu=nn.ReLU(inplace=True),
        maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        layer1=make_layer(1),
        layer2=make_layer(2),
    ))
    _resnet_init(client)
    server = nn.Sequential(OrderedDict(
        layer3=make_layer(3),
        layer4=make_layer(4),
        avgpool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1),
        fc=nn.Linear(channels[4], num_classes),
    ))
    _resnet_init(server)
    if aux == "layer3":
        aux_mod = ConvAux(make_layer(3), channels[3], num_classes)
        _resnet_init(aux_mod)
    else:
        aux_mod = LinearAux(channels[2], num_classes, pool=True)
    return client, server, aux_mod


def _resnet18(in_shape, num_classes: int, aux: str):
    widths = (64, 64, 128, 256, 512)
    return _split_resnet(in_shape, num_classes, aux,
                         lambda i: _resnet_layer(widths[i - 1], widths[i], 1 if i == 1 else 2), widths)


# ----------------------------------------------------------------------------------------------
# ResNet-50: torchvision's bottleneck ResNet (stride on the 3x3 convolution), split as ResNet-18


class Bottleneck(nn.Module):
    """1x1 (width) -> 3x3 (width, stride) -> 1x1 (4 x width), BN after each; shortcut 1x1 conv +
    BN when the shape changes."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _bottleneck_layer(cin: int, width: int, stride: int, blocks: int) -> nn.Sequential:
    cout = width * Bottleneck.expansion
    return nn.Sequential(Bottleneck(cin, width, stride), *[Bottleneck(cout, width) for _ in range(blocks - 1)])


def _resnet50(in_shape, num_classes: int, aux: str):
    # the authors' split, as resnet18's: cut after layer2 (512 channels at 1/8 of the input);
    # "layer3" auxiliary = layer3 + pool + fc(1024)
    widths, blocks = (64, 64, 128, 256, 512), (0, 3, 4, 6, 3)
    cin = (64, 64, 256, 512, 1024)
    return _split_resnet(in_shape, num_classes, aux,
                         lambda i: _bottleneck_layer(cin[i], widths[i], 1 if i == 1 else 2, blocks[i]),
                         tuple(4 * w if i else w for i, w in enumerate(widths)))


# ----------------------------------------------------------------------------------------------
# ResNet-56 / ResNet-110: the CIFAR 3-stage ResNets (He et al. 2016, 6n+2 layers) as the authors
# run them: stage widths 64/128/256 (not the paper's 16/32/64), parameter-free "option A"
# shortcuts (stride-2 subsampling, zero channels padded on both sides), He-normal (fan_in) init
# of convolutions and the classifier. Client = stem + stage 1 (cut: 64 x H x W, full input
# resolution); server = stages 2-3 + pool + fc; "layer2" auxiliary = stage 2 + pool + fc(128).


class PadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and pad the channels with zeros."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class CifarBlock(nn.Module):
    """BasicBlock with an option-A shortcut (no parameters on the shortcut path)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = PadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _cifar_stage(cin: int, cout: int, stride: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(CifarBlock(cin, cout, stride), *[CifarBlock(cout, cout) for _ in range(blocks - 1)])


def _cifar_init(module: nn.Module) -> None:
    for mod in module.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight)


def _cifar_resnet(n: int):
    def build(in_shape, num_classes: int, aux: str):
        client = nn.Sequential(OrderedDict(
            conv1=_conv3x3(in_shape[0], 64),
            bn1=nn.BatchNorm2d(64),
            relu=nn.ReLU(inplace=True),
            layer1=_cifar_stage(64, 64, 1, n),
        ))
        server = nn.Sequential(OrderedDict(
            layer2=_cifar_stage(64, 128, 2, n),
            layer3=_cifar_stage(128, 256, 2, n),
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            fc=nn.Linear(256, num_classes),
        ))
        if aux == "layer2":
            aux_mod = ConvAux(_cifar_stage(64, 128, 2, n), 128, num_classes)
        else:
            aux_mod = LinearAux(64, num_classes, pool=True)
        for m in (client, server, aux_mod):
            _cifar_init(m)
        return client, server, aux_mod

    return build


# ----------------------------------------------------------------------------------------------
# Small conv nets


def _flat_features(client: nn.Module, in_shape) -> int:
    with torch.no_grad():
        return int(client(torch.zeros((1,) + tuple(in_shape))).shape[1])


def _simple_conv(in_shape, num_classes: int, aux: str):
    def lrn():
        return nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0)

    # MaxPool(3, 2, padding 1) halves even sides and rounds odd ones up: 32 -> 16 -> 8, 28 -> 14 -> 7.
    client = nn.Sequential(
        nn.Conv2d(in_shape[0], 64, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        lrn(),
        nn.Conv2d(64, 64, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        lrn(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        nn.Flatten(1),
    )
    d = _flat_features(client, in_shape)
    server = nn.Sequential(
        nn.Linear(d, 384), nn.ReLU(inplace=True),
        nn.Linear(384, 192), nn.ReLU(inplace=True),
        nn.Linear(192, num_classes),
    )
    return client, server, LinearAux(d, num_classes, pool=False)


def _cnn(in_shape, num_classes: int, aux: str):
    client = nn.Sequential(
        nn.Conv2d(in_shape[0], 16, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(1),
    )
    d = _flat_features(client, in_shape)
    server = nn.Sequential(nn.Linear(d, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))
    return client, server, LinearAux(d, num_classes, pool=False)


_BUILDERS = {"resnet18": _resnet18, "resnet50": _resnet50, "resnet56": _cifar_resnet(9),
             "resnet110": _cifar_resnet(18), "simple_conv": _simple_conv, "cnn": _cnn}


_FACTORY_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_factory_name(name: str) -> bool:
    """Whether ``name`` has the ``package.module:factory`` form of a user's model."""
    return isinstance(name, str) and bool(_FACTORY_NAME.match(name))


def _user_factory(name: str):
    mod_name, fn_name = name.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise ValueError(f"model {name!r}: cannot import {mod_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if fn is None:
        raise ValueError(f"model {name!r}: module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise ValueError(f"model {name!r}: {fn_name!r} is not callable")
    return fn


def _build_user(name: str, shape, num_classes: int, aux: str):
    fn = _user_factory(name)
    kw = {} if aux == "default" else {"aux": aux}
    try:
        made = fn(shape, num_classes, **kw)
    except TypeError as e:
        if kw and "aux" in str(e):
            raise ValueError(f"model {name!r}: the factory takes no aux= argument, so --aux must be "
                             f"'default' (got {aux!r})") from None
        raise
    if isinstance(made, SplitModel):
        made = (made.client, made.server, made.aux)
    elif isinstance(made, dict):
        missing = [k for k in ("client", "server", "aux") if k not in made]
        if missing:
            raise ValueError(f"model {name!r}: the factory's mapping lacks {missing}")
        made = (made["client"], made["server"], made["aux"])
    if not isinstance(made, (tuple, list)) or len(made) != 3:
        raise ValueError(f"model {name!r}: the factory must return (client, server, aux) modules, "
                         f"got {type(made).__name__}")
    for what, m in zip(("client", "server", "aux"), made):
        if not isinstance(m, nn.Module):
            raise ValueError(f"model {name!r}: the factory's {what} is a {type(m).__name__}, not an nn.Module")
    if len({id(m) for m in made}) != 3:
        raise ValueError(f"model {name!r}: the factory must return three distinct modules")
    return tuple(made)


def build_split_model(name: str, in_shape, num_classes: int, aux: str = "default") -> SplitModel:
    """Build model ``name`` split at its cut layer, for images of shape ``in_shape`` = (C, H, W).
    ``name`` is a built-in model or ``package.module:factory`` (module doc).

    Raises ValueError for an unknown model or auxiliary name, a factory that cannot be imported or
    returns something else than three modules, a bad shape or class count, or an input too small
    for the model (checked with one forward pass of a zero image in eval mode).
    """
    user = is_factory_name(name)
    if not user and name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} "
                         f"or give package.module:factory")
    choices = (aux,) if user else _MODEL_AUX[name]
    if aux == "default" and not user:
        aux = choices[0]
    if aux not in choices:
        raise ValueError(
            f"auxiliary {aux!r} is not available for model {name!r}; choose one of "
            f"{', '.join(('default',) + choices)}"
        )
    try:
        shape = tuple(int(v) for v in in_shape)
    except (TypeError, ValueError):
        raise ValueError(f"in_shape must be (C, H, W), got {in_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1 or any(v != float(u) for v, u in zip(shape, in_shape)):
        raise ValueError(f"in_shape must be three positive integers (C, H, W), got {in_shape!r}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    num_classes = int(num_classes)
    if user:
        client, server, aux_mod = _build_user(name, shape, num_classes, aux)
    try:
        if not user:
            client, server, aux_mod = _BUILDERS[name](shape, num_classes, aux)
        cut_shape = _check_forward(client, server, aux_mod, shape)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if user:
            raise ValueError(f"model {name!r}: a forward pass of one {shape} image through client, "
                             f"server and aux failed ({first})") from None
        raise ValueError(f"input shape {shape} is too small for model {name!r} ({first})") from None
    if user:
        for what, m in (("server", server), ("aux", aux_mod)):
            out = _eval_forward(m, torch.zeros((1,) + cut_shape))
            if tuple(out.shape) != (1, num_classes):
                raise ValueError(f"model {name!r}: the {what} maps one sample to shape "
                                 f"{tuple(out.shape)}, expected logits (1, {num_classes})")
    return SplitModel(client=client, server=server, aux=aux_mod, cut_shape=cut_shape,
                      num_classes=num_classes)


def _check_forward(client, server, aux, in_shape) -> tuple[int, ...]:
    modules = (client, server, aux)
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()  # BatchNorm in train mode cannot take one sample of 1x1 maps
        with torch.no_grad():
            z = client(torch.zeros((1,) + in_shape))
            if z.numel() == 0:
                raise RuntimeError("the cut-layer activations are empty")
            server(z)
            aux(z)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return tuple(int(v) for v in z.shape[1:])


def _eval_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mode = module.training
    try:
        module.eval()
        with torch.no_grad():
            return module(x)
    finally:
        module.train(mode)
