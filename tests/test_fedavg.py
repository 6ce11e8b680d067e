"""fedavg op: every backend against a hand-computed average, the torch.mv reference and the
authors' per-key loop; broadcast; bf16; argument errors; FlatClients vs fedavg_state_dicts."""
import copy

import pytest
import torch
from torch import nn

from fsl_fast.flat import FlatClients
from fsl_fast.ops import BackendUnavailable, available
from fsl_fast.ops.fedavg import (
    fedavg,
    fedavg_int_buffers,
    fedavg_reference,
    fedavg_state_dicts,
    validate_weights,
)


def _backend_params():
    params = [pytest.param(("reference", "cpu"), id="reference-cpu")]
    ok, why = available("cpp", "cpu")
    params.append(pytest.param(("cpp", "cpu"), id="cpp-cpu",
                               marks=[] if ok else pytest.mark.skip(reason=f"cpp backend: {why}")))
    if torch.cuda.is_available():
        ok, why = available("cuda", "cuda")
        params.append(pytest.param(("cuda", "cuda"), id="cuda",
                                   marks=[] if ok else pytest.mark.skip(reason=f"cuda backend: {why}")))
        ok, why = available("triton", "cuda")
        params.append(pytest.param(("triton", "cuda"), id="triton-cuda",
                                   marks=[] if ok else pytest.mark.skip(reason=f"triton backend: {why}")))
        params.append(pytest.param(("reference", "cuda"), id="reference-cuda"))
    else:
        params.append(pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.skip(
            reason="CUDA backend: torch.cuda.is_available() is False on this machine")))
    return params


BACKENDS = _backend_params()


def _weights(k: int) -> list[float]:
    w = torch.rand(k, dtype=torch.float64) + 0.05
    return (w / w.sum()).tolist()


def _authors_loop(buf: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The per-key loop of the authors' code on one flat key (float32 arithmetic, client order)."""
    return fedavg_state_dicts([{"x": buf[i].float()} for i in range(buf.shape[0])], weights)["x"]


def test_hand_computed_average():
    # Prepare: 0.25 * [1, 2, 3] + 0.75 * [3, 4, 5] = [2.5, 3.5, 4.5] (exact in float32)
    buf = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    for name, device in (("reference", "cpu"), ("cpp", "cpu")):
        if not available(name, device)[0]:
            continue
        # Execute
        out = fedavg(buf, [0.25, 0.75], backend=name)
        # Assert
        assert out.tolist() == [2.5, 3.5, 4.5], name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 100])
@pytest.mark.parametrize("p", [1, 7, 1001, 2**17 + 3])
def test_matches_hand_average_and_authors_loop(backend, k, p, seed):
    name, device = backend
    # Prepare
    buf = torch.randn(k, p, device=device)
    w = _weights(k)
    expected64 = (torch.tensor(w, dtype=torch.float64, device=device)[:, None] * buf.double()).sum(0)
    # Execute
    out = fedavg(buf, w, backend=name)
    # Assert
    assert out.dtype == torch.float32 and out.shape == (p,)
    err = (out.double() - expected64).abs().max().item()
    assert err <= 1e-5, f"fedavg[{name}] K={k} P={p} fp32: max |out - float64 sum| = {err}"
    ref = fedavg_reference(buf, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"fedavg[{name}] vs reference K={k} P={p}: {m}")
    if name != "reference":
        # Same summation order and rounding as the authors' loop: identical bits.
        authors = _authors_loop(buf, w)
        assert torch.equal(out, authors), \
            f"fedavg[{name}] K={k} P={p}: {(out != authors).sum().item()} elements differ from authors' loop"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 100])
