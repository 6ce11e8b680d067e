"""Split models (fsl_fast.models): sizes, cut shapes, heads, init and a short training check."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsl_fast import data as D
from fsl_fast import models as M


def nparams(module):
    return sum(p.numel() for p in module.parameters())


def nbytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def test_resnet18_parameter_counts_match_the_paper(seed):
    sm = M.build_split_model("resnet18", (3, 32, 32), 10)
    assert nparams(sm.client) == 683_072
    assert nparams(sm.server) == 10_498_570
    assert nparams(sm.aux) == 2_102_282
    assert isinstance(sm.aux, M.ConvAux)
    # ALGORITHM.md §4 sizes with buffers, fp32 (BN num_batches_tracked is int64: 8 bytes)
    assert nbytes(sm.client) / 2**20 == pytest.approx(2.61, abs=0.005)
    assert nbytes(sm.server) / 2**20 == pytest.approx(40.08, abs=0.005)
    assert nbytes(sm.aux) / 2**20 == pytest.approx(8.03, abs=0.005)
    # whole model = torchvision resnet18(num_classes=10): 11,181,642 parameters
    assert nparams(M.full(sm.client, sm.server)) == 11_181_642
    lin = M.build_split_model("resnet18", (3, 32, 32), 10, aux="linear").aux
    assert isinstance(lin, M.LinearAux) and lin.pool and nparams(lin) == 128 * 10 + 10


CUTS = {
    ("resnet18", (3, 32, 32)): (128, 4, 4),
    ("resnet18", (1, 28, 28)): (128, 4, 4),
    ("simple_conv", (3, 32, 32)): (4096,),
    ("simple_conv", (1, 28, 28)): (3136,),
    ("cnn", (3, 32, 32)): (2048,),
    ("cnn", (1, 28, 28)): (1568,),
}


@pytest.mark.parametrize("name,in_shape", list(CUTS))
def test_cut_shapes_and_output_shapes(name, in_shape, seed):
    auxes = ["default", "linear"] + (["layer3"] if name == "resnet18" else [])
    for aux in auxes:
        sm = M.build_split_model(name, in_shape, 7, aux=aux)
        assert sm.cut_shape == CUTS[(name, in_shape)] and sm.num_classes == 7
        x = torch.randn(3, *in_shape)
        z = sm.client(x)
        assert tuple(z.shape) == (3,) + sm.cut_shape
        assert sm.server(z).shape == (3, 7)
        assert sm.aux(z).shape == (3, 7)
        assert torch.equal(M.full(sm.client, sm.server)(x), sm.server(z))
        assert sm.client.training and sm.server.training and sm.aux.training


def test_simple_conv_layers_and_head():
    sm = M.build_split_model("simple_conv", (3, 32, 32), 10)
    assert isinstance(sm.aux, M.LinearAux) and not sm.aux.pool
    assert sm.aux.fc.in_features == 4096 and sm.aux.fc.out_features == 10
    assert [m.out_features for m in sm.server if isinstance(m, nn.Linear)] == [384, 192, 10]
    lrn = [m for m in sm.client if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrn) == 2 and lrn[0].size == 4 and lrn[0].alpha == pytest.approx(0.001 / 9)
    assert lrn[0].beta == 0.75 and lrn[0].k == 1.0
    # client params: conv 3->64 5x5 and 64->64 5x5 with biases
    assert nparams(sm.client) == (3 * 25 * 64 + 64) + (64 * 25 * 64 + 64)


def test_cnn_has_no_normalization_layers():
    sm = M.build_split_model("cnn", (1, 28, 28), 10)
    kinds = {type(m) for part in (sm.client, sm.server, sm.aux) for m in part.modules()}
    assert not kinds & {nn.BatchNorm2d, nn.LocalResponseNorm}
    assert isinstance(sm.aux, M.LinearAux) and not sm.aux.pool and sm.aux.fc.in_features == 1568


def test_linear_aux_pools_or_flattens(seed):
    z = torch.randn(4, 5, 3, 3)
    pooled = M.LinearAux(5, 2, pool=True)
    assert torch.allclose(pooled(z), pooled.fc(z.mean((2, 3))))
    flat = M.LinearAux(45, 2, pool=False)
    assert torch.allclose(flat(z), flat.fc(z.reshape(4, 45)))


def test_conv_aux_is_layer3_pool_fc(seed):
    sm = M.build_split_model("resnet18", (3, 32, 32), 10)
    aux = sm.aux
    assert aux.pool is True and aux.fc.in_features == 256
    assert [nparams(b) for b in aux.trunk] == [nparams(b) for b in sm.server.layer3]
    z = torch.randn(2, 128, 4, 4)
    assert torch.allclose(aux(z), aux.fc(aux.trunk(z).mean((2, 3))))
    # a fresh trunk, not the server's layer3
    assert not torch.equal(aux.trunk[0].conv1.weight, sm.server.layer3[0].conv1.weight)


def test_resnet_server_exposes_layers_and_init(seed):
    sm = M.build_split_model("resnet18", (3, 32, 32), 10)
    assert [n for n, _ in sm.server.named_children()] == ["layer3", "layer4", "avgpool", "flatten", "fc"]
    assert [n for n, _ in sm.client.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1",
                                                           "layer2"]
    conv1 = sm.client.conv1
    assert conv1.kernel_size == (7, 7) and conv1.stride == (2, 2) and conv1.bias is None
    # kaiming normal, fan_out, relu gain: std = sqrt(2 / (out_channels * k * k))
    w = sm.server.layer4[0].conv1.weight  # 512 x 256 x 3 x 3: plenty of samples
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)
    for part in (sm.client, sm.server, sm.aux):
        for m in part.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # the shortcut of a shape-changing block is a 1x1 conv + BN
    ds = sm.client.layer2[0].downsample
    assert isinstance(ds[0], nn.Conv2d) and ds[0].kernel_size == (1, 1) and isinstance(ds[1], nn.BatchNorm2d)
    assert sm.client.layer1[0].downsample is None


def test_build_is_reproducible_under_seed():
    torch.manual_seed(0)
    a = M.build_split_model("simple_conv", (3, 32, 32), 10)
    torch.manual_seed(0)
    b = M.build_split_model("simple_conv", (3, 32, 32), 10)
    for pa, pb in zip(a.client.parameters(), b.client.parameters()):
        assert torch.equal(pa, pb)


def test_build_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose one of resnet18, resnet50, resnet56, resnet110, simple_conv, cnn"):
        M.build_split_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="auxiliary 'layer3' is not available for model 'cnn'"):
        M.build_split_model("cnn", (1, 28, 28), 10, aux="layer3")
    with pytest.raises(ValueError, match="auxiliary 'half' is not available"):
        M.build_split_model("resnet18", (3, 32, 32), 10, aux="half")
    with pytest.raises(ValueError, match=r"input shape \(1, 3, 3\) is too small for model 'cnn'"):
        M.build_split_model("cnn", (1, 3, 3), 10)
    with pytest.raises(ValueError, match="in_shape must be three positive integers"):
        M.build_split_model("cnn", (28, 28), 10)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        M.build_split_model("cnn", (1, 28, 28), 1)
    assert set(M.MODEL_NAMES) == {"resnet18", "resnet50", "resnet56", "resnet110", "simple_conv", "cnn"}
    assert set(M.AUX_NAMES) == {"default", "linear", "layer3", "layer2"}


def test_cnn_learns_mnist5k_quickly(seed):
    # 120 Adam steps (about 2 epochs of 4,000 images at batch 64, ~3 s on one core) take the
    # test accuracy from chance to well above 85% (measured: 0.935 after 126 steps).
    ds = D.load_dataset("mnist5k", seed=0)
    sm = M.build_split_model("cnn", ds.in_shape, ds.num_classes)
    net = M.full(sm.client, sm.server)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def accuracy():
        with torch.no_grad():
            hits = sum((net(x).argmax(1) == y).sum().item() for x, y in D.test_batches(ds))
        return hits / ds.num_test

    before = accuracy()
    loader = D.ClientLoader(ds, torch.arange(ds.num_train), 64, torch.Generator().manual_seed(0))
    steps = 0
    while steps < 120:
        for x, y in loader:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 120:
                break
    after = accuracy()
    assert before < 0.3 and after > 0.85, (before, after)
