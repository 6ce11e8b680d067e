import os

import pytest
import torch

# fp32 comparisons against references: no TF32 in cuBLAS/cuDNN (it is on by default for cuDNN
# convolutions and changes results at the 1e-3 level on Hopper).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def seed():
    """Seed torch per test (never at import)."""
    torch.manual_seed(1234)
    return 1234


def pytest_report_header(config):
    return f"torch {torch.__version__}, cuda={torch.cuda.is_available()}, " \
           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
