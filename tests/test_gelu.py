"""GELU: gradients, the scalar definition, known values and limits, dtypes, bad input."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe import gelu
from minivlmoe.gradcheck import GradcheckCase, assert_gradients

from conftest import readonly

SHAPES = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


def naive_gelu(x):
    """x * Phi(x), one scalar at a time with math.erf."""
    out = np.empty(x.shape, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        v = float(x[idx])
        out[idx] = v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))
    return out


def naive_gelu_grad(x):
    """Phi(x) + x phi(x), one scalar at a time."""
    out = np.empty(x.shape, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        v = float(x[idx])
        cdf = 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))
        pdf = math.exp(-0.5 * v * v) / math.sqrt(2.0 * math.pi)
        out[idx] = cdf + v * pdf
    return out


# Bounded inputs: for x < -4.5 gelu'(x) < 1e-4, and a case whose every gradient is that
# small drowns in the centered difference's round-off (~1e-10).
@given(seed=st.integers(0, 2**32 - 1), shape=SHAPES, scale=st.sampled_from([0.5, 2.0, 3.5]))
def test_gradients(seed, shape, scale):
    rng = np.random.default_rng(seed)
    x = np.array(rng.uniform(-scale, scale, size=shape))
    case = GradcheckCase("gelu", {"x": x}, lambda a: gelu.forward(a["x"]),
                         lambda dout, cache: {"x": gelu.backward(dout, cache)})
    assert_gradients(case, rng)


@given(seed=st.integers(0, 2**32 - 1), shape=SHAPES)
def test_forward_and_backward_match_naive(seed, shape):
    rng = np.random.default_rng(seed)
    x = np.array(3.0 * rng.standard_normal(shape))
    y, cache = gelu.forward(x)
    np.testing.assert_allclose(y, naive_gelu(x), rtol=1e-13, atol=1e-15)
    dy = np.array(rng.standard_normal(shape))
    np.testing.assert_allclose(gelu.backward(dy, cache), dy * naive_gelu_grad(x),
                               rtol=1e-13, atol=1e-15)


def test_known_values_and_limits():
    x = np.array([0.0, 1.0, -1.0, 40.0, -40.0])
    y, cache = gelu.forward(x)
    # gelu(1) = Phi(1) = 0.8413447460685429; gelu(-1) = -(1 - Phi(1))
    np.testing.assert_allclose(y, [0.0, 0.8413447460685429, -0.15865525393145707, 40.0, -0.0],
                               rtol=1e-15, atol=1e-300)
    dx = gelu.backward(np.ones_like(x), cache)
    np.testing.assert_allclose(dx[[0, 3, 4]], [0.5, 1.0, 0.0], atol=1e-15)
    # the dip: gelu' changes sign at x ~ -0.7518, the minimum of gelu
    _, c = gelu.forward(np.array([-0.76, -0.7518, -0.74]))
    slope = gelu.backward(np.ones(3), c)
    assert slope[0] < 0 < slope[2] and abs(slope[1]) < 1e-4
    # differs from the tanh approximation (GPT-2) by less than 1e-3 but not by 0
    t = np.linspace(-4, 4, 101)
    approx = 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t**3)))
    gap = np.abs(gelu.forward(t)[0] - approx).max()
    assert 1e-5 < gap < 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_inputs_untouched(dtype):
    rng = np.random.default_rng(0)
    x = readonly(rng.standard_normal((3, 4)).astype(dtype))
    y, cache = gelu.forward(x)
    assert y.dtype == dtype
    dy = readonly(rng.standard_normal((3, 4)).astype(dtype))
    dx = gelu.backward(dy, cache)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(y, naive_gelu(x), rtol=1e-5 if dtype == np.float32 else 1e-13)


def test_no_overflow_for_large_inputs():
    x = np.array([1e4, -1e4, 3e3, -3e3], dtype=np.float32)
    y, cache = gelu.forward(x)
    dx = gelu.backward(np.ones_like(x), cache)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))


@pytest.mark.parametrize("bad, error, match", [
    ([1.0, 2.0], TypeError, "x must be a numpy.ndarray, got list"),
    (np.array([1.0, np.nan]), ValueError, "x must be finite"),
    (np.array([1.0, np.inf]), ValueError, "x must be finite"),
    (np.array([1, 2]), TypeError, "x must have dtype float32 or float64, got int64"),
])
def test_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        gelu.forward(bad)
