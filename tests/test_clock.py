"""The simulated clock (--client-profile): the event simulation by hand, profiles, FLOP counts,
both engines, resume."""
import json

import pytest

from fsl_fast.clock import PRESETS, Profile, RoundTrace, simulate, step_flops
from fsl_fast.config import Config, ConfigError
from fsl_fast.models import build_split_model
from fsl_fast.train import main


def _profile(flops=(1.0, 1.0), up=10.0, down=20.0, latency=0.5, server=10.0):
    return Profile({"server_flops": server, "clients": {"flops": list(flops), "up_bytes_per_s": up,
                                                        "down_bytes_per_s": down, "latency_s": latency}},
                   len(flops), seed=0)


def test_one_client_blocking_request_by_hand():
    tr = RoundTrace()
    tr.compute(0, 2.0)            # 2 s at 1 FLOP/s
    tr.request(0, 10, 10, 20)     # up 1 s + 0.5, server 1 s, down 0.5 + 1 s
    tr.compute(0, 1.0)            # 1 s
    tr.finish(0, 10, 20)          # model up 1 s + 0.5; average down 0.5 + 1 s
    # t: 2 -> leaves 2, arrives 3.5 -> server 3.5..4.5 -> answer 6.0 -> 7.0 -> model arrives 8.5
    # -> everyone holds the average at 8.5 + 1.5 = 10.0
    assert simulate(tr, _profile(flops=(1.0,))) == pytest.approx(10.0)


def test_server_serves_in_arrival_order():
    tr = RoundTrace()
    for k in (0, 1):
        tr.request(k, 10, 10, 0)  # both arrive at 1.5; the server takes 0 then 1 (1 s each)
        tr.finish(k, 0, 0)
    # answers: client 0 at 2.5 + 0.5 = 3.0, client 1 at 3.5 + 0.5 = 4.0; their (empty) models
    # arrive 0.5 later; plus the download's latency 0.5
    assert simulate(tr, _profile()) == pytest.approx(5.0)
    # a faster client arrives first and is served first, whatever its id
    tr2 = RoundTrace()
    tr2.compute(0, 4.0)  # client 0 (1 FLOP/s) computes 4 s first
    tr2.compute(1, 4.0)  # client 1 (4 FLOP/s) 1 s
    for k in (0, 1):
        tr2.request(k, 10, 10, 0)
        tr2.finish(k, 0, 0)
    # client 1 arrives 2.5, served 2.5..3.5, back 4.0; client 0 arrives 5.5, served 5.5..6.5,
    # back 7.0, model at 7.5, + 0.5
    assert simulate(tr2, _profile(flops=(1.0, 4.0))) == pytest.approx(8.0)


def test_sends_do_not_stop_the_client_but_share_its_link():
    tr = RoundTrace()
    tr.send(0, 10, 100)  # link busy 0..1, arrives 1.5; server 1.5..11.5
    tr.send(0, 10, 0)    # link 1..2, arrives 2.5
    tr.compute(0, 3.0)   # runs meanwhile: 0..3
    tr.finish(0, 10, 0)  # link 3..4, arrives 4.5
    # the round waits for the server's queue (11.5), then the download latency 0.5
    assert simulate(tr, _profile(flops=(1.0,))) == pytest.approx(12.0)


def test_dropped_clients_are_not_waited_for():
    tr = RoundTrace()
    tr.compute(0, 1.0)
    tr.finish(0, 0, 0)
    tr.compute(1, 100.0)  # client 1 failed (no finish): its compute does not hold the round
    assert simulate(tr, _profile()) == pytest.approx(1.0 + 0.5 + 0.5)


