"""Distributed runtime (fsl_fast/distributed/, fsl_fast/transport/): 3 processes on loopback (gloo, one thread each)
give the in-process `parallel` run's metrics; the wire carries what the ledger counts; a killed
client rank fails every process within the timeout, naming the rank and the round, and the run
resumes from the last committed round. Plus in-process checks of the pieces (blocks, headers,
received-tensor checks, flat model state)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsl_fast.train import main

ROOT = Path(__file__).resolve().parents[1]
# 4 clients = 2 per client rank; align every round so the auxiliary downlink is exercised.
TINY = ["--dataset", "synthetic:1x28x28", "--clients", "4", "--batch-size", "32", "--align-epochs", "2",
        "--align-interval", "1", "--schedule", "parallel", "--threads", "1", "--no-progress"]
TIMING = ("seconds_",)
# --dist-fedavg allreduce adds per-rank partial sums, ((w0x0+w1x1)+(w2x2+w3x3)) instead of the
# in-process ((w0x0+w1x1)+w2x2)+w3x3: models differ in the last float32 bits after a round, and
# training amplifies it (seen: 2e-5 relative in the test loss after 4 rounds of mnist5k); after 2
# tiny rounds 1e-5 is ample. The default (ordered) FedAvg is compared exactly.
REL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("FSL_FAST_JIT", "0")
    return env


def _launch(args, nproc=3):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--monitor-interval", "0.2",
           "-m", "fsl_fast.train", "--distributed"] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _finish(proc, timeout, what):
    """(returncode, stdout, stderr) of a launched run; kills its process group after ``timeout``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _run(args, nproc=3, timeout=240):
    return _finish(_launch(args, nproc), timeout, "torchrun")


def _metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_metrics(dist_m, local_m, exact=True):
    assert [r["round"] for r in dist_m] == [r["round"] for r in local_m]
    for rd, rl in zip(dist_m, local_m):
        for key, v in rl.items():
            if key.startswith(TIMING):
                continue
            if not exact and key in ("test_loss", "test_accuracy", "train_loss", "train_accuracy"):
                assert math.isclose(rd[key], v, rel_tol=REL, abs_tol=1e-7), (rd["round"], key, rd[key], v)
            else:
                assert rd[key] == v, (rd["round"], key, rd[key], v)


def _local(tmp_path, args, name="local"):
    out = tmp_path / name
    assert main(args + ["--out", str(out)]) == 0
    return _metrics(out)


# ---------------------------------------------------------------------------------------------
# Three processes against the in-process run


CASES = ["fsl_sage", "cse_fsl", "splitfed_v2", "splitfed_v1", "fedavg", "cse_fsl-fused", "fsl_sage-fused"]


