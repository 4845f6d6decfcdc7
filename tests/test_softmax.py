"""Softmax and logsumexp: gradients, the loop definition, properties, masks, bad input."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import softmax
from minivlmoe.gradcheck import GradcheckCase, assert_gradients

from conftest import readonly


@st.composite
def shape_and_axis(draw, max_dims=3):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=max_dims)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return shape, axis


def naive_softmax(x, axis):
    """One slice at a time: exp(x_j - max) / sum_k exp(x_k - max), with math.exp."""
    xm = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    out = np.empty_like(xm)
    for idx in np.ndindex(xm.shape[:-1]):
        row = [float(v) for v in xm[idx]]
        m = max(row)
        e = [math.exp(v - m) for v in row]
        out[idx] = [v / sum(e) for v in e]
    return np.moveaxis(out, -1, axis)


def naive_logsumexp(x, axis):
    xm = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    out = np.empty(xm.shape[:-1])
    for idx in np.ndindex(xm.shape[:-1]):
        row = [float(v) for v in xm[idx]]
        m = max(row)
        out[idx] = m + math.log(sum(math.exp(v - m) for v in row))
    return out


def naive_masked_softmax(x, axis):
    """One slice at a time over the finite entries only (-inf = masked); a slice with no
    finite entry gives zeros.  Returns (p, logsumexp) with math.exp / math.log."""
    xm = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    p = np.zeros_like(xm)
    lse = np.full(xm.shape[:-1], -np.inf)
    for idx in np.ndindex(xm.shape[:-1]):
        live = [j for j in range(xm.shape[-1]) if xm[idx][j] != -np.inf]
        if not live:
            continue                                             # fully masked: p = 0
        m = max(float(xm[idx][j]) for j in live)
        e = {j: math.exp(float(xm[idx][j]) - m) for j in live}
        for j in live:
            p[idx][j] = e[j] / sum(e.values())
        lse[idx] = m + math.log(sum(e.values()))
    return np.moveaxis(p, -1, axis), lse


@st.composite
def masked_logits(draw, max_dims=3):
    """(x, axis): random logits with random -inf entries and at least one fully masked
    slice along ``axis`` whenever there are two or more slices."""
    shape, axis = draw(shape_and_axis(max_dims))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = 2.0 * rng.standard_normal(shape)
    x[rng.random(shape) < draw(st.sampled_from([0.0, 0.3, 0.7]))] = -np.inf
    xm = np.moveaxis(x, axis, -1)                                # a view: writes go to x
    slices = list(np.ndindex(xm.shape[:-1]))
    if len(slices) >= 2:
        xm[slices[draw(st.integers(0, len(slices) - 1))]] = -np.inf
    return x, axis


# Moderate logits only: once every probability saturates (all gradients < ~2e-4), the
# centered difference's round-off (~1e-10) exceeds 1e-6 of the gradient.  Large logits
# are covered by test_large_logits_finite.
@given(seed=st.integers(0, 2**32 - 1), sa=shape_and_axis(), scale=st.sampled_from([0.3, 1.0]))
def test_gradients(seed, sa, scale):
    shape, axis = sa
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(shape)
    case = GradcheckCase("softmax", {"x": x}, lambda a: softmax.forward(a["x"], axis=axis),
                         lambda dout, cache: {"x": softmax.backward(dout, cache)})
    assert_gradients(case, rng)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 6), rows=st.integers(1, 4))
def test_gradients_with_masked_entries(seed, n, rows):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n))
    x[rng.random((rows, n)) < 0.4] = -np.inf
    x[:, 0] = rng.standard_normal(rows)                          # keep one live entry per row
    case = GradcheckCase("softmax(masked)", {"x": x}, lambda a: softmax.forward(a["x"]),
                         lambda dout, cache: {"x": softmax.backward(dout, cache)})
    assert_gradients(case, rng)


@given(seed=st.integers(0, 2**32 - 1), sa=shape_and_axis())
def test_forward_matches_naive_and_backward_matches_jacobian(seed, sa):
    shape, axis = sa
    rng = np.random.default_rng(seed)
    x = 4.0 * rng.standard_normal(shape)
    p, cache = softmax.forward(x, axis=axis)
    np.testing.assert_allclose(p, naive_softmax(x, axis), rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(softmax.logsumexp(x, axis=axis), naive_logsumexp(x, axis),
                               rtol=1e-13, atol=1e-13)
    # backward equals dp @ J with the explicit Jacobian J = diag(p) - p p^T, slice by slice
    dp = rng.standard_normal(shape)
    dx = softmax.backward(dp, cache)
    pm, dpm, dxm = (np.moveaxis(a, axis, -1) for a in (p, dp, dx))
    for idx in np.ndindex(pm.shape[:-1]):
        jac = np.diag(pm[idx]) - np.outer(pm[idx], pm[idx])
        np.testing.assert_allclose(dxm[idx], dpm[idx] @ jac, rtol=1e-10, atol=1e-14)


@given(seed=st.integers(0, 2**32 - 1), sa=shape_and_axis(),
       shift=st.floats(-1e3, 1e3, allow_nan=False))
def test_sums_to_one_and_shift_invariant(seed, sa, shift):
    shape, axis = sa
    rng = np.random.default_rng(seed)
    x = 5.0 * rng.standard_normal(shape)
    p, _ = softmax.forward(x, axis=axis)
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=axis), 1.0, rtol=1e-14)
    # a constant shift of each slice (different per slice) leaves p unchanged
    c = shift * rng.random(np.sum(x, axis=axis, keepdims=True).shape)
    p_shifted, _ = softmax.forward(x + c, axis=axis)
    np.testing.assert_allclose(p_shifted, p, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(softmax.logsumexp(x + c, axis=axis),
                               softmax.logsumexp(x, axis=axis) + np.squeeze(c, axis=axis),
                               rtol=1e-12, atol=1e-9)


def test_logsumexp_keepdims_and_gradient_is_softmax():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5))
    assert softmax.logsumexp(x, axis=1, keepdims=True).shape == (3, 1, 5)
    assert softmax.logsumexp(x, axis=1).shape == (3, 5)
    # d/dx sum(logsumexp(x) * g) = g * softmax(x), checked with the gradient checker
    case = GradcheckCase("logsumexp", {"x": x},
                         lambda a: (softmax.logsumexp(a["x"], axis=1), None),
                         lambda dout, _: {"x": dout[:, None, :] * softmax.forward(x, axis=1)[0]})
    assert_gradients(case, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_finite(dtype):
    x = np.array([[1e4, -1e4, 0.0], [1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, -1e4]], dtype=dtype)
    p, cache = softmax.forward(x)
    dx = softmax.backward(np.ones_like(x), cache)
    lse = softmax.logsumexp(x)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(dx)) and np.all(np.isfinite(lse))
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(p[1, :2], [1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(1.0))], rtol=1e-6)
    np.testing.assert_allclose(p[2], [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(lse[2], -1e4 + np.log(3.0), rtol=1e-6)


def test_masked_entries_get_zero_and_fully_masked_row_no_nan():
    x = np.array([[0.5, -np.inf, 1.5, -np.inf], [-np.inf] * 4, [2.0, 1.0, 0.0, -1.0]])
    p, cache = softmax.forward(x)
    assert np.all(p[0, [1, 3]] == 0.0)
    np.testing.assert_allclose(p[0, [0, 2]], naive_softmax(np.array([0.5, 1.5]), -1), rtol=1e-15)
    assert np.all(p[1] == 0.0), "a fully masked row has no distribution: zeros, not NaN"
    dx = softmax.backward(np.arange(12.0).reshape(3, 4), cache)
    assert np.all(np.isfinite(dx)) and np.all(dx[1] == 0.0) and np.all(dx[0, [1, 3]] == 0.0)
    lse = softmax.logsumexp(x)
    assert lse[1] == -np.inf and np.isfinite(lse[[0, 2]]).all()


@given(xa=masked_logits())
def test_masked_and_fully_masked_slices_match_naive_loop(xa):
    x, axis = xa
    p_ref, lse_ref = naive_masked_softmax(x, axis)
    p, cache = softmax.forward(x, axis=axis)
    np.testing.assert_allclose(p, p_ref, rtol=1e-13, atol=1e-300)
    assert np.all(p[x == -np.inf] == 0.0)                        # masked: exactly 0
    lse = softmax.logsumexp(x, axis=axis)
    dead = lse_ref == -np.inf                                    # fully masked slices
    np.testing.assert_array_equal(lse[dead], -np.inf)
    np.testing.assert_allclose(lse[~dead], lse_ref[~dead], rtol=1e-13, atol=1e-13)
    # backward: dp @ J slice by slice (J = diag(p) - p p^T is 0 on a fully masked slice)
    dp = np.random.default_rng(0).standard_normal(x.shape)
    dx = softmax.backward(dp, cache)
    pm, dpm, dxm = (np.moveaxis(a, axis, -1) for a in (p_ref, dp, dx))
    for idx in np.ndindex(pm.shape[:-1]):
        jac = np.diag(pm[idx]) - np.outer(pm[idx], pm[idx])
        np.testing.assert_allclose(dxm[idx], dpm[idx] @ jac, rtol=1e-10, atol=1e-14)
    assert np.all(dx[x == -np.inf] == 0.0)
    assert np.all(np.moveaxis(dx, axis, -1)[dead] == 0.0)       # fully masked: exactly 0


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 6), rows=st.integers(2, 5))
def test_gradients_with_fully_masked_rows(seed, n, rows):
    """-inf entries and fully masked rows present: the finite entries are checked by
    finite differences; a fully masked row's gradient is exactly 0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n))
    x[rng.random((rows, n)) < 0.4] = -np.inf
    dead = rng.random(rows) < 0.4
    dead[0] = True                                               # at least one such row
    x[dead] = -np.inf
    case = GradcheckCase("softmax(fully masked rows)", {"x": x},
                         lambda a: softmax.forward(a["x"]),
                         lambda dout, cache: {"x": softmax.backward(dout, cache)})
    assert_gradients(case, rng)
    _, cache = softmax.forward(x)
    dx = softmax.backward(rng.standard_normal(x.shape), cache)
    np.testing.assert_array_equal(dx[dead], 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fully_masked_slices_raise_no_floating_point_error(dtype):
    """No 0/0, no -inf - -inf, no log(0) warning: every such error is raised here."""
    x = np.full((3, 2, 4), -np.inf, dtype=dtype)
    x[0, 0] = [1.0, -np.inf, 3.0, -2.0]
    x[2, 1, 2] = 80.0
    with warnings.catch_warnings(), np.errstate(divide="raise", over="raise", invalid="raise"):
        warnings.simplefilter("error")
        p, cache = softmax.forward(x, axis=-1)
        dx = softmax.backward(np.ones_like(x), cache)
        lse = softmax.logsumexp(x, axis=-1)
    assert p.dtype == dx.dtype == lse.dtype == dtype
    np.testing.assert_array_equal(p[1], 0.0)
    np.testing.assert_array_equal(p[0, 1], 0.0)
    np.testing.assert_array_equal(p[2, 1], [0.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(dx[1], 0.0)
    np.testing.assert_array_equal(lse[1], -np.inf)
    assert np.isfinite(lse[0, 0]) and lse[2, 1] == np.float32(80.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_inputs_untouched(dtype):
    rng = np.random.default_rng(0)
    x = readonly(rng.standard_normal((2, 3, 4)).astype(dtype))
    x_before = x.copy()
    p, cache = softmax.forward(x, axis=1)
    dp = readonly(rng.standard_normal(p.shape).astype(dtype))
    dx = softmax.backward(dp, cache)
    assert p.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    assert softmax.logsumexp(x).dtype == dtype
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_allclose(p, naive_softmax(x, 1), rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("fn", [lambda x, **k: softmax.forward(x, **k),
                                lambda x, **k: softmax.logsumexp(x, **k)],
                         ids=["forward", "logsumexp"])
@pytest.mark.parametrize("x, kwargs, error, match", [
    (np.array(1.0), {}, ValueError, r"x must have at least 1 dimension, got shape \(\)"),
    (np.zeros((2, 0)), {}, ValueError, r"x must have at least 1 entry along axis=1"),
    (np.array([1.0, np.nan]), {}, ValueError, "x must be finite or -inf"),
    (np.array([1.0, np.inf]), {}, ValueError, "x must be finite or -inf"),
    (np.zeros((2, 3)), {"axis": 2}, ValueError, r"axis must be in \[-2, 1\], got 2"),
    (np.zeros((2, 3)), {"axis": 1.0}, TypeError, "axis must be an int, got float"),
    (np.array([1, 2]), {}, TypeError, "x must have dtype float32 or float64, got int64"),
    ([1.0, 2.0], {}, TypeError, "x must be a numpy.ndarray, got list"),
])
def test_bad_input(fn, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(x, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_far_below_zero_and_above_the_limit_match_naive(dtype):
    """The last-axis path skips the row max when every entry is below EXP_LIMIT and redoes
    the rows whose sum is tiny: rows at -200 (exp underflows there), rows near the limit,
    a row above it (the whole array then takes the shifted path), masked rows."""
    rng = np.random.default_rng(5)
    limit = softmax.EXP_LIMIT[np.dtype(dtype)]
    x = rng.standard_normal((6, 7))
    x[1] -= 200.0                                                # exp(x) underflows
    x[2] -= 2 * limit                                            # far below, in float64 too
    x[3] += limit - 2.0                                          # near the limit: no overflow
    x[4, :3] = -np.inf                                           # partly masked
    x[5] = -np.inf                                               # fully masked
    x = x.astype(dtype)
    want, _ = naive_masked_softmax(x.astype(np.float64), -1)
    got, _ = softmax.forward(x)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 1e-3)
    np.testing.assert_array_equal(got[5], 0.0)
    above = x.copy()
    above[0, 0] = dtype(limit + 5.0)                             # over the limit: shifted
    np.testing.assert_allclose(softmax.forward(above)[0],
                               naive_masked_softmax(above.astype(np.float64), -1)[0],
                               rtol=tol, atol=tol * 1e-3)
