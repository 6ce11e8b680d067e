"""Partial participation (``--clients-per-round M``): who takes part, what the others keep, FedAvg
over the participants by hand, the ledger, both engines, resume."""
import dataclasses
import json

import pytest
import torch

from fsl_fast.config import Config, ConfigError
from fsl_fast.runner import Run
from fsl_fast.train import main

BASE = dict(dataset="synthetic:1x12x12", clients=4, clients_per_round=2, batch_size=32, align_epochs=2,
            align_interval=2, buffer_size=64, align_batch_size=64, seed=3, schedule="parallel")


def _cfg(**kw):
    return Config(**{**BASE, **kw}).resolved()


def test_participants_are_seeded_uniform_and_sorted():
    run = Run(_cfg(clients=10, clients_per_round=3))
    sets = [run.algo.participants(t) for t in range(200)]
    assert all(len(s) == 3 and s == sorted(s) and len(set(s)) == 3 for s in sets)
    assert sets == [Run(_cfg(clients=10, clients_per_round=3)).algo.participants(t) for t in range(200)]
    assert len({tuple(s) for s in sets}) > 50
    counts = torch.bincount(torch.tensor(sum(sets, [])), minlength=10)
    assert counts.min() >= 40 and counts.max() <= 80  # 60 expected per client
    assert Run(_cfg(clients_per_round=0)).algo.participants(5) == [0, 1, 2, 3]
    assert Run(_cfg(clients_per_round=4)).algo.participants(5) == [0, 1, 2, 3]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("algorithm", ["fedavg", "splitfed_v1", "cse_fsl"])
def test_fedavg_over_participants_by_hand(algorithm, fused):
    """The averaged models are sum_k (n_k / sum_{j in S} n_j) * local_k over the participants S,
    written back to every client; the rest's local models do not enter."""
    run = Run(_cfg(algorithm=algorithm, fused=fused, partition="dirichlet", alpha=1.0))
    eng = run.engine
    seen = {}
    orig = eng.aggregate

    def spy(weights, clients=True, aux=False, servers=False):
        seen["weights"] = list(weights)
        seen["local"] = [{k: v.clone() for k, v in s.items()} for s in _client_states(eng)]
        orig(weights, clients=clients, aux=aux, servers=servers)

    eng.aggregate = spy
    run.step()
    S = run.algo.active
    n = [len(p) for p in run.parts]
    expect_w = [n[k] / sum(n[j] for j in S) if k in S else 0.0 for k in range(4)]
    assert seen["weights"] == pytest.approx(expect_w, rel=1e-12)
    glob = eng.eval_models()[0].state_dict()
    for key, v in glob.items():
        if not v.is_floating_point():
            continue
        want = sum(expect_w[k] * seen["local"][k][key].double() for k in S)
        torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=1e-6)
    for s in _client_states(eng):  # everyone now holds the average
        for key, v in s.items():
            torch.testing.assert_close(v, glob[key])


def _client_states(eng):
    if hasattr(eng, "clients") and isinstance(eng.clients, list):
        return [c.state_dict() for c in eng.clients]
    return [m.state_dict() for m in eng.clients.mods]


