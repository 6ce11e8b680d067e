"""``python -m fsl_fast.env``: versions, devices, and which backend serves each fused op, and why.

``python -m fsl_fast.env --model NAME [--aux A] [--dataset D] [--precision P] [--device DEV]
[--algorithm ALG]``: which executor the fused engine picks for each part of that model (client,
server, aux, alignment, FedAvg's full step) under each algorithm, and why the ones before it did
not apply. NAME may be a built-in model or ``package.module:factory``.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch


def _load_ops() -> None:
    # Importing an op module registers it; missing ones are reported, not fatal.
    for mod in ("quantize", "fedavg", "aux", "layers"):
        try:
            importlib.import_module(f"fsl_fast.ops.{mod}")
        except ImportError as e:
            print(f"  (op module fsl_fast.ops.{mod} not importable: {e})")


def executor_report(model: str, aux: str = "default", dataset: str | None = None,
                    precision: str = "fp32", device: str = "cpu", algorithms=None, clients: int = 2) -> list[str]:
    """Lines describing the fused engine's executor choices for ``model`` (see module doc)."""
    import torch

    from fsl_fast.algorithms import ALGORITHM_CLASSES
    from fsl_fast.config import ALGORITHMS, Config, ConfigError
    from fsl_fast.engines import build_engine
    from fsl_fast.models import build_split_model

    if dataset is None:
        dataset = "mnist5k" if model == "cnn" else "cifar10"
    cfg = Config(model=model, aux=aux, dataset=dataset, precision=precision, device=device,
                 clients=clients, fused=True).resolved()
    if cfg.dataset.startswith("cifar"):  # the shapes, without needing the files
        in_shape, num_classes = (3, 32, 32), 100 if cfg.dataset == "cifar100" else 10
    else:
        from fsl_fast.data import load_dataset

        ds = load_dataset(cfg.dataset, None, seed=0)
        in_shape, num_classes = ds.in_shape, ds.num_classes
    try:
        split = build_split_model(cfg.model, in_shape, num_classes, aux=cfg.aux)
    except ValueError as e:
        raise ConfigError(f"--model/--aux: {e}") from None
    lines = [f"model {cfg.model} (aux {cfg.aux}), input {tuple(in_shape)}, {num_classes} classes, "
             f"precision {precision}, device {device}, torch threads {torch.get_num_threads()}"]
    for alg in algorithms or ALGORITHMS:
        c = Config(**{**cfg.to_dict(), "algorithm": alg})
        eng = build_engine(c, split, clients, ALGORITHM_CLASSES[alg], device)
        lines.append(f"{alg}:")
        for part, tried in eng.executor_candidates.items():
            chosen = eng.executors[part]["executor"]
            for name, ok, why in tried:
                if name == chosen:
                    lines.append(f"  {part:<10} {name:<24} {why}")
                    break
                lines.append(f"  {'':<10} (not {name}: {why})")
    return lines


def main(argv=None) -> None:
    from fsl_fast import ops as B

    p = argparse.ArgumentParser(prog="python -m fsl_fast.env", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="report the fused engine's executors for this model")
    p.add_argument("--aux", default="default")
    p.add_argument("--dataset", default=None, help="input shape and classes from this dataset "
                   "(default: mnist5k for cnn, cifar10 otherwise; synthetic:CxHxW works)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--algorithm", default=None, help="one algorithm (default: all five)")
    args = p.parse_args(argv)
    _load_ops()
    if args.model is not None:
        from fsl_fast.config import ConfigError

        try:
            lines = executor_report(args.model, args.aux, args.dataset, args.precision, args.device,
                                    [args.algorithm] if args.algorithm else None)
        except ConfigError as e:
            print(f"python -m fsl_fast.env: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print("\n".join(lines))
        return
    print(f"python {platform.python_version()}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}")
    print(f"cuda available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    mod = B.extension()
    if mod is None:
        print(f"extension fsl_fast._C: unavailable: {B.extension_error()}")
    else:
        print(f"extension: {B.extension_origin()}, cuda kernels built: {mod.cuda_built()}, "
              f"OpenMP threads {mod.omp_max_threads()}")
    ok, err = B.triton_ok()
    print(f"triton: {'importable' if ok else 'unavailable: ' + str(err)}"
          + (" (interpreter mode)" if B.triton_interpret() else ""))
    print(f"{B.ENV_BACKEND}={__import__('os').environ.get(B.ENV_BACKEND, '(unset: auto)')}")
    print()
    print(f"{'op':<22} {'device':<6} {'backend':<10} why")
    for r in B.report():
        print(f"{r['op']:<22} {r['device']:<6} {str(r['backend']):<10} {r['why']}")


if __name__ == "__main__":
    main()
