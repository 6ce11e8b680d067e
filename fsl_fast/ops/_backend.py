"""Which implementation of a fused op runs: the ``FSL_FAST_BACKEND`` override, the fallback when a
backend cannot run, and the ``python -m fsl_fast.env`` report. Loads the extension module.

Every kernel is a torch.library op; each op module registers its entry points here
(``register``), one per backend:

- ``reference``: plain PyTorch, always available, the ground truth for tests;
- ``cpp`` / ``cuda``: the op ``torch.ops.fsl_fast.<op>`` of the extension module (``fsl_fast._C``,
  or ``fsl_fast._C_avx512`` on an AVX-512 CPU: fsl_fast/buildflags.py), whose C++/OpenMP or CUDA
  kernel torch's dispatcher picks by the tensors' device; the two names say which device the
  caller asks for (``cuda`` needs the CUDA kernels compiled in);
- ``triton``: the op ``torch.ops.fsl_fast_triton.<op>`` (fsl_fast/ops/triton_ops.py) running the
  Triton kernels of ``fsl_fast.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is for tests).

``resolve(op, device, backend)`` picks one. A backend named explicitly (argument, or the
environment variable ``FSL_FAST_BACKEND``) that cannot run raises ``BackendUnavailable`` carrying
the original error; the automatic choice falls back silently to the next backend and logs the
fallback once. ``python -m fsl_fast.env`` prints the table of choices.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("fsl_fast.ops")

BACKENDS = ("cuda", "triton", "cpp", "reference")
ENV_BACKEND = "FSL_FAST_BACKEND"
ENV_JIT = "FSL_FAST_JIT"  # "0" disables the JIT build of the C++ extension


class BackendUnavailable(RuntimeError):
    """A backend that was asked for explicitly cannot run here."""


# ---------------------------------------------------------------------------------------------
# The C++/CUDA extension: prebuilt fsl_fast._C, else a JIT build of csrc/ on first use.

_ext: dict = {"tried": False, "module": None, "error": None, "origin": None}


def _csrc_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "csrc"


def _jit_build():
    from torch.utils import cpp_extension as ce

    src = _csrc_dir()
    if not src.is_dir():
        raise RuntimeError(f"no prebuilt fsl_fast._C and no sources to JIT-build ({src} missing)")
    sources = sorted(str(p) for p in src.glob("*.cpp") if not p.name.endswith("_cuda.cpp"))
    build_dir = Path(
        os.environ.get("FSL_FAST_CACHE", Path.home() / ".cache" / "fsl_fast")
    ) / f"jit-torch{torch.__version__.replace('+', '_')}"
    build_dir.mkdir(parents=True, exist_ok=True)
    from fsl_fast import buildflags

    return ce.load(
        name="fsl_fast_C_jit",
        sources=sources,
        extra_cflags=buildflags.cxx(),
        extra_ldflags=buildflags.LINK,
        build_directory=str(build_dir),
        verbose=False,
    )


def _import_prebuilt():
    """(module, name) of the first build in ``buildflags.module_names()`` that imports; the last
    one's error when none does."""
    from fsl_fast import buildflags

    *better, last = buildflags.module_names()
    for name in better:
        try:
            return importlib.import_module(name), name
        except ImportError:
            pass
    return importlib.import_module(last), last


def extension():
    """Return the loaded extension module, or None (the reason is in ``extension_error()``)."""
    if not _ext["tried"]:
        _ext["tried"] = True
        try:
            _ext["module"], name = _import_prebuilt()
            _ext["origin"] = f"prebuilt {name}"
        except Exception as prebuilt_err:  # noqa: BLE001 - any failure means "not usable"
            if os.environ.get(ENV_JIT, "1") == "0":
                _ext["error"] = f"prebuilt fsl_fast._C failed to import ({prebuilt_err}); JIT disabled"
            else:
                try:
                    _ext["module"] = _jit_build()
                    _ext["origin"] = "jit"
                    log.warning("fsl_fast._C not prebuilt (%s); JIT-built it", prebuilt_err)
                except Exception as jit_err:  # noqa: BLE001
                    _ext["error"] = (
                        f"prebuilt fsl_fast._C failed to import ({prebuilt_err}); "
                        f"JIT build failed ({type(jit_err).__name__}: {str(jit_err).strip()[-400:]})"
                    )
        if _ext["module"] is not None:
            from fsl_fast.ops import library

            library.register()  # fake kernels and autograd formulas of the ops
    return _ext["module"]


def extension_error() -> str | None:
    extension()
    return _ext["error"]


def extension_origin() -> str | None:
    extension()
    return _ext["origin"]


# ---------------------------------------------------------------------------------------------
# Triton

