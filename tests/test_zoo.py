"""The authors' model zoo: resnet50 (bottleneck), resnet56 and resnet110 (CIFAR 3-stage) split where
the authors split them; parameter counts against hand-computed values; both engines, both
precisions."""

import pytest
import torch

from fsl_fast import models as M
from fsl_fast.config import Config
from fsl_fast.runner import Run


def nparams(module):
    return sum(p.numel() for p in module.parameters())


def bn(c):  # BatchNorm weight + bias
    return 2 * c


def bottleneck(cin, width, stride):
    """Parameters of one bottleneck block by hand: 1x1, 3x3, 1x1 convolutions (no bias) with BN,
    plus the 1x1 + BN shortcut when the shape changes."""
    cout = 4 * width
    n = cin * width + bn(width) + 9 * width * width + bn(width) + width * cout + bn(cout)
    if stride != 1 or cin != cout:
        n += cin * cout + bn(cout)
    return n


def bottleneck_layer(cin, width, stride, blocks):
    return bottleneck(cin, width, stride) + (blocks - 1) * bottleneck(4 * width, width, 1)


def cifar_block(cin, cout):  # two 3x3 convolutions with BN; option-A shortcut has no parameters
    return 9 * cin * cout + bn(cout) + 9 * cout * cout + bn(cout)


def cifar_stage(cin, cout, blocks):
    return cifar_block(cin, cout) + (blocks - 1) * cifar_block(cout, cout)


def test_resnet50_parameter_counts_by_hand():
    sm = M.build_split_model("resnet50", (3, 32, 32), 10)
    stem = 3 * 64 * 49 + bn(64)
    layer1, layer2 = bottleneck_layer(64, 64, 1, 3), bottleneck_layer(256, 128, 2, 4)
    layer3, layer4 = bottleneck_layer(512, 256, 2, 6), bottleneck_layer(1024, 512, 2, 3)
    assert (layer1, layer2, layer3, layer4) == (215_808, 1_219_584, 7_098_368, 14_964_736)
    assert nparams(sm.client) == stem + layer1 + layer2 == 1_444_928
    assert nparams(sm.server) == layer3 + layer4 + 2048 * 10 + 10 == 22_083_594
    assert nparams(sm.aux) == layer3 + 1024 * 10 + 10 == 7_108_618
    # the whole network is torchvision's resnet50: 25,557,032 parameters with 1000 classes
    full = M.build_split_model("resnet50", (3, 32, 32), 1000)
    assert nparams(full.client) + nparams(full.server) == 25_557_032
    assert sm.cut_shape == (512, 4, 4)
    assert nparams(M.build_split_model("resnet50", (3, 32, 32), 10, aux="linear").aux) == 512 * 10 + 10


@pytest.mark.parametrize("name,n", [("resnet56", 9), ("resnet110", 18)])
def test_cifar_resnet_parameter_counts_by_hand(name, n):
    sm = M.build_split_model(name, (3, 32, 32), 10)
    stem = 9 * 3 * 64 + bn(64)
    s1, s2, s3 = cifar_stage(64, 64, n), cifar_stage(64, 128, n), cifar_stage(128, 256, n)
    assert nparams(sm.client) == stem + s1
    assert nparams(sm.server) == s2 + s3 + 256 * 10 + 10
    assert nparams(sm.aux) == s2 + 128 * 10 + 10
    want = {"resnet56": (667_712, 12_918_794, 2_586_378), "resnet110": (1_333_568, 26_203_658, 5_245_194)}
    assert (nparams(sm.client), nparams(sm.server), nparams(sm.aux)) == want[name]
    assert sm.cut_shape == (64, 32, 32)
    # 6n + 2 weighted layers: the stem, 2 per block, the classifier
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in list(sm.client.modules()) + list(sm.server.modules()))
    assert convs + 1 == 6 * n + 2
    assert nparams(M.build_split_model(name, (3, 32, 32), 10, aux="linear").aux) == 64 * 10 + 10


def test_option_a_shortcut_by_hand():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    y = M.PadShortcut(4, 8, 2)(x)
    assert y.shape == (2, 8, 2, 2)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert y[:, :2].abs().sum() == 0 and y[:, 6:].abs().sum() == 0


def _cfg(model, **kw):
    return Config(model=model, dataset="synthetic:3x32x32:32", clients=2, batch_size=8, server_update_interval=1,
                  buffer_size=16, align_batch_size=16, align_epochs=1, align_interval=1, seed=1, **kw).resolved()


def _deltas(run, fn):
    before = {p: {k: v.float().clone() for k, v in sd.items() if v.is_floating_point()}
              for p, sd in run.engine.named_state().items() if p in ("client", "server")}
    rec = fn()
    after = run.engine.named_state()
    return rec, {p: {k: after[p][k].float() - v for k, v in sd.items()} for p, sd in before.items()}


def _check_engines(model, monkeypatch):
    """fsl_sage (client, server, auxiliary, alignment) for one round on both engines and in both
    precisions. Client and server train with SGD and the auxiliary at a tiny Adam rate: Adam's
    first steps are about lr * sign(g), and the sign of a near-zero gradient differs with
    rounding (at the default rates that moved the next batches' loss by 5% between the engines
    on resnet50), while SGD's steps differ only by the rounding of the gradients. fp32 (kernels
    that keep the reference's arithmetic): the same training loss and client/server updates
    within a tenth of each tensor's largest change; bf16 (the engines' fast paths): a sane
    training loss (within 20% of fp32's; measured on resnet50: 2.53 vs 2.77, as bf16's 8-bit
    mantissa through 50 layers at initialization goes), every parameter finite."""
    kw = dict(optimizer="sgd", lr=1e-3, aux_lr=1e-7)
    monkeypatch.setenv("FSL_FAST_BITWISE", "1")
    ref, fused = Run(_cfg(model, **kw)), Run(_cfg(model, fused=True, **kw))
    ra, da = _deltas(ref, ref.step)
    rb, db = _deltas(fused, fused.step)
    assert ra["train_samples"] == rb["train_samples"] == 32
    assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
    for part in da:
        for name, a in da[part].items():
            scale = float(a.abs().max())
            assert float((db[part][name] - a).abs().max()) <= 0.1 * scale + 1e-9, (part, name)
    monkeypatch.setenv("FSL_FAST_BITWISE", "0")
    for f in (False, True):
        run = Run(_cfg(model, fused=f, precision="bf16", **kw))
        rec = run.step()
        assert rec["train_loss"] == pytest.approx(ra["train_loss"], rel=0.2)
        for part, sd in run.engine.named_state().items():
            assert all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point()), part


@pytest.mark.parametrize("model", ["resnet50", "resnet56"])
def test_zoo_models_on_both_engines_and_precisions(model, monkeypatch):
    _check_engines(model, monkeypatch)


@pytest.mark.slow
def test_resnet110_on_both_engines_and_precisions(monkeypatch):
    _check_engines("resnet110", monkeypatch)
