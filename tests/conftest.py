"""Shared test setup: hypothesis profiles, an empty working directory, small helpers.

Every test runs in its own empty temporary working directory (``_isolated_cwd``), so
nothing a test writes to a relative path (the CLI's default ``runs/PRESET-EXPERTS``)
lands in the checkout, and a checkout that already holds runs cannot change a test's
outcome (tests/test_threads.py checks it).  Hypothesis keeps its example database in
the checkout's ``.hypothesis/`` (its path is fixed when hypothesis is imported).

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


def one_error_line(capsys):
    """The single stderr line of a failed command (asserting there is exactly one, that it
    starts with ``minivlmoe: error:`` and that no traceback was printed)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minivlmoe: error: "), err
    return lines[0]


def readonly(*arrays):
    """Mark arrays read-only (a backward that writes into its inputs then raises)."""
    for a in arrays:
        a.flags.writeable = False
    return arrays[0] if len(arrays) == 1 else arrays


def without_time(records):
    """Metrics records without their wall-clock field (everything else must match)."""
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


def same_trees(a, b):
    """Assert two parameter (or optimizer-state) trees are equal bit for bit: the same
    keys, sparsity patterns, dtypes and bytes."""
    from minivlmoe.tree import flatten

    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        if hasattr(x, "indptr"):
            assert np.array_equal(x.indptr, y.indptr) and np.array_equal(x.indices, y.indices)
            x, y = x.data, y.data
        x, y = np.asarray(x), np.asarray(y)                 # the step count is an int
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Each test starts in its own empty directory (the test's tmp_path)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