@pytest.mark.parametrize("case", CASES)
def test_distributed_equals_in_process(tmp_path, case):
    algorithm, _, fused = case.partition("-")
    args = ["--algorithm", algorithm, "--rounds", "2"] + TINY
    if fused:
        # The fused engine (flat [K, P] rows) under the same wrapper; its FSL-SAGE alignment needs
        # the fused auxiliary op.
        if algorithm == "fsl_sage":
            try:
                import fsl_fast.ops.aux  # noqa: F401
            except ImportError as e:
                pytest.skip(f"fused FSL-SAGE needs fsl_fast.ops.aux, not importable yet ({e})")
        args += ["--fused"]
    out = tmp_path / "dist"
    rc, stdout, err = _run(args + ["--out", str(out), "--dist-timeout", "60"])
    assert rc == 0, err[-3000:]
    dm = _metrics(out)
    _same_metrics(dm, _local(tmp_path, args))
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 3 and res["rounds_completed"] == 2
    assert json.loads((out / "checkpoints/dist.json").read_text()) == {"format_version": 1, "world_size": 3, "round": 1}
    part = json.loads((out / "partition.json").read_text())
    assert [c["rank"] for c in part["clients"]] == [1, 1, 2, 2]
    # The wire: every payload sent was received, and per-client messages are the ledger's bytes.
    aux_b = dm[1]["bytes_down_aux_model"] // 4 if algorithm == "fsl_sage" else 0
    for r in dm:
        assert r["wire_sent_bytes"] == r["wire_received_bytes"] > 0
        for key in ("up_smashed", "up_labels", "down_gradients"):
            assert r[f"wire_{key}"] == r[f"bytes_{key}"], (r["round"], key)
        # Model exchange: the ledger counts 4 clients up and down (the papers' convention), the
        # wire one pre-reduced buffer per client rank each way.
        client_b = r["bytes_up_client_model"] // 4
        assert client_b > 0 and r["bytes_up_client_model"] == 4 * client_b
        assert r["wire_up_client_model"] == r["wire_down_client_model"] == 2 * client_b
    if algorithm == "fsl_sage":
        # Round 0's ledger also counts the initial broadcast (4 auxiliaries, implicit here: every
        # rank builds the same models from the seed); the alignment downlink is on the wire.
        assert dm[0]["wire_down_aux_model"] == 4 * aux_b == dm[0]["bytes_down_aux_model"] - 4 * aux_b
        assert dm[1]["wire_down_aux_model"] == dm[1]["bytes_down_aux_model"] == 4 * aux_b
        assert dm[0]["wire_up_smashed"] > 0 and dm[0]["wire_down_gradients"] == 0
    if algorithm == "cse_fsl":
        aux_b = dm[0]["bytes_up_aux_model"] // 4
        assert dm[1]["wire_up_aux_model"] == dm[1]["wire_down_aux_model"] == 2 * aux_b > 0
    if algorithm.startswith("splitfed"):
        assert dm[0]["wire_down_gradients"] == dm[0]["wire_up_smashed"] > 0
    if algorithm == "fedavg":  # whole models: the server halves are averaged over the wire too
        server_b = dm[0]["bytes_up_server_model"] // 4
        assert dm[0]["wire_up_server_model"] == dm[0]["wire_down_server_model"] == 2 * server_b > 0
        assert dm[0]["wire_up_smashed"] == 0


def test_batchnorm_models_average_exactly(tmp_path):
    """ResNet-18 halves carry BatchNorm (integer num_batches_tracked buffers) and a convolutional
    auxiliary; uneven client weights; 3 clients on 2 client ranks."""
    from fsl_fast.models import build_split_model

    args = ["--algorithm", "cse_fsl", "--rounds", "2", "--dataset", "synthetic:3x32x32", "--model", "resnet18",
            "--clients", "3", "--batch-size", "64", "--partition", "dirichlet", "--alpha", "0.5",
            "--schedule", "parallel", "--threads", "1", "--no-progress"]
    out = tmp_path / "dist"
    rc, _, err = _run(args + ["--out", str(out), "--dist-timeout", "120"])
    assert rc == 0, err[-3000:]
    dm = _metrics(out)
    _same_metrics(dm, _local(tmp_path, args))
    split = build_split_model("resnet18", (3, 32, 32), 10)
    for name, mod, kind in (("client", split.client, "client_model"), ("aux", split.aux, "aux_model")):
        sd = mod.state_dict()
        q = sum(v.numel() for v in sd.values() if not v.is_floating_point())
        assert q > 0, name
        nbytes = sum(v.numel() * v.element_size() for v in sd.values())
        # ledger: 3 clients x the model with int64 counters; wire: 2 client ranks x one float32
        # running sum whose integer part travels as float32 (4 bytes, not 8)
        assert dm[1][f"bytes_up_{kind}"] == 3 * nbytes
        assert dm[1][f"wire_up_{kind}"] == dm[1][f"wire_down_{kind}"] == 2 * (nbytes - 4 * q)


def test_allreduce_fedavg_matches_within_rounding(tmp_path):
    args = ["--algorithm", "cse_fsl", "--rounds", "2", "--partition", "dirichlet", "--alpha", "0.5"] + TINY
    out = tmp_path / "dist"
    rc, _, err = _run(args + ["--out", str(out), "--dist-fedavg", "allreduce", "--dist-timeout", "60"])
    assert rc == 0, err[-3000:]
    dm = _metrics(out)
    _same_metrics(dm, _local(tmp_path, args), exact=False)
    for r in dm:  # one all-reduce: each client rank's partial sum up, the average down
        client_b, aux_b = r["bytes_up_client_model"] // 4, r["bytes_up_aux_model"] // 4
        assert r["wire_up_client_model"] == r["wire_down_client_model"] == 2 * client_b
        assert r["wire_up_aux_model"] == r["wire_down_aux_model"] == 2 * aux_b


