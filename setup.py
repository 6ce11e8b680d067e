"""Build script: the extension module fsl_fast._C, and by default also fsl_fast._C_avx512.

The CPU part (csrc/*.cpp except *_cuda.cpp, OpenMP) is always built when torch is importable, once
per target of fsl_fast/buildflags.py (by default a portable x86-64-v2 build and an AVX-512 one;
FSL_FAST_MARCH=native builds one module for this machine).
The CUDA part (csrc/*.cu kernels + csrc/*_cuda.cpp bindings) is added when torch is a CUDA build
and a CUDA toolkit is found (or FSL_FAST_CUDA=1 forces it; FSL_FAST_CUDA=0 disables it).
FSL_FAST_NO_EXT=1 skips the extension entirely (pure-Python install; ops use the references).
"""
import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("FSL_FAST_NO_EXT") == "1":
        return [], {}
    import importlib.util

    import torch
    from torch.utils import cpp_extension as ce

    spec = importlib.util.spec_from_file_location("fsl_fast_buildflags", os.path.join("fsl_fast", "buildflags.py"))
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    cpu_src = sorted(s for s in glob.glob("csrc/*.cpp") if not s.endswith("_cuda.cpp"))
    want_cuda = os.environ.get("FSL_FAST_CUDA")
    has_cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None
    cuda = want_cuda == "1" or (want_cuda is None and has_cuda)
    cu_src = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*_cuda.cpp"))
    exts = []
    variants = flags.variants()
    for suffix, target in variants:
        cxx = flags.cxx(target)
        if cuda:  # every module carries the CUDA kernels: a process loads one of them
            exts.append(ce.CUDAExtension(
                f"fsl_fast._C{suffix}",
                cpu_src + cu_src,
                define_macros=[("FSL_FAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": flags.NVCC},
                extra_link_args=flags.LINK,
            ))
        else:
            exts.append(ce.CppExtension(
                f"fsl_fast._C{suffix}", cpu_src, extra_compile_args={"cxx": cxx}, extra_link_args=flags.LINK
            ))
    if len(variants) == 1:  # a module of an earlier default build would shadow this one
        for stale in glob.glob(os.path.join("fsl_fast", "_C_avx512*.so")):
            os.remove(stale)
    return exts, {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["fsl_fast", "fsl_fast.ops", "fsl_fast.engines", "fsl_fast.engines.executors", "fsl_fast.transport",
              "fsl_fast.distributed", "fsl_fast.kernels"],
    package_dir={"fsl_fast": "fsl_fast", "fsl_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
