import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))  # `python -m pytest` from a checkout without an install

# Two-core CI machines: keep torch from oversubscribing when tests run beside loader workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def mmdet_fixture():
    """Golden values written by tools/make_mmdet_fixtures.py with mmdetection 3.3.0."""
    return torch.load(FIXTURES / "mmdet_gfl.pt", weights_only=True)