def _equal_to_local(tmp_path, args):
    """Run ``args`` on 3 processes into tmp_path/dist; its metrics, checked equal to the in-process run's."""
    out = tmp_path / "dist"
    rc, _, err = _run(args + ["--out", str(out), "--dist-timeout", "60"])
    assert rc == 0, err[-3000:]
    dm = _metrics(out)
    _same_metrics(dm, _local(tmp_path, args))
    return dm


@pytest.mark.parametrize("uplink", [["--quantize", "int8"], ["--uplink", "int2:g16"]], ids=["int8", "int2"])
def test_quantized_uplink_equals_in_process(tmp_path, uplink):
    for r in _equal_to_local(tmp_path, ["--algorithm", "splitfed_v2", "--rounds", "2"] + uplink + TINY):
        # int8: codes (1 byte per value) + one float32 scale per row: about a quarter of float32;
        # int2: a quarter byte per value + a scale per 16 values
        assert r["wire_up_smashed"] == r["bytes_up_smashed"] < r["wire_down_gradients"] / 3
        assert r["bytes_up_smashed"] == r["bytes_up_smashed_values"] + r["bytes_up_smashed_scales"]
        if uplink[1].startswith("int2"):
            assert r["bytes_up_smashed"] * 7 < r["wire_down_gradients"]


@pytest.mark.parametrize("codecs", [
    ["--algorithm", "splitfed_v2", "--uplink", "topk:0.1,int4", "--downlink", "topk:0.2,ef"],
    ["--algorithm", "fsl_sage", "--uplink", "topk:0.05,int8,ef", "--stochastic-rounding"],
    ["--algorithm", "splitfed_v1", "--uplink", "topk:0.5", "--downlink", "int2,ef"],
], ids=["sfv2-topk-int4-down-topk-ef", "sage-topk-int8-ef-stoch", "sfv1-topk-down-int2-ef"])
def test_codecs_equal_in_process(tmp_path, codecs):
    """Top-k positions travel packed, error feedback lives on the sending rank (the client's
    uplink residual in its shard, the server's downlink residual in rank 0's), and the stochastic
    keys stay in step: every round equals the in-process run, and the wire carries exactly the
    bytes the ledger counts, component by component. Resuming a run with ef is exact."""
    out = tmp_path / "dist"
    for r in _equal_to_local(tmp_path, ["--rounds", "2"] + codecs + TINY):
        assert r["wire_up_smashed"] == r["bytes_up_smashed"] == sum(
            r.get(f"bytes_up_smashed_{c}", 0) for c in ("values", "scales", "indices", "header"))
        assert r["bytes_up_smashed_indices"] > 0 and r["bytes_up_smashed_header"] > 0
        if "--downlink" in codecs:
            assert r["wire_down_gradients"] == r["bytes_down_gradients"] == sum(
                r.get(f"bytes_down_gradients_{c}", 0) for c in ("values", "scales", "indices", "header"))
    if "ef" in " ".join(codecs):
        rc, _, err = _run(["--resume", str(out), "--rounds", "3", "--no-progress"])
        assert rc == 0, err[-3000:]
        _same_metrics(_metrics(out), _local(tmp_path, ["--rounds", "3"] + codecs + TINY, "local3"))


# ---------------------------------------------------------------------------------------------
# Faults


