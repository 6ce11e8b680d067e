"""Triton FedAvg vs the hand-computed average, the reference and the authors' loop (tiny shapes:
the interpreter is 40-100x slower than eager torch). bf16 only on a GPU: the 3.9 interpreter is
wrong for bf16 arithmetic (PERF.md)."""
import pytest
import torch

from fsl_fast.ops.fedavg import fedavg, fedavg_reference, fedavg_state_dicts


def _weights(k):
    w = torch.rand(k, dtype=torch.float64) + 0.05
    return (w / w.sum()).tolist()


def _authors_loop(buf, weights):
    return fedavg_state_dicts([{"x": buf[i].float()} for i in range(buf.shape[0])], weights)["x"]


def test_hand_computed_average(triton_device):
    # Prepare: 0.25 * [1, 2, 3] + 0.75 * [3, 4, 5] = [2.5, 3.5, 4.5]
    buf = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], device=triton_device)
    # Execute
    out = fedavg(buf, [0.25, 0.75], backend="triton")
    # Assert
    assert out.tolist() == [2.5, 3.5, 4.5]


@pytest.mark.parametrize("k", [1, 3, 100])
@pytest.mark.parametrize("p", [1, 7, 1001])
def test_matches_reference_and_authors_loop(triton_device, k, p, seed):
    # Prepare
    buf = torch.randn(k, p, device=triton_device)
    w = _weights(k)
    # Execute
    out = fedavg(buf, w, backend="triton")
    # Assert
    torch.testing.assert_close(out, fedavg_reference(buf, w), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"fedavg[triton] K={k} P={p}: {m}")
    authors = _authors_loop(buf, w)
    assert torch.equal(out, authors), \
        f"fedavg[triton] K={k} P={p}: {(out != authors).sum().item()} elements differ from authors' loop"


@pytest.mark.parametrize("k,p", [(1, 7), (4, 1001)])
def test_broadcast_and_strided_rows(triton_device, k, p, seed):
    # Prepare: rows of a wider buffer (row stride p + 9)
    wide = torch.randn(k, p + 9, device=triton_device)
    buf = wide[:, :p]
    tail = wide[:, p:].clone()
    w = _weights(k)
    expected = fedavg(buf.contiguous(), w, backend="reference")
    # Execute
    out = fedavg(buf, w, broadcast=True, backend="triton")
    # Assert
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(buf, out.expand(k, p))
    assert torch.equal(wide[:, p:], tail)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 Triton needs a GPU: the triton 3.9 interpreter is wrong for bf16 arithmetic")
@pytest.mark.parametrize("broadcast", [False, True])
def test_bf16_on_gpu(broadcast, seed):
    # Prepare
    buf = torch.randn(5, 3001, device="cuda").bfloat16()
    w = _weights(5)
    expected = _authors_loop(buf, w)
    # Execute
    out = fedavg(buf, w, broadcast=broadcast, backend="triton")
    # Assert
    assert torch.equal(out, expected)
    if broadcast:
        assert torch.equal(buf, expected.bfloat16().expand(5, 3001))
