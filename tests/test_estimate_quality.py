"""--log-estimate-quality: cosine and norm ratio of the auxiliary's gradient estimate against the
true cut-layer gradient, before and after each alignment, and the averaged client model's change
per round, without changing training. --hold-estimate-norm: the estimate's scale factor follows
the norms measured around each alignment, and resumes exactly."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fsl_fast.config import Config
from fsl_fast.engines.base import estimate_quality
from fsl_fast.runner import Run


def _strip(rec):
    return {k: v for k, v in rec.items()
            if not k.startswith("seconds_") and k not in ("estimate_quality", "client_update_norm")}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("model,aux", [("cnn", "default"), ("resnet18", "layer3")])
def test_logged_per_aligned_client_without_changing_training(model, aux, fused):
    shape = "1x28x28" if model == "cnn" else "3x32x32"
    cfg = Config(model=model, aux=aux, dataset=f"synthetic:{shape}", clients=2, batch_size=32,
                 align_epochs=20 if model == "cnn" else 2, align_interval=1, schedule="parallel",
                 fused=fused, seed=0).resolved()
    plain, logged = Run(cfg), Run(dataclasses.replace(cfg, log_estimate_quality=True))
    for _ in range(2):
        start = [t.detach().clone().double() for t in logged.engine.state_tensors("client")]
        a, b = plain.step(), logged.step()
        now = [t.double() for t in logged.engine.state_tensors("client")]
        want = math.sqrt(sum(float((x - y).pow(2).sum()) for x, y in zip(now, start)))
        assert b["client_update_norm"] > 0 and math.isclose(b["client_update_norm"], want, rel_tol=1e-9)
        assert _strip(a) == _strip(b)  # the measurement leaves training alone
        q = b["estimate_quality"]
        assert [e["client"] for e in q] == [0, 1]
        for e in q:
            for key in ("cosine_before", "cosine_after"):
                assert -1.0 <= e[key] <= 1.0
            assert e["norm_ratio_before"] > 0 and e["norm_ratio_after"] > 0
        assert "estimate_quality" not in a
    if model == "cnn":  # 20 epochs of alignment bring the estimate closer to the true gradient
        assert all(e["cosine_after"] > e["cosine_before"] for e in q)


def test_cosine_by_hand():
    cfg = Config(dataset="synthetic:1x28x28", clients=1, batch_size=32, seed=0).resolved()
    run = Run(cfg)
    Z = torch.randn(16, *run.split.cut_shape)
    Y = torch.randint(0, 10, (16,))
    (e,) = estimate_quality(run.engine, [0], [(Z, Y)])
    Zr = Z.clone().requires_grad_(True)
    (t,) = torch.autograd.grad(F.cross_entropy(run.engine.eval_models()[1](Zr), Y), Zr)
    Zr = Z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(run.engine.aux_module(0)(Zr), Y), Zr)
    cos = float(F.cosine_similarity(g.flatten().double(), t.flatten().double(), dim=0))
    assert math.isclose(e["cosine"], cos, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(e["norm_ratio"], float(g.norm() / t.norm()), rel_tol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_hold_estimate_norm_scales_by_the_norms_around_each_alignment(fused):
    cfg = Config(dataset="synthetic:1x28x28", clients=2, batch_size=32, align_epochs=20, align_interval=1,
                 schedule="parallel", fused=fused, seed=0, log_estimate_quality=True).resolved()
    plain, held = Run(cfg), Run(dataclasses.replace(cfg, hold_estimate_norm=True))
    scale = {0: 1.0, 1: 1.0}
    for t in range(3):
        a, b = plain.step(), held.step()
        # the server does not move during an alignment: the ratio of the norm ratios is the ratio of
        # the estimate's norms before and after it
        for q, s in zip(b["estimate_quality"], b["estimate_scale"]):
            assert q["client"] == s["client"]
            scale[s["client"]] *= q["norm_ratio_before"] / q["norm_ratio_after"]
            assert math.isclose(s["scale"], scale[s["client"]], rel_tol=1e-6), (t, s, scale)
        if t == 0:  # the same up to the first estimate used, scaled from then on
            assert a["estimate_quality"][0]["cosine_before"] == b["estimate_quality"][0]["cosine_before"]
    assert a["test_loss"] != b["test_loss"]


def test_hold_estimate_norm_resumes_exactly(tmp_path):
    from fsl_fast.train import main

    args = ["--dataset", "synthetic:1x28x28", "--clients", "2", "--batch-size", "32", "--align-epochs", "5",
            "--align-interval", "2", "--threads", "1", "--no-progress", "--hold-estimate-norm", "--fused"]
    assert main(args + ["--rounds", "5", "--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--rounds", "3", "--out", str(tmp_path / "b")]) == 0
    assert main(["--resume", str(tmp_path / "b"), "--rounds", "5", "--no-progress"]) == 0
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in "ab"]
    import json

    assert [json.loads(x)["test_loss"] for x in lines[0]] == [json.loads(x)["test_loss"] for x in lines[1]]


@pytest.mark.parametrize("kw,needle", [(dict(algorithm="cse_fsl", hold_estimate_norm=True), "fsl_sage"),
                                       (dict(hold_estimate_norm=True, distributed=True), "in-process")])
def test_bad_hold_estimate_norm(kw, needle):
    from fsl_fast.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        Config(**kw).resolved()
