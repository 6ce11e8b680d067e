"""Uplink/downlink codecs (fsl_fast/codec.py): the spec grammar, top-k selection and its tie rule,
exact wire bytes by component (hand-computed), decode, error feedback, and runs: the --quantize
alias is --uplink, every round's components add up to the message totals, a resumed top-k + ef
run equals the uninterrupted one, the dry run counts codecs on the meta device."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fsl_fast import codec as C
from fsl_fast.transport.base import Channel
from fsl_fast.config import Config, ConfigError
from fsl_fast.ops import available
from fsl_fast.ops.topk import topk_rows
from fsl_fast.train import main

CPP = available("cpp", "cpu")
needs_cpp = pytest.mark.skipif(not CPP[0], reason=f"needs the C++ extension: {CPP[1]}")
CUDA = available("cuda", "cuda") if torch.cuda.is_available() else (False, "no CUDA device")
KERNELS = [pytest.param("cpp", marks=needs_cpp),
           pytest.param("cuda", marks=pytest.mark.skipif(not CUDA[0], reason=f"CUDA top-k kernel: {CUDA[1]}"))]

TINY = ["--dataset", "synthetic:1x28x28", "--clients", "4", "--batch-size", "32", "--threads", "1",
        "--no-progress", "--schedule", "parallel", "--align-epochs", "2", "--align-interval", "1"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Grammar


@pytest.mark.parametrize("text,want", [
    ("none", C.Spec()),
    ("int8", C.Spec("int8", None, 8, None, False)),
    ("int2:g64", C.Spec("int2:g64", None, 2, 64, False)),
    ("topk:0.05,int4", C.Spec("topk:0.05,int4", 0.05, 4, None, False)),
    ("topk:1,ef", C.Spec("topk:1,ef", 1.0, None, None, True)),
    ("int4:g8,ef", C.Spec("int4:g8,ef", None, 4, 8, True)),
])
def test_parse(text, want):
    assert C.parse(text) == want


@pytest.mark.parametrize("text,needle", [
    ("int3", "unknown stage 'int3'"),
    ("topk:0", "0 < F <= 1"),
    ("topk:1.5", "0 < F <= 1"),
    ("topk:abc", "unknown stage"),
    ("int4,topk:0.1", "order topk, quantization, ef"),
    ("ef,int8", "order"),
    ("int8,int4", "more than one quantization"),
    ("topk:0.1,topk:0.2", "topk appears twice"),
    ("ef", "ef alone"),
    ("int4:g3", "divisible by 2"),
    ("int2:g6", "divisible by 4"),
    ("int8:g0", "group size >= 1"),
])
def test_parse_errors_name_the_stage(text, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        C.parse(text)
    assert "--uplink" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Top-k


def test_topk_ties_go_to_the_lower_index():
    a = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [5.0, 1.0, 1.0, 1.0, 1.0, 4.0]])
    assert C.topk_indices(a, 2).tolist() == [[1, 2], [0, 1], [0, 5]]
    assert C.topk_indices(a, 3).tolist() == [[1, 2, 4], [0, 1, 2], [0, 1, 5]]


def test_topk_equals_a_stable_sort(seed):
    a = torch.randint(0, 6, (50, 97)).float()  # many ties
    for k in (1, 7, 48, 97):
        want = torch.sort(-a, dim=1, stable=True).indices[:, :k].sort(dim=1).values
        assert torch.equal(C.topk_indices(a, k), want), k


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 97), (64, 2048), (4, 20000)])
@pytest.mark.parametrize("data", ["normal", "ties", "zeros", "tiny"])
def test_kernel_selection_equals_the_reference(seed, backend, shape, data):
    x = {"normal": torch.randn(shape), "ties": torch.randint(-3, 4, shape).float(),
         "zeros": torch.zeros(shape), "tiny": torch.randn(shape) * 1e-40}[data]  # subnormals
    m = shape[1]
    for k in sorted({1, min(2, m), max(1, m // 3), max(1, m - 1), m}):
        ri, rv = topk_rows(x, k, backend="reference")
        ci, cv = topk_rows(x.to("cuda" if backend == "cuda" else "cpu"), k, backend=backend)
        assert torch.equal(ri, ci.cpu()) and torch.equal(rv, cv.cpu()), (backend, shape, data, k)


def test_index_coding_picks_the_smaller_and_counts_exactly():
    # rows of 20: bitmap = 3 bytes per row; gaps [0, 18] and [5, 0] need 5 bits
    idx = torch.tensor([[0, 19], [5, 6]])
    assert C.index_coding(idx, 20) == ("delta", 5, math.ceil(4 * 5 / 8))
    # every other position: gaps of 0/1, 1 bit each: 3 bytes against the bitmap's 6
    assert C.index_coding(torch.arange(0, 16, 2).expand(3, 8), 16) == ("delta", 1, 3)
    # a gap of 8 makes every gap 4 bits: 12 bytes, the bitmap's 6 win
    assert C.index_coding(torch.tensor([0, 1, 2, 3, 4, 5, 6, 15]).expand(3, 8), 16) == ("bitmap", 0, 6)
    assert C.index_coding(torch.tensor([[0, 15]]), 16) == ("delta", 4, 1)  # gaps 0, 14: 4 bits x 2
    # gaps 0, 4, 4, 4: 3 bits x 4 = 2 bytes = the bitmap's 2: a tie goes to the bitmap
    assert C.index_coding(torch.tensor([[0, 5, 10, 15]]), 16) == ("bitmap", 0, 2)


def test_parts_are_hand_computed(seed):
    z = torch.randn(3, 4, 4)  # M = 16
    cod = C.Codec(C.parse("topk:0.25,int8"))  # k = 4
    p = cod.encode(z)
    coding, width, nb = C.index_coding(p.index, 16)
    assert p.parts == {"values": 3 * 4, "scales": 3 * 4, "indices": nb, "header": 1}
    assert nb == min(3 * 2, math.ceil(3 * 4 * width / 8)) and p.nbytes == sum(p.parts.values())
    p32 = C.Codec(C.parse("topk:0.25")).encode(z)
    assert p32.parts["values"] == 3 * 4 * 4
    q = C.Codec(C.parse("int2:g8")).encode(z)
    assert C.Codec.parts(q) == {"values": 3 * 4, "scales": 3 * 2 * 4}  # 16 codes in 4 bytes, 2 groups


def test_decode_puts_the_kept_values_back(seed):
    z = torch.randn(5, 3, 7)
    cod = C.Codec(C.parse("topk:0.2"))
    p = cod.encode(z)
    d = cod.decode(p)
    k = math.ceil(0.2 * 21)
    assert d.shape == z.shape and int((d != 0).sum()) == 5 * k
    flat, dflat = z.reshape(5, -1), d.reshape(5, -1)
    for r in range(5):
        kept = dflat[r] != 0
        assert torch.equal(dflat[r][kept], flat[r][kept])
        assert flat[r][kept].abs().min() >= flat[r][~kept].abs().max()
    # with int4 values: each kept value within half a quantization step
    cod4 = C.Codec(C.parse("topk:0.2,int4"))
    p4 = cod4.encode(z)
    d4 = cod4.decode(p4).reshape(5, -1)
    vals = torch.gather(flat, 1, p4.index)
    step = p4.values.scales.repeat_interleave(p4.values.group_size, dim=1)[:, :k]
    assert (torch.gather(d4, 1, p4.index) - vals).abs().le(step / 2 + 1e-6).all()


@pytest.mark.parametrize("m,k", [(20, 2), (20, 15), (16, 8), (1000, 3), (9, 9)])
def test_packed_positions_round_trip_at_the_counted_length(seed, m, k):
    x = torch.randn(7, m)
    index = C.topk_indices(x, k)
    coding, width, nb = C.index_coding(index, m)
    data = C.pack_positions(index, m, coding, width)
    assert data.dtype == torch.uint8 and data.numel() == nb, (coding, width, nb, data.numel())
    assert torch.equal(C.unpack_positions(data, 7, k, m, coding, width), index)
    # both codings round-trip, whichever is chosen
    other = ("delta", max(1, m.bit_length())) if coding == "bitmap" else ("bitmap", 0)
    d2 = C.pack_positions(index, m, *other)
    assert torch.equal(C.unpack_positions(d2, 7, k, m, *other), index)


def test_malformed_positions_are_refused():
    index = torch.tensor([[1, 4], [0, 2]])
    data = C.pack_positions(index, 6, "bitmap", 0)
    with pytest.raises(ValueError, match="takes 2 bytes, got 3"):
        C.unpack_positions(torch.cat([data, data[:1]]), 2, 2, 6, "bitmap", 0)
    bad = data.clone()
    bad[0] |= 1  # a third position in row 0
    with pytest.raises(ValueError, match="exactly 2 positions"):
        C.unpack_positions(bad, 2, 2, 6, "bitmap", 0)
    gaps = C.pack_positions(torch.tensor([[3, 5]]), 8, "delta", 3)
    with pytest.raises(ValueError, match="runs past its length 5"):
        C.unpack_positions(gaps, 1, 2, 5, "delta", 3)


def test_wire_specs_describe_what_wire_sends(seed):
    for text in ("none", "int8", "int8:g16", "int4", "int4:g10", "int2", "int2:g12", "topk:0.2",
                 "topk:0.05,int4", "topk:0.5,int2:g8"):
        cod = C.Codec(C.parse(text))
        z = torch.randn(6, 3, 5, 7)
        p = cod.encode(z, 1)
        items, specs = C.wire(p), cod.wire_specs(z.shape)
        assert [n for n, _ in items] == [s[0] for s in specs], text
        for (name, t), (_, shape, dtype, _) in zip(items, specs):
            assert t.dtype == dtype, (text, name)
            if isinstance(shape, C.AtMost):
                assert t.dim() == 1 and t.numel() <= shape, (text, name)
            else:
                assert tuple(t.shape) == tuple(shape), (text, name)
        sent = {}
        for name, t in items:
            sent[name] = sent.get(name, 0) + t.numel() * t.element_size()
        assert sent == cod.parts(p), text
        back = cod.from_wire(z.shape, [t.clone() for _, t in items])
        assert torch.equal(cod.decode(back), cod.decode(p)) and cod.parts(back) == cod.parts(p), text


def test_nonfinite_input_is_an_error():
    z = torch.randn(3, 10)
    z[1, 4] = float("nan")
    for backend in ("reference",) + (("cpp",) if CPP[0] else ()) + (("cuda",) if CUDA[0] else ()):
        with pytest.raises(ValueError, match=r"x of shape \(3, 10\) has non-finite values \(first in row 1\)"):
            topk_rows(z.to("cuda" if backend == "cuda" else "cpu"), 5, backend=backend)
    with pytest.raises(ValueError, match="first in row 1"):
        C.Codec(C.parse("topk:0.5")).encode(z)


def test_error_feedback_carries_the_residual(seed):
    cod = C.Codec(C.parse("topk:0.25,ef"))
    res = [None]
    x1, x2 = torch.randn(2, 8), torch.randn(2, 8)
    _, d1 = Channel.encode(cod, res, 0, x1, 0)
    assert torch.equal(res[0], x1 - d1)
    p2, d2 = Channel.encode(cod, res, 0, x2, 0)
    assert torch.equal(d2, cod.decode(cod.encode(x2 + (x1 - d1))))
    assert torch.allclose(res[0], x2 + (x1 - d1) - d2)
    # a message of another shape starts afresh
    x3 = torch.randn(1, 8)
    _, d3 = Channel.encode(cod, res, 0, x3, 0)
    assert torch.equal(d3, cod.decode(cod.encode(x3)))


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("kw,needle", [
    (dict(quantize="int8", uplink="int4"), "give one"),
    (dict(algorithm="fsl_sage", downlink="int8"), "only SplitFed"),
    (dict(uplink="int9"), "unknown stage"),
    (dict(algorithm="splitfed_v2", downlink="topk:3"), "--downlink: topk:F"),
])
def test_config_refuses(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        Config(**kw).resolved()


# ---------------------------------------------------------------------------------------------
# Runs


def test_quantize_is_an_alias_of_uplink(tmp_path):
    a = tmp_path / "q"
    b = tmp_path / "u"
    args = ["--algorithm", "fsl_sage", "--rounds", "2", "--stochastic-rounding"] + TINY
    assert main(args + ["--quantize", "int4", "--out", str(a)]) == 0
    assert main(args + ["--uplink", "int4", "--out", str(b)]) == 0
    ma, mb = _metrics(a), _metrics(b)
    for ra, rb in zip(ma, mb):
        assert {k: v for k, v in ra.items() if not k.startswith("seconds")} == \
            {k: v for k, v in rb.items() if not k.startswith("seconds")}
    assert ma[0]["bytes_up_smashed"] == ma[0]["bytes_up_smashed_values"] + ma[0]["bytes_up_smashed_scales"]


@pytest.mark.parametrize("algorithm,extra", [
    ("fsl_sage", ["--uplink", "topk:0.1,int4,ef"]),
    ("cse_fsl", ["--uplink", "int2"]),
    ("splitfed_v2", ["--uplink", "topk:0.2", "--downlink", "int8,ef"]),
])
def test_components_add_up_and_resume_is_exact(tmp_path, algorithm, extra):
    args = ["--algorithm", algorithm, "--server-update-interval", "2"] + TINY + extra
    full = tmp_path / "full"
    assert main(args + ["--rounds", "3", "--out", str(full)]) == 0
    part = tmp_path / "part"
    assert main(args + ["--rounds", "2", "--out", str(part)]) == 0
    assert main(["--resume", str(part), "--rounds", "3", "--no-progress"]) == 0
    mf, mp = _metrics(full), _metrics(part)
    for rf, rp in zip(mf, mp):
        assert {k: v for k, v in rf.items() if not k.startswith("seconds")} == \
            {k: v for k, v in rp.items() if not k.startswith("seconds")}, rf["round"]
    for r in mf:
        for d, kind in (("up", "smashed"), ("down", "gradients")):
            parts = [v for k, v in r.items() if k.startswith(f"bytes_{d}_{kind}_")]
            if parts:
                assert sum(parts) == r[f"bytes_{d}_{kind}"] > 0
        assert math.isfinite(r["test_loss"])
    if algorithm == "splitfed_v2":  # int8 per row: a byte per element and a scale per sample
        from fsl_fast.models import build_split_model

        m = math.prod(build_split_model("cnn", (1, 28, 28), 10).cut_shape)
        for r in mf:
            rows = r["bytes_up_labels"] // 8  # one gradient per uploaded sample
            assert r["bytes_down_gradients_values"] == rows * m and r["bytes_down_gradients_scales"] == rows * 4


def test_fused_engine_sends_the_same_bytes(tmp_path):
    args = ["--algorithm", "fsl_sage", "--rounds", "2", "--uplink", "topk:0.1,int8"] + TINY
    ref, fused = tmp_path / "r", tmp_path / "f"
    assert main(args + ["--out", str(ref)]) == 0
    assert main(args + ["--fused", "--out", str(fused)]) == 0
    for a, b in zip(_metrics(ref), _metrics(fused)):
        # values, scales and header are fixed by the shapes; the positions' coding may differ when
        # the engines' last-bit differences move a top-k choice
        for key in ("bytes_up_smashed_values", "bytes_up_smashed_scales", "bytes_up_smashed_header"):
            assert a[key] == b[key]
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.05


def test_dry_run_counts_codecs_on_meta():
    from fsl_fast.comm import dry_run

    from fsl_fast.models import build_split_model

    with torch.device("meta"):
        m = math.prod(build_split_model("resnet18", (3, 32, 32), 10).cut_shape)
    plain = dry_run("fsl_sage", rounds=2)[1]
    recs = dry_run("fsl_sage", rounds=2, uplink="topk:0.05,int4")
    r = recs[1]
    rows = plain["bytes_up_smashed"] // (m * 4)  # samples uploaded in the round
    k = math.ceil(0.05 * m)
    assert r["bytes_up_smashed_values"] == rows * math.ceil(k / 2)  # int4: two codes per byte
    assert r["bytes_up_smashed_scales"] == rows * math.ceil(k / 32) * 4
    assert r["bytes_up_smashed_indices"] <= rows * m // 8
    assert r["bytes_up_smashed"] == sum(v for key, v in r.items() if key.startswith("bytes_up_smashed_"))
    assert plain["bytes_up_smashed"] / r["bytes_up_smashed"] > 16
