"""fsl_fast: fast federated split learning (FSL-SAGE and its baselines)."""
from __future__ import annotations

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _bind_source_kernels() -> None:
    # In a source checkout the Triton kernels live in <root>/kernels and are installed as
    # fsl_fast.kernels. Bind the ones next to *this* package so that a checkout imported from its
    # own directory never picks up another tree's kernels through an editable-install finder.
    if "fsl_fast.kernels" in _sys.modules:
        return
    init = _Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file() or (_Path(__file__).resolve().parent / "kernels").is_dir():
        return
    spec = _ilu.spec_from_file_location(
        "fsl_fast.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    mod = _ilu.module_from_spec(spec)
    _sys.modules["fsl_fast.kernels"] = mod
    spec.loader.exec_module(mod)
    globals()["kernels"] = mod


_bind_source_kernels()