_triton: dict = {"tried": False, "ok": False, "error": None}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_ok() -> tuple[bool, str | None]:
    if not _triton["tried"]:
        _triton["tried"] = True
        try:
            importlib.import_module("triton")
            importlib.import_module("fsl_fast.kernels")
            _triton["ok"] = True
        except Exception as e:  # noqa: BLE001
            _triton["error"] = f"{type(e).__name__}: {e}"
    return _triton["ok"], _triton["error"]


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass
class OpSpec:
    name: str
    impls: dict[str, Callable] = field(default_factory=dict)


_OPS: dict[str, OpSpec] = {}
_fallback_logged: set = set()


def register(name: str, **impls: Callable) -> OpSpec:
    """Register implementations of op ``name`` by backend name (reference is mandatory)."""
    unknown = set(impls) - set(BACKENDS)
    if unknown:
        raise ValueError(f"register({name!r}): unknown backends {sorted(unknown)}")
    if "reference" not in impls:
        raise ValueError(f"register({name!r}): a reference implementation is required")
    spec = _OPS.setdefault(name, OpSpec(name))
    spec.impls.update(impls)
    return spec


def registered_ops() -> list[str]:
    return sorted(_OPS)


def available(backend: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device`` here, and why (not)."""
    dev = torch.device(device)
    if backend == "reference":
        return True, "plain PyTorch"
    if backend == "cpp":
        if dev.type != "cpu":
            return False, f"the C++ kernels run on CPU tensors, not {dev.type}"
        mod = extension()
        if mod is None:
            return False, _ext["error"]
        return True, _ext["origin"]
    if backend == "cuda":
        if dev.type != "cuda":
            return False, f"the CUDA kernels run on CUDA tensors, not {dev.type}"
        mod = extension()
        if mod is None:
            return False, _ext["error"]
        if not mod.cuda_built():
            return False, "fsl_fast._C was built without CUDA (CPU torch or no nvcc at build time)"
        return True, f"{_ext['origin']} with CUDA"
    if backend == "triton":
        ok, err = triton_ok()
        if not ok:
            return False, f"triton unavailable ({err})"
        if dev.type == "cuda":
            return True, "triton on GPU"
        if dev.type == "cpu" and triton_interpret():
            return True, "triton interpreter (TRITON_INTERPRET=1)"
        return False, "triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
    return False, f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}"


def _auto_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("cuda", "triton", "reference")
    return ("cpp", "reference")


def resolve(name: str, device: torch.device | str, backend: str | None = None):
    """Return ``(backend_name, implementation)`` for op ``name`` on ``device``."""
    spec = _OPS.get(name)
    if spec is None:
        raise KeyError(f"unknown op {name!r}; registered: {', '.join(registered_ops())}")
    dev = torch.device(device)
    asked = backend or os.environ.get(ENV_BACKEND) or "auto"
    if asked != "auto":
        if asked not in BACKENDS:
            raise BackendUnavailable(
                f"{name}: unknown backend {asked!r} (choose from auto, {', '.join(BACKENDS)})"
            )
        if asked not in spec.impls:
            raise BackendUnavailable(f"{name}: no {asked} implementation of this op")
        ok, why = available(asked, dev)
        if not ok:
            src = "argument" if backend else ENV_BACKEND
            raise BackendUnavailable(f"{name}: backend {asked!r} (from {src}) unavailable on {dev}: {why}")
        return asked, spec.impls[asked]
    reasons = []
    for b in _auto_order(dev):
        if b not in spec.impls:
            reasons.append(f"{b}: not implemented")
            continue
        ok, why = available(b, dev)
        if ok:
            if reasons and (name, dev.type) not in _fallback_logged:
                _fallback_logged.add((name, dev.type))
                log.info("%s on %s: using %s (%s)", name, dev.type, b, "; ".join(reasons))
            return b, spec.impls[b]
        reasons.append(f"{b}: {why}")
    raise BackendUnavailable(f"{name}: nothing can run on {dev}: {'; '.join(reasons)}")


def report(devices: list[str] | None = None) -> list[dict]:
    """One row per (op, device): the backend chosen and why the faster ones were passed over."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name in registered_ops():
        spec = _OPS[name]
        for d in devices:
            dev = torch.device(d)
            notes = []
            chosen = None
            for b in _auto_order(dev):
                if b not in spec.impls:
                    notes.append(f"{b}: not implemented")
                    continue
                ok, why = available(b, dev)
                if ok and chosen is None:
                    chosen = b
                    notes.append(f"{b}: {why}")
                    break
                notes.append(f"{b}: {why}")
            rows.append({"op": name, "device": d, "backend": chosen, "why": "; ".join(notes)})
    return rows
