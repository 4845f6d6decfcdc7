"""Tests for minivlmoe/moe/router.py: logits, softmax, top-k choice and the two gate conventions."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.moe import router
from minivlmoe.gradcheck import GradcheckCase, assert_gradients, check_case
from minivlmoe.testing.moe import (inputs_for_logits, orthonormal_router, router_case,
                                   separated_logits)

SEEDS = st.integers(0, 2**32 - 1)


@st.composite
def router_setup(draw):
    """(rng, x, params, k, renormalize) with well-separated logits (D >= E)."""
    rng = np.random.default_rng(draw(SEEDS))
    e = draw(st.integers(1, 5))
    k = draw(st.integers(1, e))
    n = draw(st.integers(1, 6))
    d = e + draw(st.integers(0, 3))
    params = orthonormal_router(rng, d, e)
    x = inputs_for_logits(rng, separated_logits(rng, n, e), params)
    return rng, x, params, k, draw(st.booleans())


def naive_route(logits, k, renormalize):
    """The definition, token by token: sort by (-logit, index), softmax, pick, scale."""
    n, e = logits.shape
    experts = np.zeros((n, k), dtype=int)
    gates = np.zeros((n, k))
    for t in range(n):
        m = max(logits[t])
        ex = [math.exp(v - m) for v in logits[t]]
        p = [v / sum(ex) for v in ex]
        top = sorted(range(e), key=lambda i: (-logits[t, i], i))[:k]
        total = sum(p[i] for i in top) if renormalize else 1.0
        experts[t] = top
        gates[t] = [p[i] / total for i in top]
    return experts, gates


@given(router_setup())
def test_gradients_of_gates_probs_and_logits(setup):
    rng, x, params, k, renorm = setup
    assert_gradients(router_case("router", x, params, k, renorm), rng)


@given(router_setup())
def test_gradient_of_gates_only_reaches_the_renormalizer(setup):
    """With dprobs = dlogits = None the router gradient comes from the gates alone,
    including the renormalizer's quotient-rule term."""
    rng, x, params, k, renorm = setup

    def fwd(a):
        r, cache = router.forward(a["x"], a["params"], k, renorm)
        return r.gates, cache

    def bwd(dout, cache):
        return dict(zip(("x", "params"), router.backward(dout, cache)))

    assert_gradients(GradcheckCase("router.gates", {"x": x, "params": params}, fwd, bwd), rng)


def test_renormalizer_treated_as_constant_is_caught(rng):
    """A backward that drops the renormalizer's term gives a wrong gradient, and the
    gradient check above fails on it (it must be able to fail)."""
    params = orthonormal_router(rng, 4, 3)
    x = inputs_for_logits(rng, separated_logits(rng, 5, 3), params)
    r, cache = router.forward(x, params, 2, True)
    dg = rng.standard_normal(r.gates.shape)
    right, _ = router.backward(dg, cache)
    wrong, _ = router.backward(dg, cache._replace(gates=np.zeros_like(r.gates)))  # no sum term
    assert np.abs(right - wrong).max() > 1e-3

    def fwd(a):
        r, cache = router.forward(a["x"], a["params"], 2, True)
        return r.gates, cache

    def constant_renormalizer(dout, cache):
        dx, dparams = router.backward(dout, cache._replace(gates=np.zeros_like(cache.gates)))
        return {"x": dx, "params": dparams}

    case = GradcheckCase("router(renormalizer as a constant)", {"x": x, "params": params},
                         fwd, constant_renormalizer)
    rows = {row.argument: row for row in check_case(case, np.random.default_rng(1))}
    assert not rows["x"].passed and not rows["params.W"].passed
    with pytest.raises(AssertionError, match=r"op 'router\(renormalizer as a constant\)', "
                                             r"argument 'x'"):
        assert_gradients(case, np.random.default_rng(1))


@given(seed=SEEDS, n=st.integers(1, 6), e=st.integers(1, 6), data=st.data())
def test_matches_naive_routing_including_ties(seed, n, e, data):
    """Integer-valued logits have many ties: the lowest expert index must win."""
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, e))
    renorm = data.draw(st.booleans())
    d = e
    params = orthonormal_router(rng, d, e)
    logits = rng.integers(-2, 3, size=(n, e)).astype(np.float64)
    x = inputs_for_logits(rng, logits, params)
    r, _ = router.forward(x, params, k, renorm)
    logits = np.round(r.logits, 9)               # exact ties despite round-off in x W^T + b
    experts, gates = naive_route(logits, k, renorm)
    np.testing.assert_array_equal(router.top_k(logits, k), experts)
    r2, _ = router.forward(x, params, k, renorm)
    np.testing.assert_allclose(r2.gates, naive_route(r2.logits, k, renorm)[1], atol=1e-12)


@given(router_setup())
def test_invariants(setup):
    rng, x, params, k, renorm = setup
    r, _ = router.forward(x, params, k, renorm)
    n, e = r.probs.shape
    assert r.experts.shape == r.gates.shape == (n, min(k, e))
    assert np.all(r.gates >= 0)
    for row in r.experts:                                    # K distinct experts per token
        assert len(set(row.tolist())) == k
    sums = r.gates.sum(axis=1)
    if renorm:
        np.testing.assert_allclose(sums, 1.0, rtol=1e-12)
    else:
        assert np.all(sums <= 1.0 + 1e-12)
    ordered, _ = naive_route(r.logits, k, renorm)                   # the top-k logits
    np.testing.assert_array_equal(r.experts, ordered)
    np.testing.assert_allclose(r.probs.sum(axis=1), 1.0, rtol=1e-12)


