"""Shared test setup: hypothesis profiles and small helpers.

Profiles (select with HYPOTHESIS_PROFILE=name, or `pytest --hypothesis-profile=name`):
  dev       quick default for local runs (random, few examples)
  ci        derandomized, same examples every run; loaded when the CI variable is set
  thorough  many examples, for deep runs before a release
"""

import os

# One BLAS thread: on a 2-core machine a second OpenBLAS thread only contends with
# hypothesis and pytest; must be set before NumPy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=8, **_common)
# Hypothesis auto-loads a built-in profile named "ci" when CI is set; registering ours
# with an explicit parent replaces it with these settings.
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True,
                          print_blob=True, database=None)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))


def readonly(*arrays):
    """Mark arrays read-only (a backward that writes into its inputs then raises)."""
    for a in arrays:
        a.flags.writeable = False
    return arrays[0] if len(arrays) == 1 else arrays


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
