"""--optimizer sgd (momentum, Nesterov) and --lr-schedule: the flat SGD against torch.optim.SGD,
the schedules against torch's schedulers, both engines against each other, resume, bad values."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from fsl_fast.config import ALGORITHMS, Config, ConfigError
from fsl_fast.optim import FlatSGD, lr_factor, parse_lr_schedule
from fsl_fast.runner import Run
from fsl_fast.train import main


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0),
                                                  (0.9, True, 0.01), (0.5, False, 0.05)])
def test_flat_sgd_rows_equal_torch_sgd(momentum, nesterov, wd):
    """Row for row the same bits as one torch.optim.SGD per client, with uneven step counts."""
    torch.manual_seed(0)
    K, P, width = 3, 700, 900
    buf = torch.randn(K, width)
    gbuf = torch.zeros(K, width)
    opt = FlatSGD(buf[:, :P], gbuf[:, :P], lr=0.03, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    refs = [buf[k, :P].clone().requires_grad_(True) for k in range(K)]
    topts = [torch.optim.SGD([r], lr=0.03, momentum=momentum, nesterov=nesterov, weight_decay=wd,
                             foreach=False) for r in refs]
    tail = buf[:, P:].clone()
    for it in range(7):
        rows = [0, 1, 2] if it % 3 else [0, 2]
        for k in rows:
            g = torch.randn(P) * (k + 1)
            gbuf[k, :P] = g
            refs[k].grad = g.clone()
            topts[k].step()
        opt.step(rows)
    for k in range(K):
        assert torch.equal(buf[k, :P], refs[k].detach()), k
    assert torch.equal(buf[:, P:], tail)
    assert opt.steps == [7, 4, 7]
    sd = opt.state_dict()
    other = FlatSGD(buf[:, :P].clone(), gbuf[:, :P].clone(), lr=0.03, momentum=momentum, nesterov=nesterov)
    other.load_state_dict(sd)
    assert other.steps == opt.steps and torch.equal(other.buf, opt.buf)


def test_schedules_match_torch_schedulers():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ms = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 7], gamma=0.1)
    for t in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor("multistep:3,7:0.1", t, 12), rel=1e-12)
        opt.step()
        ms.step()
    opt = torch.optim.SGD([p], lr=1.0)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for t in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor("cosine:10", t, 99), abs=1e-12)
        opt.step()
        cos.step()
    # by hand: half way down the cosine is 1/2; after T it stays at 0; plain cosine uses --rounds
    assert lr_factor("cosine:8", 4, 8) == pytest.approx(0.5)
    assert lr_factor("cosine:8", 8, 20) == 0.0 and lr_factor("cosine:8", 15, 20) == 0.0
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("constant", 5, 10) == 1.0
    assert Config(lr_schedule="cosine", rounds=30).resolved().lr_schedule == "cosine:30"


@pytest.mark.parametrize("spec,msg", [
    ("step", "unknown schedule"), ("multistep:3", "expected multistep"), ("multistep:a:0.1", "integers"),
    ("multistep:5,3:0.1", "increasing"), ("multistep:0:0.1", "increasing"), ("multistep:3:-1", "GAMMA"),
    ("cosine:0", "positive number of rounds"), ("cosine:x", "positive number of rounds"),
])
def test_bad_schedules(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_lr_schedule(spec)
    with pytest.raises(ConfigError, match="--lr-schedule"):
        Config(lr_schedule=spec).resolved()


@pytest.mark.parametrize("argv,needle", [
    (["--optimizer", "rmsprop"], "invalid choice"),
    (["--momentum", "0.9"], "only with --optimizer sgd"),
    (["--optimizer", "sgd", "--nesterov"], "--nesterov: needs --momentum > 0"),
    (["--optimizer", "sgd", "--momentum", "-0.5"], "--momentum: must be >= 0"),
    (["--lr-schedule", "multistep:2,1:0.5"], "--lr-schedule"),
])
def test_bad_optimizer_options_exit_with_one_line(tmp_path, argv, needle):
    proc = subprocess.run([sys.executable, "-m", "fsl_fast.train", "--out", str(tmp_path / "r"),
                           "--no-progress"] + argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


BASE = dict(dataset="synthetic:1x28x28", clients=3, batch_size=32, align_epochs=3, align_interval=1,
            buffer_size=100, align_batch_size=64, seed=5, optimizer="sgd", momentum=0.9, lr=0.01,
            lr_schedule="multistep:1:0.5")


def _run(cfg, rounds):
    run = Run(cfg)
    for _ in range(rounds):
        run.step()
    return run


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_engines_agree_with_sgd_and_a_schedule(algorithm, nesterov, monkeypatch):
    """A model whose every part runs the generic executors (tests/user_model.py:make), so the
    only differences are FedAvg's and the auxiliary's summation orders: SGD, Nesterov and the
    schedule go through both engines' optimizers alike. (On the cnn, whose fused clients run the
    C++ conv-block kernels, momentum 0.9 at lr 0.01-0.02 amplified their last-bit gradient
    differences to 4e-4..4e-3 of a tensor's largest entry within two rounds: chaotic, not a
    wiring error, so that is not an elementwise test.)"""
    monkeypatch.setenv("FSL_FAST_BITWISE", "1")
    cfg = Config(algorithm=algorithm, nesterov=nesterov, model="tests.user_model:make", **BASE).resolved()
    ref = _run(cfg, 2)
    fused = _run(dataclasses.replace(cfg, fused=True), 2)
    assert [m["lr"] for m in ref.metrics] == [m["lr"] for m in fused.metrics] == [0.01, 0.005]
    a, b = ref.engine.named_state(), fused.engine.named_state()
    assert a.keys() == b.keys()
    # each tensor against its own largest entry (measured: 0 without auxiliaries, <= 1.4e-5
    # with them); a wrong update (no momentum, no Nesterov) differs by > 1e-3 (test below)
    worst = 0.0
    for part in a:
        for name, ta in a[part].items():
            err = float((b[part][name].float() - ta.float()).abs().max())
            scale = float(ta.float().abs().max())
            worst = max(worst, err / (scale + 1e-12))
            assert err <= 1e-4 * scale + 1e-7, (f"{part}.{name}", err, scale)
    print(f"{algorithm} nesterov={nesterov}: worst relative difference {worst:.1e}")
    # the engines really use SGD at the scheduled rate (the auxiliary keeps Adam)
    eng = ref.engine
    assert all(isinstance(o, torch.optim.SGD) and o.param_groups[0]["lr"] == 0.005
               and o.param_groups[0]["nesterov"] == nesterov for o in eng.client_opts + eng.server_opts)
    assert all(isinstance(o, torch.optim.Adam) for o in eng.aux_opts)
    f = fused.engine
    assert isinstance(f.clients.opt, FlatSGD) and f.clients.opt.lr == 0.005
    if f.aux is not None:
        assert not isinstance(f.aux.opt, FlatSGD)


def test_sgd_without_momentum_differs_from_adam():
    """The option reaches training: plain SGD and Adam at one rate give different models."""
    cfg = Config(algorithm="fsl_sage", **{**BASE, "momentum": 0.0, "lr_schedule": "constant"}).resolved()
    sgd = _run(cfg, 1).engine.named_state()["client"]
    adam = _run(dataclasses.replace(cfg, optimizer="adam"), 1).engine.named_state()["client"]
    assert any(not torch.equal(sgd[k], adam[k]) for k in sgd)


@pytest.mark.parametrize("fused", [False, True])
def test_resume_keeps_the_schedule(tmp_path, fused):
    """A cosine schedule over the first run's --rounds and SGD momentum survive --resume exactly,
    also when --rounds is raised on resume (the curve was fixed at creation)."""
    args = ["--dataset", "synthetic:1x12x12", "--clients", "3", "--batch-size", "32", "--align-epochs", "2",
            "--align-interval", "2", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05",
            "--lr-schedule", "cosine", "--no-progress"] + (["--fused"] if fused else [])
    full = tmp_path / "full"
    assert main(args + ["--rounds", "4", "--out", str(full)]) == 0
    assert json.loads((full / "config.json").read_text())["lr_schedule"] == "cosine:4"

    def rows(d):
        return [{k: v for k, v in json.loads(l).items() if not k.startswith("seconds_")}
                for l in (d / "metrics.jsonl").read_text().splitlines()]

    # a resumed run that stopped after round 2 and continues to 6: rounds 0-3 equal the full run
    half = tmp_path / "half"
    assert main(args + ["--rounds", "2", "--out", str(half), "--lr-schedule", "cosine:4"]) == 0
    assert main(["--resume", str(half), "--rounds", "6", "--no-progress"]) == 0
    a, b = rows(full), rows(half)
    assert [r["lr"] for r in a] == pytest.approx([0.05, 0.05 * (1 + 2 ** -0.5) / 2, 0.025, 0.05 * (1 - 2 ** -0.5) / 2])
    assert a == b[:4]
    assert [r["lr"] for r in b[4:]] == [0.0, 0.0]


def test_the_engine_comparison_sees_a_wrong_momentum():
    """The tolerance above separates rounding from a different update: Nesterov vs plain momentum
    on the same engine differ far beyond it."""
    cfg = Config(algorithm="cse_fsl", model="tests.user_model:make", **BASE).resolved()
    a = _run(cfg, 2).engine.named_state()["client"]
    b = _run(dataclasses.replace(cfg, nesterov=True), 2).engine.named_state()["client"]
    assert any(float((a[n].float() - b[n].float()).abs().max()) > 1e-3 * float(a[n].float().abs().max()) + 1e-6
               for n in a if a[n].is_floating_point())
