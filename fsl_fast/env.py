"""``python -m fsl_fast.env``: versions, devices, and which backend serves each fused op, and why."""
from __future__ import annotations

import importlib
import platform

import torch


def _load_ops() -> None:
    # Importing an op module registers it; missing ones are reported, not fatal.
    for mod in ("quantize", "fedavg", "aux", "layers"):
        try:
            importlib.import_module(f"fsl_fast.ops.{mod}")
        except ImportError as e:
            print(f"  (op module fsl_fast.ops.{mod} not importable: {e})")


def main() -> None:
    from fsl_fast.ops import _backend as B

    _load_ops()
    print(f"python {platform.python_version()}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}")
    print(f"cuda available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    mod = B.extension()
    if mod is None:
        print(f"fsl_fast._C: unavailable: {B.extension_error()}")
    else:
        print(f"fsl_fast._C: {B.extension_origin()}, cuda kernels built: {mod.cuda_built()}, "
              f"OpenMP threads {mod.omp_max_threads()}")
    ok, err = B._triton_ok()
    print(f"triton: {'importable' if ok else 'unavailable: ' + str(err)}"
          + (" (interpreter mode)" if B.triton_interpret() else ""))
    print(f"{B.ENV_BACKEND}={__import__('os').environ.get(B.ENV_BACKEND, '(unset: auto)')}")
    print()
    print(f"{'op':<22} {'device':<6} {'backend':<10} why")
    for r in B.report():
        print(f"{r['op']:<22} {r['device']:<6} {str(r['backend']):<10} {r['why']}")


if __name__ == "__main__":
    main()
