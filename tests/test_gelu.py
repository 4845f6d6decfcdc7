"""GELU: gradients, the scalar definition, known values and limits, dtypes, bad input."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import gelu
from minivlmoe.gradcheck import GradcheckCase, assert_gradients

from conftest import readonly

SHAPES = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


C, A = math.sqrt(2.0 / math.pi), 0.044715


def naive_gelu(x):
    """0.5 x (1 + tanh(c (x + a x^3))), one scalar at a time with math.tanh (no clip)."""
    out = np.empty(x.shape, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        v = float(x[idx])
        out[idx] = 0.5 * v * (1.0 + math.tanh(C * (v + A * v ** 3)))
    return out


def naive_gelu_grad(x):
    """The derivative, one scalar at a time, from the product and chain rules."""
    out = np.empty(x.shape, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        v = float(x[idx])
        t = math.tanh(C * (v + A * v ** 3))
        out[idx] = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * C * (1.0 + 3.0 * A * v * v)
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
    x = np.array(4.0 * rng.standard_normal(shape))  # reaches past the clip at |x| = 10
    y, cache = gelu.forward(x)
    # atol 1e-14: for x << 0, 1 + tanh(u) cancels, and x*x*x vs x**3 round differently
    np.testing.assert_allclose(y, naive_gelu(x), rtol=1e-13, atol=1e-14)
    dy = np.array(rng.standard_normal(shape))
    np.testing.assert_allclose(gelu.backward(dy, cache), dy * naive_gelu_grad(x),
                               rtol=1e-13, atol=1e-14)


def test_known_values_and_limits():
    x = np.array([0.0, 1.0, -1.0, 40.0, -40.0])
    y, cache = gelu.forward(x)
    g1 = 0.5 * (1 + math.tanh(C * (1 + A)))  # gelu(1) in the tanh form
    np.testing.assert_allclose(y, [0.0, g1, g1 - 1.0, 40.0, -0.0], rtol=1e-15, atol=1e-300)
    dx = gelu.backward(np.ones_like(x), cache)
    np.testing.assert_allclose(dx[[0, 3, 4]], [0.5, 1.0, 0.0], atol=1e-15)
    # the dip: gelu' changes sign near x ~ -0.75, the minimum of gelu
    _, c = gelu.forward(np.array([-0.80, -0.70]))
    slope = gelu.backward(np.ones(2), c)
    assert slope[0] < 0 < slope[1]
    # close to the exact x * Phi(x) but a different function
    t = np.linspace(-4, 4, 101)
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in t])
    gap = np.abs(gelu.forward(t)[0] - exact).max()
    assert 1e-5 < gap < 1e-3


def test_clip_changes_nothing():
    """Past |x| = 10 the unclipped tanh is already exactly +-1 in float64 and float32."""
    for dtype in (np.float64, np.float32):
        v = np.array([10.0, 10.5, 30.0, 1e3], dtype=dtype)
        u = np.sqrt(2 / np.pi).astype(dtype) * (v + dtype(A) * v ** 3)
        assert np.all(np.tanh(u) == 1) and np.all(np.tanh(-u) == -1)
    x = np.array([-12.0, -10.0, 10.0, 12.0])
    y, cache = gelu.forward(x)
    np.testing.assert_allclose(y, naive_gelu(x), rtol=1e-15, atol=1e-300)
    np.testing.assert_allclose(gelu.backward(np.ones(4), cache), naive_gelu_grad(x), atol=1e-300)


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
    x = np.array([1e4, -1e4, 3e3, -3e3, 1e30, -1e30], dtype=np.float32)
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


def test_fortran_ordered_input_keeps_its_layout_and_values():
    """sparse_linear returns transposed views; GELU must not copy them into C order."""
    rng = np.random.default_rng(5)
    x = np.ascontiguousarray(rng.standard_normal((6, 9))).T       # (9, 6) F-ordered view
    y, cache = gelu.forward(x)
    assert y.flags.f_contiguous and not y.flags.c_contiguous
    np.testing.assert_allclose(y, naive_gelu(x), rtol=1e-13, atol=1e-14)
    dy = rng.standard_normal(x.shape)
    dx = gelu.backward(dy, cache)
    np.testing.assert_allclose(dx, dy * naive_gelu_grad(x), rtol=1e-13, atol=1e-14)
    z = rng.standard_normal((4, 5, 6))[:, ::2]                    # neither C nor F contiguous
    np.testing.assert_allclose(gelu.forward(z)[0], naive_gelu(z), rtol=1e-13, atol=1e-14)
