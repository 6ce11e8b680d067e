"""FlatLayout / FlatClients: layout, round trips, zero-copy views, bind + optimizer, vmap."""
import copy

import pytest
import torch
from torch import nn

from fsl_fast.flat import FlatClients, FlatLayout


class SmallNet(nn.Module):
    """Conv + BatchNorm net with every kind of state: params, float buffers, int buffers, a
    parameter without bias, and a non-persistent buffer (which must stay out of the layout)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)) * self.scale)


def _randomize(model: nn.Module, steps: int = 2) -> nn.Module:
    """Give every tensor of the model a distinct, non-default value (params, BN stats, counts)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model.train()
    for _ in range(steps):
        model(torch.randn(4, 3, 6, 6))
    return model


def _assert_state_equal(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), f"{key}: {sa[key]} != {sb[key]}"


def test_layout_order_offsets_and_names():
    # Prepare
    model = SmallNet()
    # Execute
    layout = FlatLayout.from_module(model)
    # Assert: params first (registration order), then float buffers, int buffers apart.
    assert layout.param_names == [n for n, _ in model.named_parameters()]
    assert layout.buffer_names == ["bn1.running_mean", "bn1.running_var",
                                   "bn2.running_mean", "bn2.running_var"]
    assert layout.int_buffer_names == ["bn1.num_batches_tracked", "bn2.num_batches_tracked"]
    assert "scale" not in layout.names + layout.int_buffer_names  # non-persistent
    assert layout.names == layout.param_names + layout.buffer_names
    expected_p = sum(p.numel() for p in model.parameters()) + 2 * (4 + 6)
    assert layout.numel == expected_p
    assert layout.int_numel == 2
    off = 0
    for e in layout.entries:
        assert e.offset == off
        off += e.numel
    assert off == layout.numel


def test_flatten_load_flat_round_trip(seed):
    # Prepare
    src = _randomize(SmallNet())
    dst = SmallNet()
    layout = FlatLayout.from_module(src)
    # Execute
    vec = layout.flatten(src)
    ivec = layout.flatten_int(src)
    layout.load_flat(dst, vec)
    layout.load_int(dst, ivec)
    # Assert
    assert vec.dtype == torch.float32 and vec.shape == (layout.numel,)
    assert ivec.dtype == torch.int64 and ivec.tolist() == [2, 2]
    _assert_state_equal(src, dst)
    e = layout.entries[0]
    assert torch.equal(vec[e.offset:e.offset + e.numel].view(e.shape), src.conv1.weight)


def test_flat_clients_round_trip_every_row_and_global(seed):
    # Prepare
    model = _randomize(SmallNet())
    # Execute
    stack = FlatClients(model, num_clients=3)
    # Assert
    assert stack.buffer.shape == (3, stack.layout.numel)
    assert stack.int_buffers.shape == (3, 2) and stack.int_buffers.dtype == torch.int64
    for k in (0, 1, 2, None):
        _assert_state_equal(model, stack.load_into(SmallNet(), k))


def test_store_then_load_into_keeps_rows_apart(seed):
    # Prepare
    models = [_randomize(SmallNet(), steps=k + 1) for k in range(3)]
    stack = FlatClients(SmallNet(), num_clients=3)
    # Execute
    for k, m in enumerate(models):
        stack.store(k, m)
    # Assert
    for k, m in enumerate(models):
        _assert_state_equal(m, stack.load_into(SmallNet(), k))
    assert stack.int_buffers[:, 0].tolist() == [1, 2, 3]


def test_views_and_stacked_are_zero_copy(seed):
    # Prepare
    stack = FlatClients(_randomize(SmallNet()), num_clients=4)
    lo = stack.buffer.data_ptr()
    hi = lo + stack.buffer.numel() * stack.buffer.element_size()
    # Execute
    views = stack.views(2)
    st = stack.stacked()
    views["fc.bias"].fill_(7.0)
    st["conv1.weight"][3].zero_()
    st["bn1.num_batches_tracked"][1].fill_(42)
    # Assert
    e = {x.name: x for x in stack.layout.entries}
    assert torch.all(stack.buffer[2, e["fc.bias"].offset:e["fc.bias"].offset + 5] == 7.0)
    w = e["conv1.weight"]
    assert torch.all(stack.buffer[3, w.offset:w.offset + w.numel] == 0)
    assert stack.int_buffers[1, 0].item() == 42
    for name, v in views.items():
        assert v.shape == e[name].shape and lo <= v.data_ptr() < hi
    for name, v in st.items():
        assert v.shape[0] == 4
    assert set(st) == set(stack.layout.names + stack.layout.int_buffer_names)
    assert set(stack.stacked(with_int=False)) == set(stack.layout.names)


