"""Communication dry run: the real algorithms' round loop over an engine that computes nothing.

``python -m fsl_fast.comm`` prints the bytes per round that the ledger counts for each algorithm
in a given setting without training (tensors live on PyTorch's ``meta`` device). With the
defaults it is the paper's CIFAR-10 / ResNet-18 setting (10 clients x 5,000 samples, B=256, q=5,
l=10), whose per-round totals equal ALGORITHM.md §6 to the byte.
"""
from __future__ import annotations

import argparse
import math

import torch

from fsl_fast.algorithms import ALGORITHM_CLASSES
from fsl_fast.config import ALGORITHMS, Config
from fsl_fast.engines.base import Engine
from fsl_fast.ledger import GIB, Ledger
from fsl_fast.transport.local import InProcessChannel


class _MetaLoader:
    def __init__(self, n: int, batch_size: int, in_shape):
        self.n, self.b, self.in_shape = n, batch_size, tuple(in_shape)

    def __len__(self):
        return math.ceil(self.n / self.b)

    def __iter__(self):
        for i in range(0, self.n, self.b):
            m = min(self.b, self.n - i)
            yield (torch.empty((m, *self.in_shape), device="meta"),
                   torch.empty((m,), dtype=torch.int64, device="meta"))


class CountingEngine(Engine):
    """Engine with the real message shapes and model sizes and no arithmetic."""

    def __init__(self, cfg, split, num_clients, algorithm_cls):
        super().__init__(cfg, split, num_clients, algorithm_cls, "meta")
        self.cut = tuple(split.cut_shape)

    def client_forward(self, ks, xs):
        return [torch.empty((x.shape[0], *self.cut), device="meta") for x in xs]

    def client_backward(self, ks, zs, grads):
        pass

    def server_step(self, k, z, y, want_grad=False):
        return torch.empty_like(z) if want_grad else None

    def aux_estimate(self, ks, zs, ys):
        return [torch.empty_like(z) for z in zs]

    aux_local_step = aux_estimate

    def full_step(self, ks, xs, ys):
        pass

    def align(self, ks, data):
        pass

    def aggregate(self, weights, clients=True, aux=False, servers=False):
        pass


def dry_run(algorithm: str, model: str = "resnet18", aux: str = "default", in_shape=(3, 32, 32),
            num_classes: int = 10, clients: int = 10, samples_per_client: int = 5000,
            batch_size: int = 256, rounds: int = 11, **cfg_kw) -> list[dict]:
    from fsl_fast.models import build_split_model

    cfg = Config(algorithm=algorithm, model=model, aux=aux, clients=clients, batch_size=batch_size,
                 rounds=rounds, dataset="cifar10", **cfg_kw).resolved()
    with torch.device("meta"):
        split = build_split_model(model, tuple(in_shape), num_classes, aux=aux)
    cls = ALGORITHM_CLASSES[algorithm]
    engine = CountingEngine(cfg, split, clients, cls)
    loaders = [_MetaLoader(samples_per_client, batch_size, in_shape) for _ in range(clients)]
    ledger = Ledger()
    algo = cls(cfg, engine, loaders, [1.0 / clients] * clients, InProcessChannel(cfg, ledger, engine))
    algo.guard.enabled = False  # meta tensors hold no values to check
    algo.buffers = []  # nothing to buffer on the meta device
    if cls.uses_aux:
        algo.buffers = [_NullBuffer() for _ in range(clients)]
    out = []
    for t in range(rounds):
        if t == 0:
            algo.initial_broadcast()
        algo.run_round(t)
        rec = ledger.end_round()
        rec["round"] = t
        out.append(rec)
    return out


class _NullBuffer:
    def append(self, payload, y):
        pass

    def tensors(self, decode):
        return None, None


def rounds_to_budget(recs: list[dict], budget_bytes: float, align_interval: int) -> int:
    """Rounds until the paper-convention total reaches ``budget_bytes``, extending the dry run's
    per-round pattern (alignment every ``align_interval`` rounds) beyond the rounds it ran."""
    if len(recs) < 2:
        raise ValueError("rounds_to_budget: the dry run needs at least two rounds")
    plain = recs[1]["round_bytes_paper"]
    extra = recs[0]["round_bytes_paper"] - plain
    total, t = 0, 0
    while total < budget_bytes:
        total += plain + (extra if t % align_interval == 0 else 0)
        t += 1
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsl_fast.comm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", default="all", choices=("all",) + ALGORITHMS)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--aux", default="default")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--clients-per-round", type=int, default=0, help="M participants per round (0: all)")
    p.add_argument("--samples-per-client", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--budget-gib", type=float, default=None, help="also print the round that reaches it")
    p.add_argument("--uplink", default="none", help="smashed-data codec, as in fsl_fast.train (e.g. topk:0.05,int4); "
                   "top-k positions are counted at their largest size (bitmap or widest gaps)")
    p.add_argument("--downlink", default="none", help="SplitFed gradient codec, as in fsl_fast.train")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"), help="the same as --uplink int8|int4")
    a = p.parse_args(argv)
    from fsl_fast.config import ConfigError

    codecs = {"uplink": a.uplink, "quantize": a.quantize}
    try:
        Config(uplink=a.uplink, quantize=a.quantize).resolved()
        if a.downlink != "none":
            Config(algorithm="splitfed_v2", downlink=a.downlink).resolved()
    except ConfigError as e:
        p.error(str(e))
    algos = ALGORITHMS if a.algorithm == "all" else (a.algorithm,)
    budget_col = f" rounds to {a.budget_gib:g} GiB |" if a.budget_gib else ""
    print(f"| algorithm | bytes/round (paper) | alignment round | round 0 total incl. broadcast+labels | "
          f"GiB after {a.rounds} rounds |{budget_col} smashed data up / round | its components |")
    print("|---|---|---|---|---|" + ("---|" if a.budget_gib else "") + "---|---|")
    for algo in algos:
        down = {"downlink": a.downlink} if algo.startswith("splitfed") else {}
        recs = dry_run(algo, model=a.model, aux=a.aux, clients=a.clients,
                       samples_per_client=a.samples_per_client, batch_size=a.batch_size,
                       num_classes=a.num_classes, rounds=a.rounds, clients_per_round=a.clients_per_round,
                       **codecs, **down)
        plain = recs[1]["round_bytes_paper"] if len(recs) > 1 else recs[0]["round_bytes_paper"]
        extra = recs[0]["round_bytes_paper"] - plain
        row = (f"| {algo} | {plain:,} | {'+' + format(extra, ',') if extra else '-'} | "
               f"{recs[0]['round_bytes']:,} | {recs[-1]['comm_bytes_paper'] / GIB:.3f} |")
        if a.budget_gib:
            row += f" {rounds_to_budget(recs, a.budget_gib * GIB, Config().align_interval)} |"
        last = recs[-1]
        parts = ", ".join(f"{k[len('bytes_up_smashed_'):]} {v:,}" for k, v in last.items()
                          if k.startswith("bytes_up_smashed_"))
        row += f" {last['bytes_up_smashed']:,} | {parts or '-'} |"
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
