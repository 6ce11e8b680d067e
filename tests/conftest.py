import os

import pytest
import torch


@pytest.fixture
def seed():
    """Seed torch per test (never at import)."""
    torch.manual_seed(1234)
    return 1234


def pytest_report_header(config):
    return f"torch {torch.__version__}, cuda={torch.cuda.is_available()}, " \
           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