def test_bind_optimizer_step_updates_flat_buffer(seed):
    # Prepare
    stack = FlatClients(_randomize(SmallNet()), num_clients=3)
    before = stack.buffer.clone()
    ints_before = stack.int_buffers.clone()
    model = stack.bind(1, SmallNet())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    # Execute
    model.train()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    # Assert: row 1 moved by -lr * grad, BN statistics and counts moved in place, others untouched.
    for name, p in model.named_parameters():
        assert p.is_leaf and isinstance(p, nn.Parameter)
        assert p.untyped_storage().data_ptr() == stack.buffer.untyped_storage().data_ptr()
    views = stack.views(1)
    e = {x.name: x for x in stack.layout.entries}
    for name, g in grads.items():
        old = before[1, e[name].offset:e[name].offset + e[name].numel].view(e[name].shape)
        torch.testing.assert_close(views[name], old - 0.1 * g, rtol=0, atol=1e-6)
    assert not torch.equal(views["bn1.running_mean"],
                           before[1, e["bn1.running_mean"].offset:][:4])
    assert stack.int_buffers[1].tolist() == [v + 1 for v in ints_before[1].tolist()]
    assert torch.equal(stack.buffer[0], before[0]) and torch.equal(stack.buffer[2], before[2])
    assert torch.equal(stack.int_buffers[0], ints_before[0])


def test_bind_with_grad_buffer(seed):
    # Prepare
    stack = FlatClients(_randomize(SmallNet()), num_clients=2)
    model = stack.bind(0, SmallNet(), grads=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 6, 6)
    # Execute: two backward passes accumulate, zero_grad(set_to_none=False) keeps the binding.
    model(x).sum().backward()
    first = stack.grad_buffer[0].clone()
    model(x).sum().backward()
    second = stack.grad_buffer[0].clone()
    opt.zero_grad(set_to_none=False)
    # Assert
    n_params = sum(p.numel() for p in model.parameters())
    assert first[:n_params].abs().sum() > 0
    torch.testing.assert_close(second, 2 * first)
    assert torch.all(stack.grad_buffer == 0)
    for p in model.parameters():
        assert p.grad.untyped_storage().data_ptr() == stack.grad_buffer.untyped_storage().data_ptr()
    assert torch.all(stack.grad_buffer[1] == 0)


def test_bind_keeps_tied_parameters_tied():
    # Prepare
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)
            self.b = nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    model = Tied()
    stack = FlatClients(model, num_clients=2)
    # Execute
    bound = stack.bind(1, Tied())
    # Assert
    assert stack.layout.param_names == ["a.weight"]
    assert bound.a.weight is bound.b.weight
    assert bound.a.weight.data_ptr() == stack.buffer[1].data_ptr()


def test_vmap_functional_call_over_stacked_matches_per_client(seed):
    # Prepare
    models = [_randomize(SmallNet(), steps=k + 1).eval() for k in range(3)]
    stack = FlatClients(SmallNet(), num_clients=3)
    for k, m in enumerate(models):
        stack.store(k, m)
    base = SmallNet().eval()
    x = torch.randn(3, 2, 3, 6, 6)
    # Execute
    out = torch.vmap(lambda params, xb: torch.func.functional_call(base, params, (xb,)))(
        stack.stacked(with_int=False), x)
    # Assert
    for k, m in enumerate(models):
        torch.testing.assert_close(out[k], m(x[k]))


def test_bf16_storage_rounds_once(seed):
    # Prepare
    model = _randomize(SmallNet())
    # Execute
    stack = FlatClients(model, num_clients=2, dtype=torch.bfloat16)
    # Assert
    vec = stack.layout.flatten(model)
    assert stack.buffer.dtype == torch.bfloat16
    assert torch.equal(stack.buffer[1], vec.bfloat16())
    assert torch.equal(stack.global_buffer, vec)


def test_mismatched_module_and_bad_arguments():
    stack = FlatClients(SmallNet(), num_clients=2)
    with pytest.raises(ValueError, match="does not match the layout"):
        stack.bind(0, nn.Linear(3, 3))
    with pytest.raises(ValueError, match="does not match the layout"):
        stack.load_into(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match=r"client index must be an int in \[0, 2\)"):
        stack.views(2)
    with pytest.raises(ValueError, match="num_clients must be a positive int"):
        FlatClients(SmallNet(), num_clients=0)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        FlatClients(SmallNet(), num_clients=2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"vec must be a \["):
        stack.layout.load_flat(SmallNet(), torch.zeros(3))
    with pytest.raises(ValueError, match="integer dtype"):
        stack.layout.load_int(SmallNet(), torch.zeros(2))


def test_load_into_does_not_alias_the_buffer(seed):
    # Prepare
    stack = FlatClients(_randomize(SmallNet()), num_clients=2)
    target = copy.deepcopy(SmallNet())
    # Execute
    stack.load_into(target, 0)
    stack.buffer.zero_()
    # Assert: load_into copies, so the module keeps its values.
    assert target.conv1.weight.abs().sum() > 0
