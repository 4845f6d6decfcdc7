"""L2 normalization: gradients on both branches, the loop definition, properties, bad input."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import l2norm
from minivlmoe.gradcheck import GradcheckCase, assert_gradients

from conftest import readonly

LEADS = st.sampled_from([(), (1,), (4,), (2, 3)])


def naive_l2norm(x, eps=1e-12):
    """One row at a time: x / max(sqrt(sum x_i^2), eps) with math.sqrt."""
    x2 = x.reshape(-1, x.shape[-1])
    out = np.empty(x2.shape)
    for n in range(x2.shape[0]):
        norm = math.sqrt(sum(float(v) ** 2 for v in x2[n]))
        out[n] = [float(v) / max(norm, eps) for v in x2[n]]
    return out.reshape(x.shape)


def naive_l2norm_backward(dy, x, eps=1e-12):
    """Row by row with the explicit Jacobian: (I - y y^T) / ||x||, or I / eps when clamped."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, x.shape[-1])
    out = np.empty(x2.shape)
    for n in range(x2.shape[0]):
        norm = float(np.sqrt(x2[n] @ x2[n]))
        if norm > eps:
            y = x2[n] / norm
            jac = (np.eye(len(y)) - np.outer(y, y)) / norm
        else:
            jac = np.eye(len(x2[n])) / eps
        out[n] = dy2[n] @ jac
    return out.reshape(x.shape)


def l2_case(x, eps):
    return GradcheckCase("l2norm", {"x": x}, lambda a: l2norm.forward(a["x"], eps=eps),
                         lambda dout, cache: {"x": l2norm.backward(dout, cache)})


@given(seed=st.integers(0, 2**32 - 1), lead=LEADS, d=st.integers(1, 8),
       scale=st.sampled_from([0.1, 1.0, 4.0]))
def test_gradients(seed, lead, d, scale):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal((*lead, d))
    assert_gradients(l2_case(x, 1e-12), rng)


@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 5), d=st.integers(1, 6))
def test_gradients_with_clamped_rows(seed, rows, d):
    # eps = 1: rows scaled far below it take the linear branch y = x / eps, the rest are
    # normalized; a margin keeps every norm away from the kink at ||x|| = eps
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)                # unit rows
    x *= np.where(rng.random((rows, 1)) < 0.5, rng.uniform(0.05, 0.5, (rows, 1)),
                  rng.uniform(2.0, 5.0, (rows, 1)))
    assert_gradients(l2_case(x, 1.0), rng)


@given(seed=st.integers(0, 2**32 - 1), lead=LEADS, d=st.integers(1, 8),
       eps=st.sampled_from([1e-12, 0.5]))
def test_matches_naive(seed, lead, d, eps):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, d))
    y, cache = l2norm.forward(x, eps=eps)
    np.testing.assert_allclose(y, naive_l2norm(x, eps), rtol=1e-13, atol=1e-15)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(l2norm.backward(dy, cache), naive_l2norm_backward(dy, x, eps),
                               rtol=1e-10, atol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), lead=LEADS, d=st.integers(1, 8),
       scale=st.floats(1e-6, 1e6))
def test_rows_have_unit_norm_and_gradient_is_orthogonal(seed, lead, d, scale):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal((*lead, d))
    y, cache = l2norm.forward(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-14)
    # moving x along itself does not change y: <dx, x> = 0 for every row
    dx = l2norm.backward(rng.standard_normal(y.shape), cache)
    np.testing.assert_allclose(np.sum(dx * y, axis=-1), 0.0, atol=1e-12 / scale)
    # scale invariance: normalizing c x gives the same rows
    y2, _ = l2norm.forward(3.7 * x)
    np.testing.assert_allclose(y2, y, rtol=1e-14, atol=1e-15)


def test_zero_row_maps_to_zero_without_nan():
    x = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
    y, cache = l2norm.forward(x)
    np.testing.assert_array_equal(y, [[0.0, 0.0, 0.0], [0.6, 0.0, 0.8]])
    dx = l2norm.backward(np.ones_like(x), cache)
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx[0], 1e12)                      # dy / eps on the clamped row


@pytest.mark.parametrize("dtype, eps, row", [
    (np.float64, 1e-12, [1e-12, 0.0, 0.0]),                     # the default eps
    (np.float64, 5.0, [3.0, 0.0, 4.0]),                          # 9 + 16 = 25 exactly
    (np.float32, 5.0, [3.0, 0.0, 4.0]),
    (np.float32, 0.5, [0.0, -0.5, 0.0]),
])
def test_norm_exactly_eps_takes_the_clamped_branch(dtype, eps, row):
    """At ||x|| == eps (the branch boundary) the docstring's clamped formulas hold:
    ``y = x / eps`` and ``dx = dy / eps`` (no projection term), as for ``||x|| < eps``."""
    x = np.array([row, [2.0, 6.0, 3.0]], dtype=dtype)            # row 1: norm 7 > eps
    assert np.sqrt(np.sum(x[0] * x[0])) == dtype(eps)            # the boundary, exactly
    y, cache = l2norm.forward(x, eps=eps)
    np.testing.assert_array_equal(y[0], x[0] / dtype(eps))
    dy = np.array([[1.0, -2.0, 0.5], [0.3, -1.0, 2.0]], dtype=dtype)  # <y0, dy0> != 0
    dx = l2norm.backward(dy, cache)
    assert dx.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(dx[0], dy[0] / eps, rtol=tol)
    np.testing.assert_allclose(dx[1], naive_l2norm_backward(dy[1:], x[1:], eps)[0],
                               rtol=10 * tol, atol=tol)
    assert not cache.normalized[0, 0] and cache.normalized[1, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_inputs_untouched(dtype):
    rng = np.random.default_rng(0)
    x = readonly(rng.standard_normal((2, 3, 4)).astype(dtype))
    y, cache = l2norm.forward(x)
    dy = readonly(rng.standard_normal(y.shape).astype(dtype))
    dx = l2norm.backward(dy, cache)
    assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(y, naive_l2norm(x), rtol=tol)
    np.testing.assert_allclose(dx, naive_l2norm_backward(dy, x), rtol=10 * tol, atol=tol)
    np.testing.assert_array_equal(l2norm.backward(dy, cache), dx)   # cache not mutated


@pytest.mark.parametrize("x, kwargs, error, match", [
    (np.array(1.0), {}, ValueError, r"x must have shape \(\.\.\., D\) with D >= 1, got \(\)"),
    (np.zeros((3, 0)), {}, ValueError,
     r"x must have shape \(\.\.\., D\) with D >= 1, got \(3, 0\)"),
    (np.array([[1.0, np.nan]]), {}, ValueError, "x must be finite"),
    (np.array([[1.0, -np.inf]]), {}, ValueError, "x must be finite"),
    (np.ones((2, 3)), {"eps": 0.0}, ValueError, r"eps must be in \(0.0, inf\], got 0.0"),
    (np.ones((2, 3)), {"eps": "small"}, TypeError, "eps must be a real number, got str"),
    (np.ones((2, 3), dtype=np.int64), {}, TypeError, "x must have dtype float32 or float64"),
])
def test_bad_input(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        l2norm.forward(x, **kwargs)
