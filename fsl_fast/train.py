"""``python -m fsl_fast.train``: train one algorithm; writes a run directory (see README)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fsl_fast.config import Config, ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from the Config fields (config.Config.cli_options: one source
    for every option's name, type, default, help and choices), plus the run-directory options."""
    p = _Parser(prog="python -m fsl_fast.train", description=__doc__)
    a = p.add_argument
    for _, flag, kw in Config.cli_options():
        a(flag, **kw)
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
                      "eval_every", "tensorboard", "tolerate_dropouts")
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
