"""Simulated wall clock (``--client-profile``): how long each round would take on a population of
devices, from what the algorithm actually did that round.

The algorithm records, per participant, the sequence of its steps (``RoundTrace``): local
computation (FLOPs), messages to the server, requests that wait for the server's answer. A
small discrete-event simulation replays them:

- every client is one device with its own compute speed (FLOP/s), uplink and downlink bandwidth
  (bytes/s) and one-way latency (s), drawn once per client from the profile (seeded);
- a client's messages leave one after another over its uplink; a message arrives ``latency +
  bytes / uplink`` after it leaves;
- the server is one device that handles requests one at a time, in arrival order, at
  ``server_flops``; a blocking request (SplitFed's per-iteration exchange, FSL-SAGE's
  alignment) resumes its client ``latency + bytes / downlink`` after the server finishes it,
  a non-blocking one (CSE-FSL's and FSL-SAGE's periodic uploads) does not stop its client;
- the round ends when every surviving participant's model has reached the server and the server
  has drained its queue, plus the slowest participant's download of the averaged models.

FLOPs per sample of each kind of step are counted once per run with
``torch.utils.flop_counter.FlopCounterMode`` on the run's own models (convolutions and matrix
products; elementwise work is not counted), so the clock follows the model, the batch sizes and
the cut. What is simulated is the message pattern and the compute on each side; everything else
(framework overheads, stragglers beyond the drawn speeds, packet loss) is not.
"""
from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fsl_fast.config import ConfigError

# Named profiles. Numbers are assumptions for studies, not measurements of any device.
PRESETS = {
    # every client the same: a laptop-class CPU at 100 GFLOP/s on a 100 Mbit/s link, 10 ms away;
    # the server an accelerator at 100 TFLOP/s
    "uniform": {"server_flops": 1e14,
                "clients": {"flops": 1e11, "up_bytes_per_s": 12.5e6, "down_bytes_per_s": 12.5e6,
                            "latency_s": 0.01}},
    # phones on cellular links: speeds and bandwidths log-normal around 20 GFLOP/s, 10 Mbit/s up
    # and 50 Mbit/s down (sigma 0.7, so the slowest tenth is ~2.5x below the median), 20-100 ms
    "mobile": {"server_flops": 1e14,
               "clients": {"flops": {"lognormal": {"median": 2e10, "sigma": 0.7}},
                           "up_bytes_per_s": {"lognormal": {"median": 1.25e6, "sigma": 0.7}},
                           "down_bytes_per_s": {"lognormal": {"median": 6.25e6, "sigma": 0.7}},
                           "latency_s": {"uniform": [0.02, 0.1]}}},
}
FIELDS = ("flops", "up_bytes_per_s", "down_bytes_per_s", "latency_s")


