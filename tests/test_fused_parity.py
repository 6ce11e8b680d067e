"""The fused engine computes what the reference engine computes (DESIGN.md: the main correctness
test). Same algorithm, seed, schedule and data -> parameters after 2 rounds agree within a tight
relative tolerance; test accuracy over 5 rounds on the embedded data agrees within 0.5 points."""
import dataclasses

import pytest
import torch

from fsl_fast.config import ALGORITHMS, Config
from fsl_fast.runner import Run


def _run(cfg, rounds):
    run = Run(cfg)
    for _ in range(rounds):
        run.step()
    return run


def _compare_states(a: dict, b: dict, rtol, atol):
    assert a.keys() == b.keys()
    worst = (0.0, None)
    for part in a:
        for name, ta in a[part].items():
            tb = b[part][name]
            if not ta.is_floating_point():
                assert torch.equal(ta, tb), (part, name)
                continue
            err = float((ta - tb).abs().max()) / (float(ta.abs().max()) + 1e-12)
            worst = max(worst, (err, f"{part}.{name}"))
            torch.testing.assert_close(tb, ta, rtol=rtol, atol=atol, msg=f"{part}.{name}")
    return worst


BASE = dict(dataset="synthetic:1x28x28", clients=3, batch_size=32, align_epochs=3,
            align_interval=1, buffer_size=100, align_batch_size=64, seed=5)


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_parameters_after_two_rounds(algorithm, schedule):
    cfg = Config(algorithm=algorithm, schedule=schedule, **BASE).resolved()
    ref = _run(cfg, 2)
    fused = _run(dataclasses.replace(cfg, fused=True), 2)
    # fp32 with Adam: reduction-order differences of ~1e-7 stay well under 1e-4 after 2 rounds
    worst = _compare_states(ref.engine.named_state(), fused.engine.named_state(), rtol=1e-4, atol=1e-5)
    print(f"{algorithm}/{schedule}: worst relative max-abs difference {worst[0]:.2e} at {worst[1]}")
    assert [m["comm_bytes"] for m in ref.metrics] == [m["comm_bytes"] for m in fused.metrics]


@pytest.mark.parametrize("model,shape,aux", [("simple_conv", "3x32x32", "default"),
                                             ("resnet18", "3x32x32", "layer3"),
                                             ("resnet18", "3x32x32", "linear")])
def test_conv_models_fsl_sage(model, shape, aux):
    """LRN/max-pool kernels (simple_conv), BatchNorm and the layer3 auxiliary (resnet18)."""
    cfg = Config(algorithm="fsl_sage", model=model, aux=aux, schedule="parallel",
                 **{**BASE, "dataset": f"synthetic:{shape}", "clients": 2, "align_epochs": 2}).resolved()
    ref = _run(cfg, 2)
    fused = _run(dataclasses.replace(cfg, fused=True), 2)
    worst = _compare_states(ref.engine.named_state(), fused.engine.named_state(), rtol=1e-3, atol=1e-4)
    print(f"{model}/{aux}: worst relative difference {worst[0]:.2e} at {worst[1]}")


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2"])
def test_accuracy_on_embedded_data(algorithm):
    cfg = Config(algorithm=algorithm, rounds=5, schedule="parallel", threads=1).resolved()
    ref = _run(cfg, 5)
    fused = _run(dataclasses.replace(cfg, fused=True), 5)
    for a, b in zip(ref.metrics, fused.metrics):
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.005, (a["round"], a["test_accuracy"], b["test_accuracy"])
    assert ref.metrics[-1]["test_accuracy"] > ref.metrics[0]["test_accuracy"]
