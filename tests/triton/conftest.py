import os

import pytest
import torch

_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    if _INTERP or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="Triton tests need a GPU or TRITON_INTERPRET=1 (run: TRITON_INTERPRET=1 pytest tests/triton)"
    )
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture
def triton_device():
    """CUDA when present, else CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_ok(triton_device):
    """The device the Triton backend runs on here, or a skip saying why it cannot run."""
    from fsl_fast.ops import _backend

    ok, why = _backend.available("triton", triton_device)
    if not ok:
        pytest.skip(f"triton backend unavailable on {triton_device}: {why}")
    return triton_device
