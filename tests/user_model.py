"""Models defined outside fsl_fast, for ``--model tests.user_model:FACTORY`` (tests/test_executors.py).

``make``: a client with BatchNorm (its convolution without a bias: a bias before BatchNorm has a
gradient of zero up to rounding, which Adam turns into steps of ~lr that differ between engines)
and average pooling, a Tanh server and a Sequential auxiliary:
nothing the fused engine's specialised executors recognise, so every part runs generic.
``blocks``: conv + ReLU + max-pool blocks with a LocalResponseNorm between them, which the fused
engine turns into C++ conv blocks run through autograd (executor ``conv_blocks``).
``broken_*``: factories that break the contract, for the error messages.
"""
from torch import nn


def make(in_shape, num_classes, aux="default"):
    c, h, w = in_shape
    client = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2))
    d = 8 * (h // 2) * (w // 2)
    server = nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, num_classes))
    if aux == "default":
        head = nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes))
    elif aux == "wide":
        head = nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, num_classes))
    else:
        raise ValueError(f"unknown aux {aux!r}")
    return client, server, head


def blocks(in_shape, num_classes):
    c, h, w = in_shape
    client = nn.Sequential(
        nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.LocalResponseNorm(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    d = 8 * (h // 4) * (w // 4)
    server = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, num_classes))
    return {"client": client, "server": server, "aux": nn.Linear(d, num_classes)}


def broken_not_modules(in_shape, num_classes):
    return nn.Identity(), "server", nn.Identity()


def broken_two(in_shape, num_classes):
    return nn.Identity(), nn.Identity()


def broken_logits(in_shape, num_classes):
    c, h, w = in_shape
    return nn.Flatten(), nn.Linear(c * h * w, num_classes + 1), nn.Linear(c * h * w, num_classes)


not_callable = 3
