"""--log-estimate-quality: cosine and norm ratio of the auxiliary's gradient estimate against the
true cut-layer gradient, before and after each alignment, without changing training."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fsl_fast.config import Config
from fsl_fast.engines.base import estimate_quality
from fsl_fast.runner import Run


def _strip(rec):
    return {k: v for k, v in rec.items() if not k.startswith("seconds_") and k != "estimate_quality"}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("model,aux", [("cnn", "default"), ("resnet18", "layer3")])
def test_logged_per_aligned_client_without_changing_training(model, aux, fused):
    shape = "1x28x28" if model == "cnn" else "3x32x32"
    cfg = Config(model=model, aux=aux, dataset=f"synthetic:{shape}", clients=2, batch_size=32,
                 align_epochs=20 if model == "cnn" else 2, align_interval=1, schedule="parallel",
                 fused=fused, seed=0).resolved()
    plain, logged = Run(cfg), Run(dataclasses.replace(cfg, log_estimate_quality=True))
    for _ in range(2):
        a, b = plain.step(), logged.step()
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
