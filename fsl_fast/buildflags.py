"""Compiler and linker flags of the C++/CUDA extension, defined once: setup.py (which loads this
file by path, before fsl_fast is importable) and the JIT build of fsl_fast.ops._backend read them.

``FSL_FAST_MARCH`` picks the target CPU: ``native`` (the default: the machine that builds it, so
the kernels' AVX-512 paths are compiled in where the CPU has them) or any ``-march`` value, e.g.
``x86-64-v3`` for a build that must run on other machines; empty for the compiler's default.
The kernels choose their vector paths at compile time, so a build is for the CPUs its
``-march`` allows.
"""
from __future__ import annotations

import os

NVCC = ["-O3", "--use_fast_math", "-lineinfo"]
LINK = ["-fopenmp"]


def cxx() -> list[str]:
    march = os.environ.get("FSL_FAST_MARCH", "native")
    return ["-O3", "-fopenmp", "-fno-math-errno"] + ([f"-march={march}"] if march else [])
