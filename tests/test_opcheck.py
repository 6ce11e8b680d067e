"""Every C++ op of the extension passes torch.library.opcheck: its schema matches what the kernel
does (mutation annotations included), its fake kernel gives the real outputs' shapes, dtypes and
layouts, its autograd registration is right (forward ops differentiable, with inputs that require
grad), and it runs under AOT dispatch with dynamic shapes. A new op that the extension defines
without a case here fails test_every_op_has_a_case."""
from __future__ import annotations

import pytest
import torch

from fsl_fast.ops import available

pytestmark = pytest.mark.skipif(not available("cpp", "cpu")[0],
                                reason=f"needs the C++ extension: {available('cpp', 'cpu')[1]}")


def _lib():
    from fsl_fast.ops import library

    library.ops()  # loads the extension and its registrations
    return library


def _adam():
    p, g, m, v = (torch.randn(3, 40) for _ in range(4))
    return (p, g, m, v.abs(), 1e-3, 0.9, 0.999, 1e-8, 0.01, 3)


def _aux_estimate():
    return (torch.randn(2, 5, 7), torch.randn(2, 3, 7), torch.randn(2, 3), torch.randint(0, 3, (2, 5)), 1.0, 0.2)


def _aux_align():
    return (torch.randn(2, 5, 7), torch.randn(2, 3, 7), torch.randn(2, 3), torch.randint(0, 3, (2, 5)),
            torch.randn(2, 5, 7), 1.0, 0.2)


def _conv_fwd(cl=False, grouped=False, save=True):
    x = torch.randn(4, 3, 10, 10)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(2, 8, 3, 3, 3) if grouped else torch.randn(8, 3, 3, 3)
    b = torch.randn(2, 8) if grouped else torch.randn(8)
    for t in (x, w, b):
        t.requires_grad_(save)
    return (x, w, b, 2, 2, 0, cl, save)


def _conv_bwd(need_x=True, cl=False):
    x, w, b, k, s, p, _, _ = _conv_fwd(cl=cl)
    y, idx, xp = torch.ops.fsl_fast.conv_pool_relu_fwd(x.detach(), w.detach(), b.detach(), k, s, p, cl, True)
    return (torch.randn_like(y), idx, xp, w.detach(), need_x, k, s, p, cl)


def _fedavg():
    return (torch.randn(3, 33), torch.tensor([0.2, 0.3, 0.5]), torch.empty(33))


def _lrn_fwd():
    return (torch.randn(2, 6, 5, 5, requires_grad=True), 3, 1e-3, 0.75, 2.0)


def _lrn_bwd():
    x = torch.randn(2, 6, 5, 5)
    _, s = torch.ops.fsl_fast.lrn_fwd(x, 3, 1e-3, 0.75, 2.0)
    return (torch.randn(2, 6, 5, 5), x, s, 3, 1e-3, 0.75, 2.0)


def _pool_fwd():
    return (torch.randn(2, 3, 9, 9, requires_grad=True), 3, 2, 1)


def _pool_bwd():
    x = torch.randn(2, 3, 9, 9)
    y, idx = torch.ops.fsl_fast.pool_relu_fwd(x, 3, 2, 1)
    return (torch.randn_like(y), idx, 9, 9)


def _quantize(bits, gs):
    from fsl_fast.ops import quantize as Q

    x = torch.randn(6, 50)
    q = Q.quantize(x, bits=bits, group_size=gs or None)
    gs = q.group_size or 50  # per-row int8: one group of the whole row
    return (x, bits, gs, True, 12345, torch.empty_like(q.codes), torch.empty_like(q.scales))


def _dequantize(bits, gs):
    from fsl_fast.ops import quantize as Q

    x = torch.randn(6, 50)
    q = Q.quantize(x, bits=bits, group_size=gs or None)
    return (q.codes, q.scales, bits, q.group_size or 50, torch.empty(6, 50))


def _topk(k):
    return (torch.randint(-3, 4, (5, 40)).float(), k, torch.empty(5, k, dtype=torch.int64), torch.empty(5, k))


# op -> {case name: argument builder}
CASES = {
    "adam_step": {"flat": _adam},
    "aux_estimate": {"linear": _aux_estimate},
    "aux_align": {"linear": _aux_align},
    "conv_pool_relu_fwd": {"nchw": _conv_fwd, "channels_last": lambda: _conv_fwd(cl=True),
                           "grouped": lambda: _conv_fwd(grouped=True), "no_save": lambda: _conv_fwd(save=False)},
    "conv_pool_relu_bwd": {"nchw": _conv_bwd, "weights_only": lambda: _conv_bwd(need_x=False),
                           "channels_last": lambda: _conv_bwd(cl=True)},
    "fedavg": {"3x33": _fedavg},
    "fedavg_broadcast": {"3x33": _fedavg},
    "lrn_fwd": {"4d": _lrn_fwd},
    "lrn_bwd": {"4d": _lrn_bwd},
    "pool_relu_fwd": {"pad1": _pool_fwd},
    "pool_relu_bwd": {"pad1": _pool_bwd},
    "quantize_rows_": {"int8_row": lambda: _quantize(8, 0), "int4_g16": lambda: _quantize(4, 16),
                       "int2_g8": lambda: _quantize(2, 8)},
    "quantize_dequantize_": {"int8_row": lambda: _dequantize(8, 0), "int4_g16": lambda: _dequantize(4, 16),
                             "int2_g8": lambda: _dequantize(2, 8)},
    "topk_rows_": {"k7_ties": lambda: _topk(7), "k_all": lambda: _topk(40)},
}


def test_every_op_has_a_case():
    lib = _lib()
    defined = set(lib.defined_ops())
    assert defined == set(lib.OPS), f"ops without an entry in fsl_fast.ops.library.OPS: {defined ^ set(lib.OPS)}"
    assert set(CASES) == defined, f"ops without an opcheck case here: {defined ^ set(CASES)}"


@pytest.mark.parametrize("op,case", [(op, c) for op, cases in CASES.items() for c in cases])
def test_opcheck(seed, op, case):
    _lib()
    args = CASES[op][case]()
    result = torch.library.opcheck(getattr(torch.ops.fsl_fast, op).default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("op", ["pool_relu_fwd", "lrn_fwd", "conv_pool_relu_fwd"])
def test_forward_ops_differentiate_through_their_registration(seed, op):
    """The registered autograd formula gives torch's gradients (the ops' own tests check values
    in depth; here: the registration is wired to the right backward)."""
    import torch.nn.functional as F

    _lib()
    args = list(CASES[op][next(iter(CASES[op]))]())
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = getattr(torch.ops.fsl_fast, op)(*args)[0]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, g)
    x = args[0].detach().double().requires_grad_()
    rest = [a.detach().double().requires_grad_() for a in inputs[1:]]
    if op == "pool_relu_fwd":
        ref = F.max_pool2d(F.relu(x), args[1], args[2], args[3])
    elif op == "lrn_fwd":
        ref = F.local_response_norm(x, args[1], args[2], args[3], args[4])
    else:
        w, b = rest
        ref = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=w.shape[-1] // 2)), args[3], args[4], args[5])
    want = torch.autograd.grad(ref, [x] + rest, g.double())
    for a, b_ in zip(got, want):
        assert torch.allclose(a.double(), b_, rtol=1e-4, atol=1e-4), (a - b_).abs().max()