@pytest.mark.parametrize("fused", [False, True])
def test_fsl_sage_leaves_the_others_alone(fused):
    """FSL-SAGE: a client that sits a round out keeps its auxiliary model, its alignment buffer and
    its data stream; only participants upload, and only they are aligned (round 0 aligns)."""
    run = Run(_cfg(algorithm="fsl_sage", fused=fused))
    S = run.algo.participants(0)
    out = [k for k in range(4) if k not in S]
    aux_before = {k: {n: v.clone() for n, v in run.engine.aux_module(k).state_dict().items()} for k in range(4)}
    gen_before = {k: run.gens[k].get_state().clone() for k in range(4)}
    rec = run.step()
    assert rec["participants"] == S
    for k in out:
        assert len(run.algo.buffers[k]) == 0
        assert torch.equal(run.gens[k].get_state(), gen_before[k])
        for n, v in run.engine.aux_module(k).state_dict().items():
            assert torch.equal(v, aux_before[k][n]), (k, n)
    for k in S:
        assert len(run.algo.buffers[k]) == 32  # one upload of B=32 (160 samples, q=5)
        assert not torch.equal(run.gens[k].get_state(), gen_before[k])
        changed = any(not torch.equal(v, aux_before[k][n]) for n, v in run.engine.aux_module(k).state_dict().items())
        assert changed, k
    # the ledger: 2 of 4 clients upload one 32-row batch each; the aux models of the 2 go down
    # after alignment (besides round 0's initial models, which every client gets, off the paper's
    # count)
    full = Run(_cfg(algorithm="fsl_sage", fused=fused, clients_per_round=0)).step()
    assert rec["bytes_up_smashed"] * 2 == full["bytes_up_smashed"] > 0
    init = 4 * run.engine.aux_bytes()
    assert (rec["bytes_down_aux_model"] - init) * 2 == full["bytes_down_aux_model"] - init > 0
    assert rec["bytes_up_client_model"] * 2 == full["bytes_up_client_model"] > 0


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2", "fedavg", "cse_fsl"])
def test_engines_agree_with_participation(algorithm):
    """Three rounds, 2 of 4 clients each. Criterion of tests/test_fused_parity.py's conv models:
    Adam turns a last-bit difference of a near-zero gradient into a step of up to 2 lr (seen
    here: fedavg, seed 5, 56 of 206,922 values off by up to 4.8e-5 after three rounds; with seed 3
    fsl_sage moved 161 of 4,800 client weights by up to 2e-4), so: >= 99.9% of the values agree to
    1e-4 relative and none differs by more than 2 lr."""
    cfg = _cfg(algorithm=algorithm, dataset="synthetic:1x28x28", seed=5)
    ref, fused = Run(cfg), Run(dataclasses.replace(cfg, fused=True))
    for _ in range(3):
        ref.step()
        fused.step()
    a, b = ref.engine.named_state(), fused.engine.named_state()
    ta = torch.cat([a[p][n].flatten().double() for p in a for n in a[p]])
    tb = torch.cat([b[p][n].flatten().double() for p in a for n in a[p]])
    off = (ta - tb).abs() > 1e-5 + 1e-4 * ta.abs()
    assert float(off.double().mean()) <= 1e-3, int(off.sum())
    assert float((ta - tb).abs().max()) <= 2 * cfg.lr
    assert [m["comm_bytes"] for m in ref.metrics] == [m["comm_bytes"] for m in fused.metrics]
    assert [m["participants"] for m in ref.metrics] == [m["participants"] for m in fused.metrics]