@pytest.mark.parametrize("p", [7, 1001])
def test_bf16_buffers_accumulate_in_fp32(backend, k, p, seed):
    name, device = backend
    # Prepare
    buf = torch.randn(k, p, device=device).bfloat16()
    w = _weights(k)
    exact_inputs = buf.float()
    # Execute
    out = fedavg(buf, w, backend=name)
    # Assert: fp32 accumulation of the bf16 values (no bf16 rounding of partial sums).
    ref = fedavg_reference(exact_inputs, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"fedavg[{name}] bf16 K={k} P={p}: {m}")
    if name != "reference":
        assert torch.equal(out, _authors_loop(exact_inputs, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k,p", [(1, 7), (3, 1001), (10, 2**17 + 3)])
def test_broadcast_writes_every_row(backend, dtype, k, p, seed):
    name, device = backend
    # Prepare
    buf = torch.randn(k, p, device=device).to(dtype)
    w = _weights(k)
    expected = fedavg(buf.clone(), w, backend=name)
    out = torch.full((p,), float("nan"), device=device)
    # Execute
    res = fedavg(buf, w, out=out, broadcast=True, backend=name)
    # Assert
    assert res is out
    assert torch.equal(out, expected)
    assert torch.equal(buf, out.to(dtype).expand(k, p)), f"fedavg[{name}] broadcast {dtype} K={k} P={p}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_stride_larger_than_p(backend, seed):
    name, device = backend
    # Prepare: the first 1001 columns of a wider buffer (rows are not contiguous with each other)
    wide = torch.randn(5, 1030, device=device)
    buf = wide[:, :1001]
    untouched = wide[:, 1001:].clone()
    w = _weights(5)
    expected = fedavg(buf.contiguous(), w, backend=name)
    # Execute
    out = fedavg(buf, w, broadcast=True, backend=name)
    # Assert
    assert torch.equal(out, expected)
    assert torch.equal(wide[:, 1001:], untouched)
    assert torch.equal(buf, out.expand(5, 1001))


def test_strided_input_matches_contiguous(seed):
    # Prepare
    wide = torch.randn(5, 1030)
    w = _weights(5)
    # Execute
    a = fedavg(wide[:, 3:1004], w)
    b = fedavg(wide[:, 3:1004].contiguous(), w)
    # Assert
    assert torch.equal(a, b)


def test_deterministic_repeat(seed):
    # Prepare
    buf = torch.randn(10, 300_001)
    w = _weights(10)
    # Execute
    a = fedavg(buf, w)
    b = fedavg(buf, w)
    # Assert
    assert torch.equal(a, b)


@pytest.mark.parametrize("weights,match", [
    ([0.5, 0.6, 0.1], r"must sum to 1 \(within 1e-05\), got sum 1\.2"),
    ([0.3, 0.3, 0.3], r"must sum to 1"),
    ([1.5, -0.5, 0.0], r"must be non-negative, got weights\[1\] = -0\.5"),
    ([float("nan"), 0.5, 0.5], r"must be finite, got weights\[0\] = nan"),
    ([float("inf"), 0.5, 0.5], r"must be finite, got weights\[0\] = inf"),
    ([0.5, 0.5], r"has length 2 but there are K=3 clients"),
    (torch.full((3, 1), 1 / 3), r"must be a 1-D tensor of length K=3, got shape \(3, 1\)"),
    ("abc", r"must be a 1-D tensor or a sequence of numbers, got str"),
    ([0.5, "x", 0.5], r"must contain numbers only"),
])
def test_bad_weights_raise_clear_errors(weights, match):
    buf = torch.randn(3, 7)
    with pytest.raises(ValueError, match=match):
        fedavg(buf, weights)
    with pytest.raises(ValueError, match=match):
        fedavg_reference(buf, weights)


def test_weights_tolerance_and_tensor_weights():
    # Ten weights of 0.1 added left to right do not make exactly 1 in binary; the authors' exact
    # assert fails them. (Python >= 3.12's sum() compensates and gives 1.0, so add by hand.)
    acc = 0.0
    for w in [0.1] * 10:
        acc += w
    assert acc != 1.0
    assert validate_weights([0.1] * 10, 10) == [0.1] * 10
    assert validate_weights(torch.tensor([0.25, 0.75]), 2) == [0.25, 0.75]
    with pytest.raises(ValueError, match="must sum to 1"):
        validate_weights([0.5, 0.5 + 2e-5], 2)
    validate_weights([0.5, 0.5 + 5e-6], 2)
    np = pytest.importorskip("numpy", reason="numpy not installed: numpy weights not tested")
    assert validate_weights(np.array([0.25, 0.75]), 2) == [0.25, 0.75]
    with pytest.raises(ValueError, match=r"must be 1-D of length K=2, got shape \(1, 2\)"):
        validate_weights(np.array([[0.25, 0.75]]), 2)
    with pytest.raises(ValueError, match="sequence of numbers, got dict"):
        validate_weights({"a": 1.0}, 1)


def test_bad_buffers_and_out_raise_clear_errors():
    buf = torch.randn(3, 7)
    w = [0.2, 0.3, 0.5]
    with pytest.raises(ValueError, match=r"buf must be 2-D \[K, P\], got shape \(21,\)"):
        fedavg(buf.view(-1), w)
    with pytest.raises(ValueError, match=r"buf must be float32 or bfloat16, got torch.float64"):
        fedavg(buf.double(), w)
    with pytest.raises(ValueError, match="unit column stride"):
        fedavg(torch.randn(7, 3).t(), w)
    with pytest.raises(ValueError, match=r"out must be float32 \[P\]=\[7\], got torch.float32 \(8,\)"):
        fedavg(buf, w, out=torch.empty(8))
    with pytest.raises(ValueError, match=r"out must be float32 \[P\]=\[7\], got torch.bfloat16"):
        fedavg(buf, w, out=torch.empty(7, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        fedavg(buf, w, out=torch.empty(14)[::2])
    with pytest.raises(ValueError, match="out overlaps buf"):
        fedavg(buf, w, out=buf[1])
    with pytest.raises(BackendUnavailable, match="backend 'cuda'"):
        fedavg(buf, w, backend="cuda")
    with pytest.raises(BackendUnavailable, match="unknown backend 'fast'"):
        fedavg(buf, w, backend="fast")


def test_int_buffers_hand_computed():
    # Prepare: 0.2*3 + 0.3*5 + 0.5*10 = 7.1 -> stored as 7 (truncation, as load_state_dict does)
    counts = torch.tensor([[3], [5], [10]])
    # Execute
    avg = fedavg_int_buffers(counts, [0.2, 0.3, 0.5])
    # Assert
    assert avg.dtype == torch.int64 and avg.tolist() == [7]


def test_int_buffers_match_authors_load_state_dict():
    # Prepare: what the authors' code stores in num_batches_tracked after averaging + loading.
    bn = nn.BatchNorm1d(2)
    counts = [7] * 10 + [3, 1000, 999_999]
    ks = [10, 13]
    for k in ks:
        w = [1.0 / k] * k
        sds = []
        for c in counts[:k]:
            m = copy.deepcopy(bn)
            m.num_batches_tracked.fill_(c)
            sds.append(m.state_dict())
        raw = fedavg_state_dicts(sds, w, cast_back=False)
        loaded = copy.deepcopy(bn)
        loaded.load_state_dict(raw)
        # Execute
        ours = fedavg_int_buffers(torch.tensor(counts[:k])[:, None], w)
        # Assert
        assert raw["num_batches_tracked"].dtype == torch.float32
        assert ours.item() == loaded.num_batches_tracked.item()


def test_state_dicts_hand_computed_and_key_errors():
    # Prepare
    sds = [{"a": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)},
           {"a": torch.tensor([3.0, 6.0]), "n": torch.tensor(8)}]
    # Execute
    avg = fedavg_state_dicts(sds, [0.75, 0.25])
    # Assert
    assert avg["a"].tolist() == [1.5, 3.0]
    assert avg["n"].dtype == torch.int64 and avg["n"].item() == 5
    with pytest.raises(ValueError, match=r"state_dicts\[1\] keys differ"):
        fedavg_state_dicts([sds[0], {"a": sds[1]["a"]}], [0.5, 0.5])
    with pytest.raises(ValueError, match="non-empty sequence"):
        fedavg_state_dicts([], [])


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0][1] == "cpu"])
def test_flat_clients_average_equals_state_dict_average(backend, seed):
    name, _ = backend
    # Prepare: K clients with different weights, BN statistics and batch counts.
    k = 4
    clients = []
    for i in range(k):
        m = _ConvBN()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p))
        m.train()
        for _ in range(i + 1):
            m(torch.randn(5, 3, 6, 6))
        clients.append(m)
    w = _weights(k)
    stack = FlatClients(_ConvBN(), num_clients=k)
    for i, m in enumerate(clients):
        stack.store(i, m)
    expected = _ConvBN()
    expected.load_state_dict(fedavg_state_dicts([m.state_dict() for m in clients], w))
    # Execute
    stack.average(w, broadcast=True, backend=name)
    got = stack.load_into(_ConvBN())
    # Assert
    for key, ref in expected.state_dict().items():
        val = got.state_dict()[key]
        if name == "reference" and ref.is_floating_point():
            torch.testing.assert_close(val, ref, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(val, ref), f"fedavg[{name}] {key}: {val} != {ref}"
    for i in range(k):
        assert torch.equal(stack.buffer[i], stack.global_buffer)
        assert torch.equal(stack.int_buffers[i], stack.global_int_buffer)


@pytest.mark.skipif(not available("cpp", "cpu")[0], reason=f"cpp backend: {available('cpp', 'cpu')[1]}")
def test_opcheck_schema(seed):
    buf = torch.randn(3, 33)
    w = torch.tensor([0.2, 0.3, 0.5])
    out = torch.empty(33)
    torch.library.opcheck(torch.ops.fsl_fast.fedavg.default, (buf, w, out),
                          test_utils=("test_schema",))
    torch.library.opcheck(torch.ops.fsl_fast.fedavg_broadcast.default, (buf, w, out),
                          test_utils=("test_schema",))


@pytest.mark.skipif(not available("cpp", "cpu")[0], reason=f"cpp backend: {available('cpp', 'cpu')[1]}")
def test_cpp_bits_do_not_depend_on_thread_count(seed):
    from fsl_fast.ops import extension

    # Prepare: enough columns for several blocks per thread.
    buf = torch.randn(7, 50_001)
    w = _weights(7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fedavg(buf, w, backend="cpp")
        # torch and the extension share the OpenMP runtime, so this sets the kernel's team size.
        torch.set_num_threads(2)
        if extension().omp_max_threads() != 2:
            pytest.skip("could not give the extension's OpenMP 2 threads via torch.set_num_threads")
        # Execute
        two = fedavg(buf, w, backend="cpp")
    finally:
        torch.set_num_threads(before)
    # Assert
    assert torch.equal(one, two)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_weighted_sum_continues_a_running_sum(backend, seed):
    """weighted_sum: FedAvg's kernels without the sum-to-1 rule. Carrying a partial sum in as a row
    of weight 1 continues it in client order: on the C++ kernel, chained shares equal one FedAvg of
    all rows bit for bit (the distributed runtime's ordered FedAvg relies on it)."""
    from fsl_fast.ops.fedavg import weighted_sum

    ok, why = available(backend, "cpu")
    if not ok:
        pytest.skip(f"{backend}: {why}")
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(5, 1031, generator=g)
    w = torch.rand(5, generator=g).double()
    w = (w / w.sum()).tolist()
    whole = fedavg(buf, w, backend=backend)
    acc = weighted_sum(buf[:2], w[:2], backend=backend)
    acc = weighted_sum(torch.cat([acc[None], buf[2:4]]), [1.0] + w[2:4], backend=backend)
    acc = weighted_sum(torch.cat([acc[None], buf[4:]]), [1.0] + w[4:], backend=backend)
    if backend == "cpp":
        assert torch.equal(acc, whole)
    else:  # torch.mv sums in its own order: float32 rounding apart
        assert torch.allclose(acc, whole, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_sum(buf[:2], [1.0, -0.5])
    assert torch.equal(weighted_sum(buf[:1], [3.0], backend=backend), 3.0 * buf[0])
