"""Cross-device scale: seconds per round and peak RSS, fused engine, FSL-SAGE, 2 threads.

100 clients all active against 1,000 clients with 50 per round: the engine holding every client
(``--client-store off``) and holding only the round's 50 (``memory``: the others' state parked in
RAM; ``disk``: parked in files). 16 training samples per client (one local iteration of batch
16; with the default q = 5 that iteration uploads), the bundled synthetic sets (1x28x28 for the
cnn, 3x32x32 for resnet18 + layer3), two alignment epochs in alignment rounds. Every case runs in
a fresh process (peak RSS is per process) for three rounds; the round time is the median of
rounds 1 and 2 (round 0 aligns on the first uploads and warms up), with its test evaluation
(the synthetic test set is a quarter of the training set: 4,000 images for 1,000 clients, 400 for
100) and the time spent moving clients in and out shown apart. Cases that cannot fit this
machine's memory are not run and say so.

Quick mode (``FSL_FAST_BENCH_QUICK=1``): 10 x 2 per round against 20 all active, 8 samples each,
two rounds.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from bench.common import QUICK, pick

ROUNDS = pick(3, 2)
BIG, PER_ROUND, SMALL = pick((1000, 50, 100), (20, 2, 10))
SAMPLES = pick(16, 8)

_RUN = """
import json, resource, sys, tempfile, time
from pathlib import Path
import torch
from fsl_fast.config import Config
from fsl_fast.runner import Run
kw, rounds = json.loads(sys.argv[1]), int(sys.argv[2])
run = Run(Config(**kw).resolved())
store = getattr(run.engine, "client_store", None)
tmp = None
if store is not None and store.mode == "disk":
    tmp = tempfile.TemporaryDirectory(prefix="fsl_fast_bench_store_")
    store.bind(Path(tmp.name))
secs = []
for _ in range(rounds):
    t0 = time.perf_counter()
    rec = run.step()
    secs.append((time.perf_counter() - t0, rec.get("seconds_eval", 0.0), rec.get("seconds_store", 0.0)))
print(json.dumps({"seconds": secs, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

MODELS = {"cnn": dict(model="cnn", shape="1x28x28"),
          "resnet18": dict(model="resnet18", aux="layer3", shape="3x32x32")}
SETUPS = {  # (clients, per round, store)
    "all-active": (SMALL, 0, "off"),
    "sampled-off": (BIG, PER_ROUND, "off"),
    "sampled-memory": (BIG, PER_ROUND, "memory"),
    "sampled-disk": (BIG, PER_ROUND, "disk"),
}
# engine state per client when every client stays in the engine (FSL-SAGE, fp32: model, gradient
# and Adam's two moments of the client and of the auxiliary): resnet18 + layer3 ~44.5 MB, so
# 1,000 clients need ~45 GB; a store kept in RAM grows to ~31 MB per client that has taken part
SKIP = {("resnet18", "sampled-off"): "every client in the engine needs ~45 GB for 1,000 resnet18 clients",
        ("resnet18", "sampled-memory"): "the parked state in RAM grows to ~31 GB once every client has taken part"}
RESULTS: dict = {}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("model", list(MODELS))
def test_scale_round(benchmark, model, setup):
    if not QUICK and (model, setup) in SKIP:
        pytest.skip(SKIP[model, setup])
    clients, per_round, store = SETUPS[setup]
    m = MODELS[model]
    kw = dict(algorithm="fsl_sage", model=m["model"], dataset=f"synthetic:{m['shape']}:{clients * SAMPLES}",
              clients=clients, clients_per_round=per_round, batch_size=SAMPLES, fused=True, threads=2,
              align_epochs=2, client_store=store)
    if "aux" in m:
        kw["aux"] = m["aux"]
    out = json.loads(subprocess.check_output([sys.executable, "-c", _RUN, json.dumps(kw), str(ROUNDS)],
                                             text=True).strip().splitlines()[-1])
    timed = out["seconds"][1:] or out["seconds"]
    per, ev, sw = (statistics.median(r[i] for r in timed) for i in range(3))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(clients=clients, per_round=per_round or clients, store=store,
                                seconds_per_round=per, seconds_eval=ev, seconds_store=sw,
                                peak_rss_mib=out["peak_mib"], rounds=out["seconds"])
    RESULTS[model, setup] = (clients, per_round or clients, store, per, ev, sw, out["peak_mib"])
    print(f"\n| {model} | {clients} | {per_round or clients} | {store} | {per:.2f} | {ev:.2f} | {sw:.2f} | "
          f"{out['peak_mib']:.0f} |")


def test_scale_table(benchmark):
    """The table of the cases above (run after them)."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print("\n| model | clients | per round | client store | s / round | of it: test evaluation | of it: "
          "moving clients in/out | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|")
    for (model, setup), (c, m, st, s, ev, sw, mib) in RESULTS.items():
        print(f"| {model} | {c} | {m} | {st} | {s:.2f} | {ev:.2f} | {sw:.2f} | {mib:.0f} |")
    for (model, setup), why in SKIP.items():
        if not QUICK and (model, setup) not in RESULTS:
            c, m, st = SETUPS[setup]
            print(f"| {model} | {c} | {m} | {st} | not run: {why} | | | |")