def test_profiles_are_seeded_per_client_and_checked(tmp_path):
    a = Profile.load("mobile", 50, seed=3)
    b = Profile.load("mobile", 50, seed=3)
    assert [d.flops for d in a.clients] == [d.flops for d in b.clients]
    assert [d.flops for d in Profile.load("mobile", 50, seed=4).clients] != [d.flops for d in a.clients]
    # the first clients' devices do not depend on how many clients there are
    assert [d.up for d in Profile.load("mobile", 5, seed=3).clients] == [d.up for d in a.clients[:5]]
    med = sorted(d.flops for d in Profile.load("mobile", 2001, seed=0).clients)[1000]
    assert med == pytest.approx(PRESETS["mobile"]["clients"]["flops"]["lognormal"]["median"], rel=0.1)
    lat = [d.latency for d in a.clients]
    assert min(lat) >= 0.02 and max(lat) <= 0.1
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"server_flops": 5, "clients": {"flops": [1, 2], "up_bytes_per_s": 3,
                                                            "down_bytes_per_s": 4, "latency_s": 0}}))
    p = Profile.load(str(f), 3, seed=0)
    assert [d.flops for d in p.clients] == [1, 2, 1] and p.server_flops == 5
    for bad, msg in [({"server_flops": 1}, "needs 'server_flops' and 'clients'"),
                     ({"server_flops": 1, "clients": {"flops": 1}}, "missing"),
                     ({"server_flops": 1, "clients": {"flops": {"gamma": 1}, "up_bytes_per_s": 1,
                                                      "down_bytes_per_s": 1, "latency_s": 0}}, "must be a number"),
                     ({"server_flops": 1, "clients": {"flops": 0, "up_bytes_per_s": 1,
                                                      "down_bytes_per_s": 1, "latency_s": 0}}, "must be positive")]:
        f.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=msg):
            Profile.load(str(f), 2, seed=0)
    with pytest.raises(ConfigError, match="neither a preset"):
        Profile.load("satellite", 2, seed=0)


def test_flop_counts_by_hand():
    """cnn on 1x28x28: conv 1->16 (3x3) at 28x28, conv 16->32 at 14x14, Linear 1568->128->10;
    2 FLOPs per multiply-add."""
    fl = step_flops(build_split_model("cnn", (1, 28, 28), 10), (1, 28, 28))
    conv1 = 2 * 28 * 28 * 16 * 9 * 1
    conv2 = 2 * 14 * 14 * 32 * 9 * 16
    assert fl["client_fwd"] == conv1 + conv2
    # backward: weight gradients of both convolutions, input gradient of the second only
    assert fl["client_bwd"] == conv1 + 2 * conv2
    fc = 2 * (1568 * 128 + 128 * 10)
    assert fl["server"] == 3 * fc  # forward, weight gradients, input gradients
    assert fl["aux"] == 3 * 2 * 1568 * 10
    assert fl["full"] == fl["client_fwd"] + fl["client_bwd"] + fl["server"]
    assert fl["align_row"] > fl["aux"]


ARGS = ["--dataset", "synthetic:1x12x12", "--clients", "3", "--batch-size", "32", "--align-epochs", "2",
        "--align-interval", "2", "--no-progress"]


def _rows(d):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


def test_runs_log_simulated_time_equal_on_both_engines_and_across_resume(tmp_path):
    out = {}
    for fused in (False, True):
        for alg in ("fsl_sage", "splitfed_v2"):
            d = tmp_path / f"{alg}{int(fused)}"
            assert main(ARGS + ["--algorithm", alg, "--rounds", "3", "--client-profile", "mobile", "--out", str(d)]
                        + (["--fused"] if fused else [])) == 0
            out[alg, fused] = _rows(d)
    for alg in ("fsl_sage", "splitfed_v2"):
        a, b = out[alg, False], out[alg, True]
        assert [r["sim_seconds"] for r in a] == [r["sim_seconds"] for r in b]
        assert all(r["sim_seconds"] > 0 for r in a)
        assert a[-1]["sim_seconds_total"] == pytest.approx(sum(r["sim_seconds"] for r in a))
    # SplitFed waits on the server every iteration: on phones it is the slower one per round
    assert out["splitfed_v2", False][1]["sim_seconds"] > out["fsl_sage", False][1]["sim_seconds"]
    # round 0 aligns (l = 2): FSL-SAGE's clients wait for their auxiliaries then
    assert out["fsl_sage", False][0]["sim_seconds"] > out["fsl_sage", False][1]["sim_seconds"]
    part = tmp_path / "part"
    assert main(ARGS + ["--rounds", "1", "--client-profile", "mobile", "--out", str(part)]) == 0
    assert main(["--resume", str(part), "--rounds", "3", "--no-progress"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds_")} for r in rows]
    assert strip(_rows(part)) == strip(out["fsl_sage", False])


def test_profile_needs_in_process():
    with pytest.raises(ConfigError, match="simulated clock runs in process only"):
        Config(client_profile="uniform", distributed=True).resolved()