def _draw(spec, k: int, gen: torch.Generator, where: str) -> float:
    """One client's value of one field: a number, a per-client list, {"uniform": [a, b]} or
    {"lognormal": {"median": m, "sigma": s}}."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        v = float(spec)
    elif isinstance(spec, list):
        if not spec:
            raise ConfigError(f"--client-profile: {where} is an empty list")
        v = float(spec[k % len(spec)])
    elif isinstance(spec, dict) and set(spec) == {"uniform"}:
        a, b = (float(x) for x in spec["uniform"])
        v = a + (b - a) * float(torch.rand((), generator=gen, dtype=torch.float64))
    elif isinstance(spec, dict) and set(spec) == {"lognormal"}:
        p = spec["lognormal"]
        z = float(torch.randn((), generator=gen, dtype=torch.float64))
        v = float(p["median"]) * math.exp(float(p["sigma"]) * z)
    else:
        raise ConfigError(f"--client-profile: {where} must be a number, a list, {{\"uniform\": [a, b]}} "
                          f"or {{\"lognormal\": {{\"median\": m, \"sigma\": s}}}}, got {spec!r}")
    if not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"--client-profile: {where} gave {v!r} for client {k}")
    return v


@dataclass
class Device:
    flops: float
    up: float
    down: float
    latency: float


class Profile:
    """The devices of a run: ``server_flops`` and one Device per client (seeded by run seed and
    client id, so every engine, resume and partial participation see the same devices)."""

    def __init__(self, spec: dict, num_clients: int, seed: int, name: str = "profile"):
        if not isinstance(spec, dict) or "clients" not in spec or "server_flops" not in spec:
            raise ConfigError(f"--client-profile: {name} needs 'server_flops' and 'clients'")
        unknown = set(spec["clients"]) - set(FIELDS)
        missing = set(FIELDS) - set(spec["clients"])
        if unknown or missing:
            raise ConfigError(f"--client-profile: {name}: clients needs exactly {', '.join(FIELDS)}"
                              + (f" (unknown: {sorted(unknown)})" if unknown else "")
                              + (f" (missing: {sorted(missing)})" if missing else ""))
        self.name = name
        self.server_flops = float(spec["server_flops"])
        if not self.server_flops > 0:
            raise ConfigError(f"--client-profile: {name}: server_flops must be positive")
        self.clients = []
        for k in range(num_clients):
            gen = torch.Generator().manual_seed((seed * 6_700_417 + 31 + k) % (2**63 - 1))
            vals = {f: _draw(spec["clients"][f], k, gen, f"clients.{f}") for f in FIELDS}
            for f in ("flops", "up_bytes_per_s", "down_bytes_per_s"):
                if not vals[f] > 0:
                    raise ConfigError(f"--client-profile: {name}: clients.{f} must be positive (client {k})")
            self.clients.append(Device(vals["flops"], vals["up_bytes_per_s"], vals["down_bytes_per_s"],
                                       vals["latency_s"]))

    @classmethod
    def load(cls, what: str, num_clients: int, seed: int) -> "Profile":
        if what in PRESETS:
            return cls(PRESETS[what], num_clients, seed, what)
        p = Path(what)
        if not p.is_file():
            raise ConfigError(f"--client-profile: {what!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        try:
            spec = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--client-profile: cannot read {p}: {str(e).splitlines()[0][:160]}") from None
        return cls(spec, num_clients, seed, str(p))


# ----------------------------------------------------------------------------------------------
# FLOPs per sample of each kind of step


def _flops(fn) -> float:
    import warnings

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backward(create_graph=True)'s reference-cycle notice
        fn()
    return float(fc.get_total_flops())


def step_flops(split, in_shape, align_batch: int = 4) -> dict[str, float]:
    """FLOPs per sample: client forward / backward, server forward+backward (with the input
    gradient), auxiliary forward+backward, the whole model's step (FedAvg) and one alignment
    step of the auxiliary (double backward) per buffer row, from a batch of 2 samples (4 rows for
    alignment) through deep copies of the models in train mode."""
    import copy

    import torch.nn.functional as F

    c, s, a = (copy.deepcopy(m).train() for m in (split.client, split.server, split.aux))
    n = 2
    x = torch.randn(n, *in_shape)
    y = torch.zeros(n, dtype=torch.long)
    out = {}
    out["client_fwd"] = _flops(lambda: c(x)) / n
    z = c(x)
    out["client_bwd"] = _flops(lambda: z.backward(torch.ones_like(z))) / n
    zd = z.detach()

    def server():
        zr = zd.clone().requires_grad_(True)
        F.cross_entropy(s(zr), y).backward()
    out["server"] = _flops(server) / n

    def aux():
        zr = zd.clone().requires_grad_(True)
        F.cross_entropy(a(zr), y).backward()
    out["aux"] = _flops(aux) / n
    out["full"] = out["client_fwd"] + out["client_bwd"] + out["server"]
    zb = torch.randn(align_batch, *zd.shape[1:])
    yb = torch.zeros(align_batch, dtype=torch.long)

    def align():  # (.backward with inputs=: the counter's module hooks refuse autograd.grad)
        zr = zb.clone().requires_grad_(True)
        F.cross_entropy(a(zr), yb, reduction="sum").backward(create_graph=True, inputs=[zr])
        F.mse_loss(zr.grad, torch.zeros_like(zr), reduction="sum").backward(inputs=list(a.parameters()))
    out["align_row"] = _flops(align) / align_batch
    return out


# ----------------------------------------------------------------------------------------------
# One round's trace and its simulation


class RoundTrace:
    """Per client, the ordered steps of one round: ("compute", flops), ("send", bytes,
    server_flops) (non-blocking), ("request", bytes_up, server_flops, bytes_down) (blocking);
    ``finish`` marks a client whose models went up at the end (survivors) and ``download`` the
    bytes each of them receives after the aggregation."""

    def __init__(self):
        self.steps: dict[int, list] = {}
        self.finished: dict[int, float] = {}  # client -> bytes of its model upload
        self.download = 0

    def compute(self, k: int, flops: float) -> None:
        self.steps.setdefault(k, []).append(("compute", float(flops)))

    def send(self, k: int, nbytes: float, server_flops: float = 0.0) -> None:
        self.steps.setdefault(k, []).append(("send", float(nbytes), float(server_flops)))

    def request(self, k: int, up: float, server_flops: float, down: float) -> None:
        self.steps.setdefault(k, []).append(("request", float(up), float(server_flops), float(down)))

    def finish(self, k: int, model_bytes: float, download_bytes: float) -> None:
        self.steps.setdefault(k, [])
        self.finished[k] = float(model_bytes)
        self.download = float(download_bytes)


def simulate(trace: RoundTrace, profile: Profile) -> float:
    """Seconds from the round's start (every participant holds the models) to every survivor
    holding the averaged models."""
    S = profile.server_flops
    t = {k: 0.0 for k in trace.steps}
    link = {k: 0.0 for k in trace.steps}
    pc = {k: 0 for k in trace.steps}
    events: list = []  # (time, seq, kind, client, payload)
    seq = 0

    def push(time, kind, k, payload=None):
        nonlocal seq
        heapq.heappush(events, (time, seq, kind, k, payload))
        seq += 1

    def transmit(k, nbytes, now):
        d = profile.clients[k]
        start = max(now, link[k])
        link[k] = start + nbytes / d.up
        return link[k] + d.latency

    arrived_last = 0.0
    server_free = 0.0

    def run_client(k, now):
        nonlocal arrived_last
        steps = trace.steps[k]
        d = profile.clients[k]
        while pc[k] < len(steps):
            st = steps[pc[k]]
            pc[k] += 1
            if st[0] == "compute":
                now += st[1] / d.flops
            elif st[0] == "send":
                arr = transmit(k, st[1], now)
                arrived_last = max(arrived_last, arr)
                push(arr, "arrive", k, (st[2], None))
            else:  # request: wait for the answer
                arr = transmit(k, st[1], now)
                arrived_last = max(arrived_last, arr)
                push(arr, "arrive", k, (st[2], st[3]))
                t[k] = now
                return
        t[k] = now
        if k in trace.finished:
            arr = transmit(k, trace.finished[k], now)
            arrived_last = max(arrived_last, arr)

    for k in sorted(trace.steps):
        push(0.0, "ready", k)
    while events:
        time, _, kind, k, payload = heapq.heappop(events)
        if kind == "ready":
            run_client(k, time)
        elif kind == "arrive":  # the server takes requests in arrival order
            flops, reply = payload
            start = max(time, server_free)
            server_free = start + flops / S
            if reply is not None:
                d = profile.clients[k]
                push(server_free + d.latency + reply / d.down, "ready", k)
    end = max([arrived_last, server_free] + [t[k] for k in trace.finished])
    if trace.finished:
        end += max(profile.clients[k].latency + trace.download / profile.clients[k].down
                   for k in trace.finished)
    return end