def _worker_pid(agent_pid: int, rank: int) -> int | None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def test_killed_client_rank_fails_cleanly_then_resumes(tmp_path):
    out = tmp_path / "dist"
    args = ["--algorithm", "fsl_sage", "--rounds", "40", "--dist-timeout", "20"] + TINY
    proc = _launch(args + ["--out", str(out)])
    try:
        deadline = time.monotonic() + 180
        while not ((out / "checkpoints/dist.json").exists() and len(_metrics(out)) >= 1):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no round completed in 180 s"
            time.sleep(0.05)
        pid = _worker_pid(proc.pid, 2)
        assert pid is not None, "rank 2's process not found"
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        _, err = proc.communicate(timeout=20 + 40)
        elapsed = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    assert elapsed < 20 + 10, f"took {elapsed:.1f} s to fail"
    ours = [line for line in err.splitlines() if line.startswith("error: rank ")]
    assert ours, err[-3000:]
    # Every surviving rank names the round it was in and the rank that died.
    for r in (0, 1):
        line = next((x for x in ours if x.startswith(f"error: rank {r}:")), None)
        assert line is not None, err[-3000:]
        assert " round " in line and "no heartbeat from rank 2 " in line, err[-3000:]
    print("\n".join(ours))
    done = json.loads((out / "checkpoints/dist.json").read_text())["round"]
    assert done < 39
    # Resume: continue from the last committed round for two more rounds.
    rounds = done + 3
    rc, _, err = _run(["--resume", str(out), "--rounds", str(rounds), "--no-progress"])
    assert rc == 0, err[-3000:]
    dm = _metrics(out)
    assert len(dm) == rounds
    local_args = ["--algorithm", "fsl_sage", "--rounds", str(rounds)] + TINY
    _same_metrics(dm, _local(tmp_path, local_args))
    # Only the last committed round's shards remain next to the manifest (plus the client
    # ranks' previous round, kept until the next commit).
    shards = sorted(p.name for p in (out / "checkpoints").glob("dist-rank*.pt"))
    assert f"dist-rank0-round{rounds - 1}.pt" in shards and len(shards) == 5, shards
    # Another world size cannot continue it (the clients' states live in the 3 ranks' shards).
    rc, _, err = _run(["--resume", str(out), "--rounds", str(rounds + 1), "--no-progress"], nproc=2)
    assert rc != 0 and "relaunch with 3 (got 2)" in err, err[-3000:]
    assert len(_metrics(out)) == rounds


