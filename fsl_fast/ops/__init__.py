"""Fused ops: one contract each, a plain PyTorch reference, and C++ / CUDA / Triton kernels.

Dispatch lives in :mod:`fsl_fast.ops._backend`. Importing this package never fails because the
extension or triton is missing; asking explicitly for a missing backend does, at call time.
"""
from fsl_fast.ops._backend import (
    BACKENDS,
    ENV_BACKEND,
    BackendUnavailable,
    available,
    extension,
    extension_error,
    extension_origin,
    register,
    registered_ops,
    report,
    resolve,
    triton_interpret,
    triton_ok,
)

__all__ = ["BACKENDS", "ENV_BACKEND", "BackendUnavailable", "available", "extension", "extension_error",
           "extension_origin", "register", "registered_ops", "report", "resolve", "triton_interpret",
           "triton_ok"]
