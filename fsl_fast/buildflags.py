"""Compiler and linker flags of the C++/CUDA extension, defined once: setup.py (which loads this
file by path, before fsl_fast is importable) and the JIT build of fsl_fast.ops._backend read them.

The kernels choose their vector paths when compiled (AVX-512 where the target has it), so a build
is for the CPUs its ``-march`` allows. By default (``FSL_FAST_MARCH`` unset, on x86-64) the CPU
part is built twice from the same sources, each a complete extension module:

- ``fsl_fast._C``: ``-march=x86-64-v2``, runs on any x86-64 CPU of the last fifteen years;
- ``fsl_fast._C_avx512``: ``-march=x86-64-v4 -mprefer-vector-width=512`` (AVX-512 F, BW, CD,
  DQ, VL), loaded instead when the CPU has those extensions (:func:`module_names`).

So a default build runs wherever it is copied and is fast where AVX-512 is. ``FSL_FAST_MARCH``
opts out of the pair: one module ``fsl_fast._C`` for that ``-march`` (``native``: the building
machine's CPU, e.g. one with AVX2 but no AVX-512; empty: the compiler's default). Other
architectures build one module with the compiler's default target.
"""
from __future__ import annotations

import os
import platform

NVCC = ["-O3", "--use_fast_math", "-lineinfo"]
LINK = ["-fopenmp"]
BASE = ["-O3", "-fopenmp", "-fno-math-errno"]
PORTABLE = ["-march=x86-64-v2"]
AVX512 = ["-march=x86-64-v4", "-mprefer-vector-width=512"]
AVX512_CPU_FLAGS = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def variants() -> list[tuple[str, list[str]]]:
    """(module name suffix, target flags) of each CPU build."""
    march = os.environ.get("FSL_FAST_MARCH")
    if march is not None:
        return [("", [f"-march={march}"] if march else [])]
    if not _x86():
        return [("", [])]
    return [("", PORTABLE), ("_avx512", AVX512)]


def cxx(target: list[str] | None = None) -> list[str]:
    """C++ flags for a build with ``target`` flags (default: the build this CPU loads)."""
    return BASE + (local_target() if target is None else target)


def cpu_has_avx512() -> bool:
    """Whether this CPU has the AVX-512 extensions the ``_avx512`` build needs (Linux's
    /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return all(flag in have for flag in AVX512_CPU_FLAGS)
    except OSError:
        pass
    return False


def local_target() -> list[str]:
    """The target flags of the build this CPU uses (also those of a JIT build here)."""
    builds = dict(variants())
    if "_avx512" in builds and cpu_has_avx512():
        return builds["_avx512"]
    return builds[""]


def module_names() -> list[str]:
    """Extension modules to try, best first: ``FSL_FAST_EXT_MODULE`` alone when set (to check
    one build, e.g. ``fsl_fast._C`` on an AVX-512 machine), else the AVX-512 build where this CPU
    runs it, then the portable one."""
    forced = os.environ.get("FSL_FAST_EXT_MODULE")
    if forced:
        return [forced]
    return (["fsl_fast._C_avx512"] if _x86() and cpu_has_avx512() else []) + ["fsl_fast._C"]
