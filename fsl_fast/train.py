"""``python -m fsl_fast.train``: train one algorithm; writes a run directory (see README)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fsl_fast.config import (ALGORITHMS, DATASETS, DIST_FEDAVG, OPTIMIZERS, PARTITIONS, PRECISIONS, QUANTIZE, SCHEDULES,
                             Config, ConfigError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = _Parser(prog="python -m fsl_fast.train", description=__doc__)
    a = p.add_argument
    a("--algorithm", choices=ALGORITHMS, default=None, help=f"default {d.algorithm}")
    a("--model", default=None, help="cnn | simple_conv | resnet18 | auto (resnet18 for CIFAR, cnn for "
      "mnist5k) | package.module:factory (your own: factory(in_shape, num_classes) -> (client, server, aux))")
    a("--aux", default=None, help="auxiliary model: default | linear | layer3 (resnet18); for a factory "
      "model, any name other than default is passed to it as aux=NAME")
    a("--dataset", default=None, help=f"{' | '.join(DATASETS)} | synthetic:CxHxW (default {d.dataset}, embedded)")
    a("--data-dir", default=None, help="folder holding CIFAR python-pickle folders or .tar.gz")
    a("--partition", choices=PARTITIONS, default=None,
      help="iid (default) | dirichlet | shards (the authors' noniid: sorted by label, --shards-per-client each)")
    a("--shards-per-client", type=int, default=None, help="shards per client with --partition shards (2)")
    a("--alpha", type=float, default=None, help="Dirichlet concentration (with --partition dirichlet)")
    a("--clients", type=int, default=None, help=f"default {d.clients}")
    a("--clients-per-round", type=int, default=None,
      help="sample M clients per round, uniformly without replacement, seeded (0 = all, the default)")
    a("--client-store", choices=("off", "memory", "disk"), default=None,
      help="with --fused and --clients-per-round M: keep only the M clients of the round in the engine "
           "and park the others' state (optimizer moments, FSL-SAGE auxiliaries and buffers) in memory "
           "or in files under OUT/client_store (lossless; off = every client in the engine, the default)")
    a("--dropout-prob", type=float, default=None,
      help="each participant fails during a round with this probability, after a uniformly drawn "
           "number of its local iterations; its update is discarded (seeded; default 0)")
    a("--client-profile", default=None, metavar="PRESET|FILE",
      help="simulated clock: per-client compute speed, bandwidths and latency from a preset (uniform, "
           "mobile) or a JSON file; metrics.jsonl gets each round's simulated seconds (docs/clock.md)")
    a("--rounds", type=int, default=None, help=f"default {d.rounds}")
    a("--local-epochs", type=int, default=None, help=f"default {d.local_epochs}")
    a("--batch-size", type=int, default=None, help="default: 256 for CIFAR, 32 for mnist5k")
    a("--server-update-interval", type=int, default=None, help="q: upload every q-th iteration (5)")
    a("--align-interval", type=int, default=None, help="l: align every l rounds (10)")
    a("--align-epochs", type=int, default=None, help="default 100")
    a("--align-batch-size", type=int, default=None, help="default 1000")
    a("--buffer-size", type=int, default=None, help="alignment buffer rows per client (1000)")
    a("--lr", type=float, default=None, help="client and server learning rate (1e-3)")
    a("--weight-decay", type=float, default=None, help="client and server L2 weight decay (1e-4)")
    a("--optimizer", choices=OPTIMIZERS, default=None,
      help="client and server optimizer: adam (default, the paper) | sgd; the auxiliary keeps Adam")
    a("--momentum", type=float, default=None, help="SGD momentum (0)")
    a("--nesterov", action="store_true", default=None, help="SGD with Nesterov momentum")
    a("--lr-schedule", default=None, metavar="SPEC",
      help="per-round learning-rate schedule of client and server: constant (default) | cosine[:T] (to 0 "
           "at round T, default T = --rounds) | multistep:M1,M2,...:GAMMA (times GAMMA from each "
           "milestone round on)")
    a("--aux-lr", type=float, default=None, help="auxiliary Adam learning rate (1e-3)")
    a("--warm-start", default=None, metavar="RUN",
      help="start from the models of another run (its directory or checkpoint file): client, server "
           "and, when that run kept one per client of this run, the auxiliaries; optimizers, "
           "schedule and round counter start fresh")
    a("--seed", type=int, default=None, help="default 0")
    a("--schedule", choices=SCHEDULES, default=None, help="sequential (authors' code, default) | parallel")
    a("--comm-budget-gib", type=float, default=None, help="stop when the paper-convention total reaches this")
    a("--quantize", choices=QUANTIZE, default=None, help="uplink smashed-data compression (none)")
    a("--quantize-group-size", type=int, default=None, help="0 = per-row scales for int8; int4 default 32")
    a("--stochastic-rounding", action="store_true", default=None, help="stochastic rounding in --quantize")
    a("--fused", action="store_true", default=None, help="use the fused engine (fast path)")
    a("--client-batching", choices=("auto", "loop", "vmap"), default=None,
      help="fused engine: run clients one by one (loop) or as one vmapped computation (auto: vmap on CUDA)")
    a("--precision", choices=PRECISIONS, default=None,
      help="fp32 (default) | bf16: torch convolutions and matrix products of client, server and "
           "auxiliary models in bfloat16 (AMX / tensor cores); weights, optimizer states, FedAvg, "
           "the loss, the alignment targets and the wire stay fp32")
    a("--log-estimate-quality", action="store_true", default=None,
      help="FSL-SAGE: before and after each alignment, log per aligned client the cosine between the "
           "auxiliary's gradient estimate and the true cut-layer gradient on its buffer, and their "
           "norm ratio (metrics.jsonl estimate_quality; costs a server pass)")
    a("--eval-every", type=int, default=None, metavar="N",
      help="evaluate on the test set every N rounds (1), and always in the last round and the round "
           "that reaches --comm-budget-gib; other rounds log test_accuracy null")
    a("--tensorboard", action="store_true", default=None,
      help="also write each round's scalars (metrics.jsonl's numbers) as TensorBoard events into "
           "OUT/tensorboard (needs the tensorboard package: pip install tensorboard)")
    a("--device", default=None, help="cpu (default) | cuda[:N]")
    a("--threads", type=int, default=None, help="torch intra-op threads (0 = torch default)")
    a("--distributed", action="store_true", default=None,
      help="distributed runtime: launch with torchrun; rank 0 = server, ranks 1.. host the clients")
    a("--dist-timeout", type=float, default=None, help="seconds a rank waits for a peer before failing (300)")
    a("--dist-fedavg", choices=DIST_FEDAVG, default=None, help="ordered (default: running sum passed "
      "through the client ranks in client order, bit-equal to the in-process run) | allreduce (one all-reduce)")
    a("--config", default=None, metavar="FILE",
      help="options from a file: TOML (.toml), JSON (.json: a run's config.json reruns that run) or "
           "YAML (.yaml/.yml, needs PyYAML), flat keys named as the options with underscores "
           "(clients_per_round = 50); options given on the command line win")
    a("--out", default=None, help="run directory (default runs/<algorithm>-<time>)")
    a("--resume", default=None, metavar="DIR", help="continue the run in DIR (its config; --rounds and "
      "--comm-budget-gib may be raised)")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


# Options --resume may change: these leave the results as an uninterrupted run's ...
RESUME_OVERRIDABLE = ("rounds", "comm_budget_gib", "threads", "device", "dist_timeout", "log_estimate_quality",
                      "eval_every", "tensorboard")
# ... and these change training from the resumed round on (e.g. a lower --lr after a divergence);
# config.json takes the new values and results.json lists the change.
RESUME_CHANGEABLE = ("lr", "weight_decay", "aux_lr")


def read_config_file(path: str) -> dict:
    """Flat {option: value} from a TOML, JSON or YAML file (keys as the Config fields; a run's
    config.json also carries ``format_version``, checked). ConfigError (exit 2) for a file that
    cannot be read, an unknown key or a key that is not a training option."""
    import dataclasses

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: {path} not found")
    suffix = p.suffix.lower()
    try:
        text = p.read_text()
        if suffix == ".toml":
            import tomllib

            d = tomllib.loads(text)
        elif suffix == ".json":
            d = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"--config: {path} is YAML, which needs PyYAML (pip install pyyaml); "
                                  "or use TOML") from None
            d = yaml.safe_load(text)
        else:
            raise ConfigError(f"--config: {path}: expected a .toml, .json, .yaml or .yml file")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse error: one line
        raise ConfigError(f"--config: cannot read {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config: {path} must hold a table of option = value")
    if "format_version" in d:
        from fsl_fast.faults import check_version

        check_version("run configuration", d.pop("format_version"), path)
    fields = {f.name for f in dataclasses.fields(Config)}
    for k in d:
        if k not in fields:
            hint = f" (did you mean {k.replace('-', '_')}?)" if k.replace("-", "_") in fields else ""
            raise ConfigError(f"--config: {path}: unknown option {k!r}{hint}")
    return d


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fsl_fast.data import DataError
    from fsl_fast.faults import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_IO, Divergence, RunIOError
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("out", "resume", "no_progress", "config")}
    changes = {}
    out = None
    try:
        if args.config:
            if args.resume:
                raise ConfigError("--config: not with --resume (a resumed run keeps its own config.json)")
            given = {**read_config_file(args.config), **given}
        if args.resume:
            out = Path(args.resume)
            cfg_file = out / "config.json"
            if not cfg_file.is_file():
                raise ConfigError(f"--resume: {cfg_file} not found")
            try:
                stored = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"--resume: cannot read {cfg_file}: {e}") from None
            cfg = Config.from_file_dict(stored, where=str(cfg_file))
            allowed = RESUME_OVERRIDABLE + RESUME_CHANGEABLE
            bad = sorted(k for k in given if k not in allowed and given[k] != getattr(cfg, k))
            if bad:
                raise ConfigError(f"--resume: cannot change {', '.join(bad)} of an existing run "
                                  f"(may change: {', '.join('--' + k.replace('_', '-') for k in allowed)})")
            changes = {k: (getattr(cfg, k), given[k]) for k in RESUME_CHANGEABLE
                       if k in given and given[k] != getattr(cfg, k)}
            for k in allowed:
                if k in given:
                    setattr(cfg, k, given[k])
            cfg = cfg.resolved()
        else:
            cfg = Config(**given).resolved()
            out = Path(args.out) if args.out else Path("runs") / f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
            if (out / "metrics.jsonl").exists():
                raise ConfigError(f"--out: {out} already holds a run; use --resume {out} or another --out")
        if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
            raise ConfigError(f"--data-dir: {cfg.data_dir} is not a directory")
        if cfg.distributed:  # one process per rank under torchrun; results on rank 0 only
            from fsl_fast.distributed import train_distributed as train
        else:
            from fsl_fast.runner import train

        results = train(cfg, out, resume=bool(args.resume), progress=not args.no_progress, changes=changes)
        if cfg.distributed:
            _DIST_DONE.append(True)
        if results is None:
            return 0
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Divergence as e:
        from fsl_fast.runner import CHECKPOINT

        kept = ("the last completed round's checkpoint is intact" if (out / CHECKPOINT).is_file()
                else "no round was completed")
        print(f"error: {e}; {kept}: continue with --resume {out} and e.g. a lower --lr",
              file=sys.stderr)
        return EXIT_DIVERGED
    except RunIOError as e:
        from fsl_fast.runner import CHECKPOINT

        kept = ("the checkpoint in it holds the last completed round" if (out / CHECKPOINT).is_file()
                else "no round was checkpointed")
        print(f"error: {e}; {kept}: continue with --resume {out}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print("interrupted: the last completed round is checkpointed; continue with --resume", file=sys.stderr)
        return 130
    print(json.dumps({"out": str(out), **results}))
    return 0


# Set once a distributed run has finished cleanly (process group destroyed, checkpoint committed).
_DIST_DONE: list = []

if __name__ == "__main__":
    rc = main()
    if _DIST_DONE:
        # Skip interpreter finalization in torchrun workers: a C++ thread of torch.distributed still
        # alive at that point occasionally aborted a finished rank ("terminate called without an
        # active exception", seen on the loaded 2-core machine). Everything is written already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
