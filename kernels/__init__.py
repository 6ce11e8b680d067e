"""Triton kernels of fsl_fast (installed as ``fsl_fast.kernels``).

Launchers take tensors and return tensors; policy (validation, dispatch) lives in fsl_fast.ops.
Importing this package requires triton; fsl_fast.ops imports it lazily.
"""
