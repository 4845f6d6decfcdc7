"""Tests for minivlmoe/ops/ffn.py: the two-layer FFN (sparse linear -> GELU -> sparse linear)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import ffn
from minivlmoe.gradcheck import GradcheckCase, assert_gradients
from minivlmoe.testing.ops import naive_ffn

SEEDS = st.integers(0, 2**32 - 1)


def random_params(rng, d, hidden, density, dtype=np.float64):
    params = ffn.init(rng, d, hidden, density, dtype)
    params["fc1"]["b"] = rng.standard_normal(hidden).astype(dtype)
    params["fc2"]["b"] = rng.standard_normal(d).astype(dtype)
    return params


@given(seed=SEEDS, n=st.integers(1, 5), d=st.integers(1, 6), hidden=st.integers(1, 7),
       density=st.sampled_from([1.0, 0.5, 0.2]), lead=st.sampled_from([(), (2,)]))
def test_gradients(seed, n, d, hidden, density, lead):
    rng = np.random.default_rng(seed)
    params = random_params(rng, d, hidden, density)
    x = rng.standard_normal((*lead, n, d))
    # h = 1e-5: GELU is smooth (truncation error ~h^2), and the larger step keeps the
    # round-off error eps*|L|/h below the tolerance when GELU saturates and every
    # gradient entry of an argument is tiny.
    case = GradcheckCase("ffn", {"x": x, "params": params},
                         lambda a: ffn.forward(a["x"], a["params"]),
                         lambda dout, cache: dict(zip(("x", "params"), ffn.backward(dout, cache))),
                         h=1e-5)
    assert_gradients(case, rng)


@given(seed=SEEDS, n=st.integers(1, 4), d=st.integers(1, 5), hidden=st.integers(1, 6),
       density=st.sampled_from([1.0, 0.4]))
def test_forward_matches_naive_loop(seed, n, d, hidden, density):
    rng = np.random.default_rng(seed)
    params = random_params(rng, d, hidden, density)
    x = rng.standard_normal((2, n, d))
    y, _ = ffn.forward(x, params)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, naive_ffn(x, params), rtol=1e-12, atol=1e-12)


def test_float32_in_float32_out(rng):
    params = ffn.init(rng, 6, 10, dtype=np.float32)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y, cache = ffn.forward(x, params)
    dx, grads = ffn.backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == grads["fc1"]["W"].dtype == grads["fc2"]["b"].dtype == np.float32


def test_gradient_keys_and_patterns_match_params(rng):
    params = ffn.init(rng, 5, 8, density=0.4, dtype=np.float64)
    y, cache = ffn.forward(rng.standard_normal((3, 5)), params)
    _, grads = ffn.backward(rng.standard_normal(y.shape), cache)
    assert grads.keys() == params.keys()
    for layer in ("fc1", "fc2"):
        assert grads[layer].keys() == params[layer].keys()
        assert np.array_equal(grads[layer]["W"].indices, params[layer]["W"].indices)
        assert np.array_equal(grads[layer]["W"].indptr, params[layer]["W"].indptr)


def test_bad_input_names_the_argument(rng):
    params = ffn.init(rng, 5, 8, dtype=np.float64)
    with pytest.raises(ValueError, match="x must have shape"):
        ffn.forward(rng.standard_normal((3, 4)), params)
    with pytest.raises(TypeError, match="x must have the dtype"):
        ffn.forward(rng.standard_normal((3, 5)).astype(np.float32), params)
    with pytest.raises(ValueError, match="density"):
        ffn.init(rng, 5, 8, density=0.0)