@given(setup=router_setup(), shift=st.floats(-50, 50))
def test_adding_a_constant_to_all_logits_changes_no_gate(setup, shift):
    rng, x, params, k, renorm = setup
    r, _ = router.forward(x, params, k, renorm)
    shifted = {"W": params["W"], "b": params["b"] + shift}
    r2, _ = router.forward(x, shifted, k, renorm)
    np.testing.assert_array_equal(r.experts, r2.experts)
    np.testing.assert_allclose(r.gates, r2.gates, rtol=1e-10, atol=1e-13)


@given(router_setup())
def test_routing_is_constant_within_the_margin(setup):
    """The separated inputs keep the decision at x +- h (the gradient check's steps)."""
    rng, x, params, k, renorm = setup
    r, _ = router.forward(x, params, k, renorm)
    assert np.all(router.margin(r.logits, k) >= 0.49)
    for sign in (1.0, -1.0):
        moved = x + sign * 1e-6 * rng.uniform(-1, 1, size=x.shape)
        r2, _ = router.forward(moved, params, k, renorm)
        np.testing.assert_array_equal(r.experts, r2.experts)


def test_margin_definition():
    logits = np.array([[3.0, 1.0, 2.5], [0.0, 0.0, -1.0]])
    np.testing.assert_allclose(router.margin(logits, 1), [0.5, 0.0])
    np.testing.assert_allclose(router.margin(logits, 2), [1.5, 1.0])
    assert np.all(np.isinf(router.margin(logits, 3)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logits_of_magnitude_500_give_no_nan(rng, dtype):
    params = orthonormal_router(rng, 6, 4, dtype)
    logits = 500.0 * np.sign(rng.standard_normal((7, 4))) * rng.uniform(0.5, 1, (7, 4))
    x = inputs_for_logits(rng, logits, params)
    for renorm in (True, False):
        r, cache = router.forward(x, params, 2, renorm)
        assert r.gates.dtype == dtype and np.all(np.isfinite(r.gates))
        dx, grads = router.backward(np.ones_like(r.gates), cache, np.ones_like(r.probs))
        assert np.all(np.isfinite(dx)) and np.all(np.isfinite(grads["W"].data))


def test_noise_is_added_to_the_logits_and_drawn_from_the_generator(rng):
    params = router.init(rng, 5, 4, dtype=np.float64)
    x = rng.standard_normal((6, 5))
    clean, _ = router.forward(x, params, 2)
    noise = router.sample_noise(np.random.default_rng(3), (6, 4), 0.25, np.float64)
    again = router.sample_noise(np.random.default_rng(3), (6, 4), 0.25, np.float64)
    np.testing.assert_array_equal(noise, again)                  # pure given the generator
    noisy, _ = router.forward(x, params, 2, noise=noise)
    np.testing.assert_allclose(noisy.logits, clean.logits + noise)
    assert np.array_equal(router.forward(x, params, 2)[0].gates, clean.gates)  # deterministic
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        router.sample_noise(None, (6, 4), 0.25, np.float64)


@pytest.mark.parametrize("std, dtype", [(0.25, np.float64), (1.0 / 8, np.float32)])
def test_noise_has_mean_zero_and_the_given_std(std, dtype):
    """The noise is ``std * N(0, 1)``: over n draws its mean, std and the fraction inside
    one std lie within 5 standard errors of 0, ``std`` and erf(1/sqrt 2) = 0.6827
    (each bound is exceeded with probability < 6e-7 by correct code).  ``std / N(0, 1)``
    has no finite variance and only 31.7% of its draws inside one std."""
    n = 100_000
    z = router.sample_noise(np.random.default_rng(5), (n // 4, 4), std, dtype)
    assert z.shape == (n // 4, 4) and z.dtype == dtype
    z = z.astype(np.float64).ravel()
    se_mean = std / math.sqrt(n)                                 # SE of the sample mean
    se_std = std / math.sqrt(2 * n)                              # SE of the sample std (normal)
    inside = math.erf(1 / math.sqrt(2))                          # P(|Z| < 1) = 0.6827
    se_inside = math.sqrt(inside * (1 - inside) / n)             # binomial SE
    assert abs(z.mean()) < 5 * se_mean
    assert abs(z.std() - std) < 5 * se_std
    assert abs(np.mean(np.abs(z) < std) - inside) < 5 * se_inside
    assert not router.sample_noise(np.random.default_rng(5), (3, 4), 0.0, dtype).any()


def test_float32_in_float32_out(rng):
    params = router.init(rng, 5, 4, dtype=np.float32)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    r, cache = router.forward(x, params, 2)
    dx, grads = router.backward(np.ones_like(r.gates), cache)
    for a in (r.logits, r.probs, r.gates, dx, grads["b"]):
        assert a.dtype == np.float32


def test_bad_input_names_the_argument(rng):
    params = router.init(rng, 5, 4, dtype=np.float64)
    x = rng.standard_normal((6, 5))
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=4\], got 0"):
        router.forward(x, params, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=4\], got 5"):
        router.forward(x, params, 5)
    with pytest.raises(TypeError, match="k must be an int"):
        router.forward(x, params, 2.0)
    with pytest.raises(ValueError, match="noise must have shape"):
        router.forward(x, params, 2, noise=np.zeros((6, 3)))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        router.forward(x[None], params, 2)
    with pytest.raises(ValueError, match="noise_std"):
        router.sample_noise(rng, (6, 4), -1.0, np.float64)
