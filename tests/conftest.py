"""Shared test configuration: deterministic seeds and the hypothesis profiles.

Select a profile with ``HYPOTHESIS_PROFILE=ci`` (derandomized, more examples); the default is
``dev``. Every test starts from ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# The tests import ``looplib`` and ``tests.helpers`` from the checkout, however pytest is started.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# The tests use tiny tensors: one intra-op thread is faster (no OpenMP barriers, which turn
# pathological when the cores are shared) and keeps reductions in one order.
torch.set_num_threads(1)

_COMMON = {
    "deadline": None,  # a first torch call can take far longer than later ones
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("dev", max_examples=12, **_COMMON)
settings.register_profile("ci", max_examples=30, derandomize=True, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test sees the same global torch RNG (dropout, ``torch.randn``)."""
    torch.manual_seed(0)
