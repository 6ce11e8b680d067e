"""--client-store memory|disk: only the round's M clients in the engine, the rest parked; the
results equal the all-in-memory fused engine bit for bit; resume; bad combinations."""
import dataclasses
import json

import pytest
import torch

from fsl_fast.config import ALGORITHMS, Config, ConfigError
from fsl_fast.runner import Run
from fsl_fast.train import main

BASE = dict(dataset="synthetic:1x12x12", clients=6, clients_per_round=2, batch_size=32, align_epochs=2,
            align_interval=2, buffer_size=64, align_batch_size=64, seed=3, fused=True)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds_")} for r in rows]


def _same(a, b):
    sa, sb = a.engine.named_state(), b.engine.named_state()
    assert sa.keys() == sb.keys()
    for p in sa:
        for k in sa[p]:
            assert torch.equal(sa[p][k], sb[p][k]), (p, k)
    assert _strip(a.metrics) == _strip(b.metrics)


@pytest.mark.parametrize("mode", ["memory", "disk"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_equal_to_all_in_memory(algorithm, mode):
    cfg = Config(algorithm=algorithm, **BASE).resolved()
    off, st = Run(cfg), Run(dataclasses.replace(cfg, client_store=mode))
    for _ in range(5):
        off.step()
        st.step()
    _same(off, st)
    eng = st.engine
    assert eng.inner.clients.flat.buffer.shape[0] == 2  # two slots, not six clients
    assert st.metrics[-1]["participants"] == [c for c in eng.occupants if c is not None]


@pytest.mark.parametrize("kw", [
    dict(model="resnet18", dataset="synthetic:3x32x32:96", batch_size=16, algorithm="fsl_sage",
         clients_per_round=3, align_epochs=1, buffer_size=32),  # BatchNorm (integer buffers), ConvAux
    dict(dropout_prob=0.5, algorithm="fsl_sage"),
    dict(optimizer="sgd", momentum=0.9, lr=0.01, algorithm="cse_fsl", schedule="parallel"),
    dict(quantize="int4", stochastic_rounding=True, algorithm="fsl_sage", precision="bf16"),  # parked codes
])
def test_equal_with_batchnorm_dropouts_and_sgd(kw):
    cfg = Config(**{**BASE, **kw}).resolved()
    off, st = Run(cfg), Run(dataclasses.replace(cfg, client_store="disk"))
    for _ in range(3):
        off.step()
        st.step()
    _same(off, st)


def test_disk_store_resume_and_files(tmp_path):
    args = ["--dataset", "synthetic:1x12x12", "--clients", "6", "--clients-per-round", "2", "--batch-size", "32",
            "--align-epochs", "2", "--align-interval", "2", "--fused", "--no-progress"]
    full, part, ref = tmp_path / "full", tmp_path / "part", tmp_path / "ref"
    assert main(args + ["--rounds", "5", "--client-store", "disk", "--out", str(full)]) == 0
    assert main(args + ["--rounds", "5", "--out", str(ref)]) == 0
    assert main(args + ["--rounds", "2", "--client-store", "disk", "--out", str(part)]) == 0
    assert main(["--resume", str(part), "--rounds", "5", "--no-progress"]) == 0
    rows = lambda d: _strip([json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()])
    assert rows(full) == rows(part) == rows(ref)
    files = sorted(p.name for p in (full / "client_store").iterdir())
    # every client that sat a round out after taking part has its engine state and buffer there
    assert any(f.startswith("engine-") for f in files) and any(f.startswith("buffer-") for f in files)
    res = json.loads((full / "results.json").read_text())
    assert res["executors"]["client_store"] == "disk"
    # one client's file holds its rows only (a row is a view: saved as such, it would drag the
    # whole [M, P] storage along): the client's Adam moments, its auxiliary and the aux's moments
    run = Run(Config(**{**BASE, "client_store": "disk"}).resolved())
    per_client = 4 * (2 * run.engine.inner.clients.np + 3 * run.engine.inner.aux.flat.buffer.shape[1])
    sizes = [p.stat().st_size for p in (full / "client_store").glob("engine-*.pt")]
    assert sizes and max(sizes) < per_client + 20_000, (max(sizes), per_client)


@pytest.mark.parametrize("kw,msg", [
    (dict(client_store="disk", fused=False), "add --fused"),
    (dict(client_store="disk", clients_per_round=0), "needs --clients-per-round"),
    (dict(client_store="tape"), "--client-store: unknown value"),
    (dict(client_store="memory", warm_start="x"), "not available with --client-store"),
])
def test_bad_combinations(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(**{**BASE, **kw}).resolved()