def test_without_torchrun_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "fsl_fast.train", "--distributed", "--out", str(tmp_path / "r")]
                          + TINY, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "torchrun" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--dist-timeout", "0"], "--dist-timeout"),
    (["--dist-timeout", "nan"], "--dist-timeout"),
    (["--dist-fedavg", "tree"], "invalid choice"),
])
def test_bad_distributed_options(tmp_path, capsys, argv, needle):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) if "invalid choice" in needle else contextlib.nullcontext():
        assert main(["--distributed", "--out", str(out)] + TINY + argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Pieces, in process


def test_client_blocks():
    from fsl_fast.config import ConfigError
    from fsl_fast.distributed import Topology, client_blocks

    assert client_blocks(4, 3) == [range(0), range(0, 2), range(2, 4)]
    assert client_blocks(5, 3) == [range(0), range(0, 3), range(3, 5)]
    assert client_blocks(10, 4) == [range(0), range(0, 4), range(4, 7), range(7, 10)]
    topo = Topology(2, 3, 5)
    assert [topo.owner(k) for k in range(5)] == [1, 1, 1, 2, 2]
    assert list(topo.local_clients) == [3, 4] and not topo.is_server
    with pytest.raises(ConfigError, match="--clients"):
        client_blocks(2, 4)
    with pytest.raises(ConfigError, match="at least 2 processes"):
        client_blocks(2, 1)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_engines_export_and_import_flat_models(seed, fused):
    """The model exchange's wire form: every engine exports a client's model as float32 [P] +
    int64 [Q] (BatchNorm's counters) and imports it into one client or into all (and the average)."""
    from fsl_fast.config import Config
    from fsl_fast.runner import Run

    cfg = Config(model="resnet18", aux="layer3", dataset="synthetic:3x32x32:40", clients=2, batch_size=8,
                 algorithm="cse_fsl", rounds=1, fused=fused, seed=seed).resolved()
    run = Run(cfg)
    run.step()
    eng = run.engine
    for kind in ("client", "aux"):
        f, i = eng.export_model(kind, 1)
        assert f.dtype == torch.float32 and i.dtype == torch.int64 and i.numel() > 0
        g = torch.randn_like(f)
        j = i + 7
        eng.import_model(kind, 0, g, j)
        f0, i0 = eng.export_model(kind, 0)
        assert torch.equal(f0, g) and torch.equal(i0, j)
        assert torch.equal(eng.export_model(kind, 1)[0], f)  # the other client is untouched
        eng.import_model_all(kind, f, i)
        for k in (0, 1):
            fk, ik = eng.export_model(kind, k)
            assert torch.equal(fk, f) and torch.equal(ik, i)
    client = eng.eval_models()[0]  # the averaged client module follows import_model_all
    assert torch.equal(torch.cat([t.detach().reshape(-1).float() for t in client.parameters()])[:8],
                       eng.export_model("client", 0)[0][:8])


class _FakeWork:
    def wait(self, timeout=None):
        return True


@pytest.fixture
def loop_transport(monkeypatch):
    """A rank-0 Transport whose isend/irecv go through an in-memory queue per tag, so headers and
    checks can be exercised without processes."""
    import fsl_fast.distributed as D

    queues: dict[int, list] = {}

    def isend(t, dst, tag=0):
        queues.setdefault(tag, []).append(t.clone())
        return _FakeWork()

    def irecv(t, src, tag=0):
        t.copy_(queues[tag].pop(0))
        return _FakeWork()

    monkeypatch.setattr(D.dist, "isend", isend)
    monkeypatch.setattr(D.dist, "irecv", irecv)
    tr = D.Transport(D.Topology(0, 3, 4), "cpu", 5.0)
    tr.round = 3
    return tr


def test_transport_round_trip_counts_bytes(loop_transport):
    tr = loop_transport
    z, y = torch.randn(5, 2, 3), torch.tensor([0, 1, 2, 3, 4])
    tr.send(0, "smashed", 2, [("smashed", z), ("labels", y)], "up")
    tr.flush()
    z2, y2 = tr.recv(2, "smashed", 2, [("smashed", (5, 2, 3), torch.float32, "finite"),
                                       ("labels", (5,), torch.int64, ("labels", 10))], "up")
    assert torch.equal(z2, z) and torch.equal(y2, y)
    assert tr.sent == tr.received == {("up", "smashed"): 120, ("up", "labels"): 40}


@pytest.mark.parametrize("case,needle", [
    ("shape", "expected shape (5, 2, 3) torch.float32, got (5, 2, 4) torch.float32"),
    ("dtype", "got (5, 2, 3) torch.float64"),
    ("nan", "1 non-finite values"),
    ("labels", "labels must lie in [0, 10), got [0, 12]"),
    ("round", "belongs to round 2, client 2"),
])
def test_received_tensors_are_checked(loop_transport, case, needle):
    from fsl_fast.distributed import DistributedError

    tr = loop_transport
    z, y = torch.randn(5, 2, 3), torch.tensor([0, 1, 2, 3, 4])
    if case == "shape":
        z = torch.randn(5, 2, 4)
    elif case == "dtype":
        z = z.double()
    elif case == "nan":
        z[1, 1, 1] = float("nan")
    elif case == "labels":
        y[2] = 12
    elif case == "round":
        tr.round = 2
    tr.send(0, "smashed", 2, [("smashed", z), ("labels", y)], "up")
    tr.round = 3
    with pytest.raises(DistributedError) as ei:
        tr.recv(2, "smashed", 2, [("smashed", (5, 2, 3), torch.float32, "finite"),
                                  ("labels", (5,), torch.int64, ("labels", 10))], "up")
    msg = str(ei.value)
    assert msg.startswith("rank 0: ") and "client 2 from rank 2" in msg and "in round 3" in msg, msg
    assert needle in msg, msg


def test_codec_messages_cross_the_transport(loop_transport):
    """Every codec's wire tensors arrive as sent (the top-k positions with a length known only by
    its bound) and rebuild the message; a position length past the bound is refused."""
    from fsl_fast import codec as C
    from fsl_fast.distributed import DistributedError

    tr = loop_transport
    z = torch.randn(6, 3, 5, 7)
    for text in ("int8", "int4:g10", "int2", "topk:0.3", "topk:0.02,int4", "topk:0.1,int8:g4"):
        cod = C.Codec(C.parse(text))
        p = cod.encode(z, 5)
        tr.send(0, "smashed", 2, [("smashed", w) for _, w in C.wire(p)], "up")
        tr.flush()
        got = tr.recv(2, "smashed", 2, [("smashed",) + s[1:] for s in cod.wire_specs(z.shape)], "up")
        assert torch.equal(cod.decode(cod.from_wire(z.shape, got)), cod.decode(p)), text
        assert cod.parts(cod.from_wire(z.shape, got)) == cod.parts(p), text
    tr.send(0, "smashed", 2, [("smashed", torch.zeros(9, dtype=torch.uint8))], "up")
    tr.flush()
    with pytest.raises(DistributedError, match=r"expected shape \(at most 8,\) torch.uint8, got \(9,\)"):
        tr.recv(2, "smashed", 2, [("smashed", C.AtMost(8), torch.uint8, None)], "up")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_stalled_client_rank_times_out_naming_it(tmp_path):
    out = tmp_path / "dist"
    timeout = 8
    args = ["--algorithm", "splitfed_v2", "--rounds", "40", "--dist-timeout", str(timeout)] + TINY
    proc = _launch(args + ["--out", str(out)])
    stalled = None
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() or len(_metrics(out)) < 1:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no round completed in 180 s"
            time.sleep(0.05)
        pids = {r: _worker_pid(proc.pid, r) for r in range(3)}
        stalled = pids[2]
        os.kill(stalled, signal.SIGSTOP)
        t0 = time.monotonic()
        while (_alive(pids[0]) or _alive(pids[1])) and time.monotonic() - t0 < timeout + 30:
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        # torchrun kills a stopped worker only after its 30 s grace period; spare the test that.
        os.kill(stalled, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    assert elapsed < timeout + 10, f"healthy ranks took {elapsed:.1f} s to exit"
    ours = [line for line in err.splitlines() if line.startswith("error: rank ")]
    line0 = next((x for x in ours if x.startswith("error: rank 0:")), None)
    assert line0 is not None, err[-3000:]
    assert " round " in line0 and "no heartbeat from rank 2 " in line0, line0
    print("\n".join(ours))


def test_divergence_ends_every_rank_naming_the_rank_that_saw_it(tmp_path):
    out = tmp_path / "dist"
    rc, _, err = _run(["--algorithm", "splitfed_v2", "--lr", "1e30", "--rounds", "2", "--dist-timeout", "60",
                       "--out", str(out)] + TINY)
    assert rc != 0, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("error: rank ")]
    saw = {int(line.split()[2].rstrip(":")) for line in ours
           if line.split(": ", 2)[-1].startswith("round 0, client ")}
    assert saw, err[-3000:]
    for r in range(3):
        line = next((x for x in ours if x.startswith(f"error: rank {r}:")), None)
        assert line is not None, err[-3000:]
        assert r in saw or any(f"[rank {s} exited: round 0, client " in line for s in saw), line
    print("\n".join(ours))


# ---------------------------------------------------------------------------------------------
# --tolerate-dropouts (python -m fsl_fast.launch; a rank killed at a reproducible step)


def _run_launch(args, nproc=3, timeout=240, kill_at=None):
    env = _env()
    if kill_at:
        env["FSL_FAST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "fsl_fast.launch", "--nproc-per-node", str(nproc)] + args
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return _finish(proc, timeout, "fsl_fast.launch")


def _as_dropouts(monkeypatch, lost_row, q):
    """The in-process run in which the lost rank's clients drop out where it died: in its round
    after the iterations whose uploads reached the server, then at iteration 0 of every later
    round."""
    from fsl_fast.algorithms import Algorithm

    t_lost = lost_row["round"]
    done = {r["client"]: (r["uploads_received"] - 1) * q + 1 if r["uploads_received"] else 0
            for r in lost_row["lost"]}

    def dropouts(self, t, iters):
        return {} if t < t_lost else dict(done) if t == t_lost else {k: 0 for k in done}

    monkeypatch.setattr(Algorithm, "dropouts", dropouts)


@pytest.mark.parametrize("algorithm,rank,step", [("fsl_sage", 2, 3), ("splitfed_v2", 2, 2), ("fedavg", 1, 2)])
def test_tolerated_rank_death_equals_in_process_dropouts(tmp_path, monkeypatch, algorithm, rank, step):
    """Client rank ``rank`` (2 clients of 4) is killed at its local step ``step`` of round 1: the
    run goes on without it, and every round's metrics equal the in-process run in which its
    clients drop out at that point (and at iteration 0 of later rounds); for FSL-SAGE --resume
    then continues without it."""
    out = tmp_path / "dist"
    q = 2 if algorithm == "fsl_sage" else 1
    args = ["--algorithm", algorithm, "--rounds", "3", "--server-update-interval", str(q)] + TINY
    rc, _, err = _run_launch(args + ["--out", str(out), "--dist-timeout", "60", "--tolerate-dropouts"],
                             kill_at=f"{rank}:1:{step}")
    assert rc == 0, err[-3000:]
    assert f"rank {rank} ended by SIGKILL" in err, err[-3000:]
    dm = _metrics(out)
    assert [r["round"] for r in dm] == [0, 1, 2]
    lost = dm[1]["lost"]
    gone = [0, 1] if rank == 1 else [2, 3]
    assert [(r["client"], r["rank"]) for r in lost] == [(k, rank) for k in gone], lost
    # Steps 0..step-1 ran; the uploads of those that upload (every q-th) reached the server.
    uploads = 0 if algorithm == "fedavg" else len(range(0, step, q))
    assert [r["uploads_received"] for r in lost] == [uploads] * 2, lost
    assert "lost" not in dm[0] and "lost_clients" not in dm[1] and dm[2]["lost_clients"] == gone
    assert dm[2]["bytes_up_client_model"] * 2 == dm[0]["bytes_up_client_model"]
    res = json.loads((out / "results.json").read_text())
    assert res["lost_ranks"] == [rank] and res["rounds_completed"] == 3
    assert json.loads((out / "checkpoints/dist.json").read_text())["lost_ranks"] == [rank]
    _as_dropouts(monkeypatch, dm[1], q)
    local = _local(tmp_path, args)
    if algorithm == "fedavg":
        # FedAvg's clients compute their own training statistics: the lost rank's steps of round
        # 1 went down with it (in process they are counted; the models are equal either way).
        for key in ("train_loss", "train_accuracy", "train_samples"):
            local[1].pop(key)
    _same_metrics(dm, local)
    if algorithm != "fsl_sage":
        return
    # --resume with the same world size: rank 2 starts, sees that it was dropped, and leaves.
    rc, _, err = _run_launch(["--resume", str(out), "--rounds", "4", "--no-progress"])
    assert rc == 0, err[-3000:]
    assert "rank 2: --resume: this rank was dropped from the run" in err, err[-3000:]
    dm = _metrics(out)
    assert len(dm) == 4 and dm[3]["lost_clients"] == [2, 3]
    _same_metrics(dm, _local(tmp_path, args[:2] + ["--rounds", "4"] + args[4:], name="local4"))


def test_rank_death_without_tolerance_still_stops_the_run(tmp_path):
    out = tmp_path / "dist"
    args = ["--algorithm", "fsl_sage", "--rounds", "3", "--dist-timeout", "30"] + TINY
    rc, _, err = _run_launch(args + ["--out", str(out)], kill_at="2:1:1")
    assert rc == 1, err[-3000:]
    line = next((x for x in err.splitlines() if x.startswith("error: rank 0:")), None)
    assert line is not None and "round 1" in line, err[-3000:]
    assert len(_metrics(out)) == 1  # round 0 committed, round 1 not


@pytest.mark.parametrize("argv,env,needle", [
    ([], {}, "--tolerate-dropouts: an option of the distributed runtime"),
    (["--distributed"], {"RANK": "0", "WORLD_SIZE": "3", "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": "1"}, "torchrun stops every worker"),
    (["--distributed"], {"RANK": "0", "WORLD_SIZE": "3"}, "needs MASTER_ADDR and MASTER_PORT"),
    (["--distributed", "--device", "cuda"], {}, "CPU (gloo) only"),
])
def test_bad_tolerate_dropouts(tmp_path, capsys, monkeypatch, argv, env, needle):
    for k in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "r"
    assert main(["--tolerate-dropouts", "--out", str(out)] + TINY + argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not out.exists()