def test_resume_draws_the_same_participants(tmp_path):
    args = ["--clients", "5", "--clients-per-round", "2", "--dataset", "synthetic:1x12x12",
            "--batch-size", "32", "--align-epochs", "2", "--align-interval", "2", "--no-progress", "--fused"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args + ["--rounds", "4", "--out", str(full)]) == 0
    assert main(args + ["--rounds", "2", "--out", str(part)]) == 0
    assert main(["--resume", str(part), "--rounds", "4", "--no-progress"]) == 0

    def rows(d):
        return [{k: v for k, v in json.loads(l).items() if not k.startswith("seconds_")}
                for l in (d / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(full), rows(part)
    assert len(a) == 4 and a == b
    assert all(len(r["participants"]) == 2 for r in a)


@pytest.mark.parametrize("kw,msg", [
    (dict(clients_per_round=5), "--clients-per-round: must be 0 (all) or 1..4"),
    (dict(clients_per_round=-1), "--clients-per-round: must be 0 (all) or 1..4"),
    (dict(distributed=True), "partial participation runs in process only"),
])
def test_bad_participation_values(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        _cfg(**kw)


# -- dropouts ------------------------------------------------------------------------------------

def test_dropout_draws_and_ledger_by_hand():
    """SplitFed v2 uploads every iteration: a round's smashed bytes are (iterations done) x B x
    cut size x 4 summed over the clients; a dropped client completes floor(v_k * 5) < 5 of its 5
    iterations and leaves the average (weight 0)."""
    run = Run(_cfg(algorithm="splitfed_v2", clients_per_round=0, dropout_prob=0.5, seed=11))
    seen = {}
    orig = run.engine.aggregate
    run.engine.aggregate = lambda w, **kw: (seen.setdefault("w", list(w)), orig(w, **kw))
    rec = run.step()
    draws = run.algo.dropouts(0, {k: 5 for k in range(4)})
    assert rec["dropped"] == [{"client": k, "iterations_done": n} for k, n in sorted(draws.items())]
    assert 0 < len(draws) < 4  # this seed drops some, not all
    done = sum(draws.get(k, 5) for k in range(4))
    # B = 32 rows of the cnn's cut for 12x12 images (32 channels x 3 x 3), fp32
    assert rec["bytes_up_smashed"] == done * 32 * (32 * 3 * 3) * 4
    assert all(w == 0.0 for k, w in enumerate(seen["w"]) if k in draws)
    assert sum(seen["w"]) == pytest.approx(1.0)
    assert rec["bytes_up_client_model"] == (4 - len(draws)) * run.engine.client_bytes()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("algorithm", ["cse_fsl", "splitfed_v1", "fedavg"])
def test_everyone_dropping_restores_the_last_average(algorithm, fused):
    """p = 1: every participant fails, nothing is averaged and the participants' models (and
    CSE-FSL's auxiliaries, SplitFed v1's / FedAvg's server copies) return to the last average."""
    run = Run(_cfg(algorithm=algorithm, fused=fused, clients_per_round=0))
    run.step()  # an ordinary round: the models move, and all clients hold the average
    glob = {k: v.clone() for k, v in run.engine.eval_models()[0].state_dict().items()}
    run.cfg.dropout_prob = 1.0
    rec = run.step()
    assert len(rec["dropped"]) == 4 and rec["bytes_up_client_model"] == 0
    for s in _client_states(run.engine):
        for k, v in s.items():
            assert torch.equal(v, glob[k]), k
    if algorithm == "cse_fsl":
        a0 = run.engine.aux_module(0).state_dict()
        for k in range(1, 4):
            for n, v in run.engine.aux_module(k).state_dict().items():
                assert torch.equal(v, a0[n])


@pytest.mark.parametrize("algorithm", ["fsl_sage", "fedavg"])
def test_engines_agree_with_dropouts(algorithm):
    cfg = _cfg(algorithm=algorithm, dataset="synthetic:1x28x28", seed=5, dropout_prob=0.4)
    ref, fused = Run(cfg), Run(dataclasses.replace(cfg, fused=True))
    for _ in range(3):
        ref.step()
        fused.step()
    assert [m["dropped"] for m in ref.metrics] == [m["dropped"] for m in fused.metrics]
    assert any(m["dropped"] for m in ref.metrics)
    assert [m["comm_bytes"] for m in ref.metrics] == [m["comm_bytes"] for m in fused.metrics]
    a, b = ref.engine.named_state(), fused.engine.named_state()
    ta = torch.cat([a[p][n].flatten().double() for p in a for n in a[p]])
    tb = torch.cat([b[p][n].flatten().double() for p in a for n in a[p]])
    off = (ta - tb).abs() > 1e-5 + 1e-4 * ta.abs()
    assert float(off.double().mean()) <= 1e-3 and float((ta - tb).abs().max()) <= 2 * cfg.lr


def test_resume_with_dropouts(tmp_path):
    args = ["--algorithm", "cse_fsl", "--clients", "4", "--clients-per-round", "3", "--dropout-prob", "0.5",
            "--dataset", "synthetic:1x12x12", "--batch-size", "32", "--no-progress"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args + ["--rounds", "4", "--out", str(full)]) == 0
    assert main(args + ["--rounds", "2", "--out", str(part)]) == 0
    assert main(["--resume", str(part), "--rounds", "4", "--no-progress"]) == 0

    def rows(d):
        return [{k: v for k, v in json.loads(l).items() if not k.startswith("seconds_")}
                for l in (d / "metrics.jsonl").read_text().splitlines()]

    assert rows(full) == rows(part)
    assert any(r["dropped"] for r in rows(full))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_dropout_prob(p):
    with pytest.raises(ConfigError, match="--dropout-prob: must be a probability"):
        _cfg(dropout_prob=p)


def test_comm_dry_run_counts_the_participants():
    """python -m fsl_fast.comm --clients-per-round: equal client shares, so half the clients send
    half the bytes per round (round 1: no alignment, no initial broadcast)."""
    from fsl_fast.comm import dry_run

    for algo in ("fsl_sage", "splitfed_v1", "fedavg"):
        kw = dict(model="cnn", in_shape=(1, 28, 28), clients=10, samples_per_client=100, batch_size=20, rounds=2)
        full = dry_run(algo, **kw)[1]["round_bytes_paper"]
        half = dry_run(algo, clients_per_round=5, **kw)[1]["round_bytes_paper"]
        assert half * 2 == full > 0, algo
