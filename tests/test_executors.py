"""The fused engine's executors (fsl_fast.engines.executors) and a user's own model
(``--model package.module:factory``): every executor against the reference engine, the choice
recorded in results.json and printed by ``python -m fsl_fast.env --model``, and bad input."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from fsl_fast.config import Config, ConfigError
from fsl_fast.engines.executors import CANDIDATES
from fsl_fast.ops import _backend
from fsl_fast.runner import Run
from fsl_fast.train import main

BASE = dict(dataset="synthetic:1x28x28", clients=3, batch_size=32, align_epochs=3,
            align_interval=1, buffer_size=100, align_batch_size=64, seed=5, schedule="parallel")
CPP = _backend.available("cpp", "cpu")[0]


def _run(cfg, rounds):
    run = Run(cfg)
    for _ in range(rounds):
        run.step()
    return run


def _assert_close_states(a, b, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys()
    for part in a:
        for name, ta in a[part].items():
            tb = b[part][name]
            if ta.is_floating_point():
                torch.testing.assert_close(tb, ta, rtol=rtol, atol=atol, msg=f"{part}.{name}")
            else:
                assert torch.equal(ta, tb), (part, name)


# (part, executor, algorithm, model, config changes): each case forces one executor and
# compares two rounds with the reference engine (fp32).
CASES = [
    ("client", "conv_blocks_taped", "fsl_sage", "cnn", {}),
    ("client", "conv_blocks", "fsl_sage", "cnn", {}),
    ("client", "conv_blocks", "splitfed_v2", "tests.user_model:blocks", {}),
    ("client", "vmap", "splitfed_v1", "cnn", {"client_batching": "vmap"}),
    ("client", "loop", "cse_fsl", "cnn", {}),
    ("server", "mlp", "splitfed_v1", "cnn", {}),
    ("server", "autograd", "splitfed_v2", "cnn", {}),
    ("aux", "linear_closed_form", "cse_fsl", "cnn", {}),
    ("aux", "autograd", "cse_fsl", "cnn", {}),
    ("alignment", "linear_closed_form", "fsl_sage", "cnn", {}),
    ("alignment", "double_backward", "fsl_sage", "cnn", {}),
    ("full", "conv_blocks_mlp_taped", "fedavg", "cnn", {}),
    ("full", "conv_blocks_vmap_server", "fedavg", "cnn", {}),
    ("full", "loop", "fedavg", "cnn", {}),
]


def test_cases_cover_every_executor_but_the_conv_aux_one():
    """conv_aux_fast (resnet18's layer3 auxiliary) is compared in test_fused_parity's
    test_conv_models_one_round; every other executor has a case here."""
    named = {(p, n) for p, n, *_ in CASES}
    for part, cands in CANDIDATES.items():
        for c in cands:
            if (part, c.name) != ("alignment", "conv_aux_fast"):
                assert (part, c.name) in named, (part, c.name)


@pytest.mark.parametrize("part,name,algorithm,model,extra", CASES,
                         ids=[f"{p}-{n}-{a}-{m.split(':')[-1]}" for p, n, a, m, _ in CASES])
def test_executor_matches_reference(part, name, algorithm, model, extra, monkeypatch):
    if name.startswith("conv_blocks") and not CPP:
        pytest.skip("C++ extension unavailable: the conv-block executors need it")
    cfg = Config(algorithm=algorithm, model=model, **{**BASE, **extra}).resolved()
    ref = _run(cfg, 2)
    monkeypatch.setenv("FSL_FAST_EXECUTORS", f"{part}={name}")
    fused = _run(dataclasses.replace(cfg, fused=True), 2)
    assert fused.engine.executors[part]["executor"] == name
    _assert_close_states(ref.engine.named_state(), fused.engine.named_state())
    assert [m["comm_bytes"] for m in ref.metrics] == [m["comm_bytes"] for m in fused.metrics]


def test_uneven_batches_fall_back_per_call():
    """Clients whose last batches differ in size: the batched executors run that call generic
    and the results still match the reference (70 samples over 3 clients, B=16)."""
    cfg = Config(algorithm="fsl_sage", **{**BASE, "dataset": "synthetic:1x12x12", "batch_size": 16}).resolved()
    ref = _run(cfg, 2)
    fused = _run(dataclasses.replace(cfg, fused=True), 2)
    assert {len(p) % 16 for p in fused.parts} != {0}
    _assert_close_states(ref.engine.named_state(), fused.engine.named_state())


# -- a user's model ------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["fsl_sage", "cse_fsl", "splitfed_v1", "fedavg"])
def test_user_model_fp32_matches_reference(algorithm):
    cfg = Config(algorithm=algorithm, model="tests.user_model:make",
                 **{**BASE, "dataset": "synthetic:3x16x16"}).resolved()
    ref = _run(cfg, 2)
    fused = _run(dataclasses.replace(cfg, fused=True), 2)
    rec = fused.engine.executor_record()
    assert rec["engine"] == "fused" and rec["client"] == "loop"
    assert all(v in ("fused", "loop", "autograd", "double_backward") for v in rec.values()), rec
    _assert_close_states(ref.engine.named_state(), fused.engine.named_state())


@pytest.mark.parametrize("fused", [False, True])
def test_user_model_bf16_trains_like_fp32(fused):
    """bf16 on the user's model (BatchNorm client, Tanh server, Sequential aux), both engines:
    four rounds of FSL-SAGE on a learnable set, test loss within 10% of fp32's."""
    cfg = Config(algorithm="fsl_sage", model="tests.user_model:make", fused=fused,
                 **{**BASE, "dataset": "synthetic:3x16x16"}).resolved()
    loss = {}
    for prec in ("fp32", "bf16"):
        run = _run(dataclasses.replace(cfg, precision=prec), 4)
        loss[prec] = run.metrics[-1]["test_loss"]
        assert run.metrics[-1]["test_accuracy"] > 0.3, (prec, run.metrics[-1])
    assert abs(loss["bf16"] - loss["fp32"]) <= 0.1 * loss["fp32"], loss


def test_user_model_aux_option_and_results_json(tmp_path):
    out = tmp_path / "run"
    argv = ["--model", "tests.user_model:make", "--aux", "wide", "--fused", "--rounds", "1",
            "--dataset", "synthetic:3x16x16", "--clients", "2", "--batch-size", "32",
            "--align-epochs", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["executors"] == {"engine": "fused", "client": "loop", "server": "autograd",
                                "aux": "autograd", "alignment": "double_backward"}
    conf = json.loads((out / "config.json").read_text())
    assert conf["model"] == "tests.user_model:make" and conf["aux"] == "wide"
    assert "executors" not in conf  # config.json stays a rerunnable configuration
    ref = tmp_path / "ref"
    assert main([a for a in argv if a != "--fused"][:-1] + [str(ref)]) == 0
    assert json.loads((ref / "results.json").read_text())["executors"] == {"engine": "reference"}


@pytest.mark.parametrize("model,aux,message", [
    ("tests.no_such_module:make", "default", "cannot import 'tests.no_such_module'"),
    ("tests.user_model:nothing", "default", "module 'tests.user_model' has no attribute 'nothing'"),
    ("tests.user_model:not_callable", "default", "'not_callable' is not callable"),
    ("tests.user_model:broken_not_modules", "default", "the factory's server is a str, not an nn.Module"),
    ("tests.user_model:broken_two", "default", "must return (client, server, aux) modules"),
    ("tests.user_model:broken_logits", "default", "the server maps one sample to shape (1, 11), expected logits (1, 10)"),
    ("tests.user_model:blocks", "wide", "takes no aux= argument, so --aux must be 'default'"),
    ("tests.user_model:make", "odd", "unknown aux 'odd'"),
    ("tests.user_model:", "default", "is not of the form package.module:factory"),
])
def test_user_model_errors(model, aux, message):
    cfg = dict(algorithm="fsl_sage", model=model, aux=aux, **{**BASE, "dataset": "synthetic:1x8x8"})
    with pytest.raises((ConfigError, ValueError)) as e:
        Run(Config(**cfg).resolved())
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_user_model_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fsl_fast.train", "--model", "tests.user_model:broken_two",
                           "--dataset", "synthetic:1x8x8", "--out", str(tmp_path / "o"), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "must return (client, server, aux)" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value,message", [
    ("client", "expected part=name items"),
    ("brain=loop", "expected part=name items"),
    ("client=warp", "no client executor named 'warp'"),
    ("server=mlp", "the server executor 'mlp' does not apply here: the server is not an nn.Sequential"),
])
def test_bad_executor_override(value, message, monkeypatch):
    monkeypatch.setenv("FSL_FAST_EXECUTORS", value)
    cfg = Config(algorithm="splitfed_v2", model="tests.user_model:make", fused=True,
                 **{**BASE, "dataset": "synthetic:1x8x8"}).resolved()
    with pytest.raises(ConfigError, match="FSL_FAST_EXECUTORS") as e:
        Run(cfg)
    assert message in str(e.value)


def test_env_reports_executors():
    proc = subprocess.run([sys.executable, "-m", "fsl_fast.env", "--model", "resnet18", "--algorithm", "fsl_sage"],
                          capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert lines[1] == "fsl_sage:"
    chosen = {ln.split()[0]: ln.split()[1] for ln in lines[2:] if not ln.strip().startswith("(")}
    assert chosen == {"client": "loop", "server": "autograd", "aux": "autograd", "alignment": "conv_aux_fast"}
    assert "(not linear_closed_form: the auxiliary is a ConvAux, not a LinearAux)" in proc.stdout
