"""Tests for minivlmoe.ops.attention: masks, multi-head attention forward and backward."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import attention, softmax
from minivlmoe.gradcheck import assert_gradients
from minivlmoe.testing.ops import attention_case

from conftest import readonly

MASK_KINDS = ["none", "padding", "causal", "prefix", "random", "random2d"]


# ---------------------------------------------------------------- naive references

def naive_make_mask(valid, S, causal, prefix):
    B = 1 if valid is None else valid.shape[0]
    mask = np.zeros((B, S, S), dtype=bool)
    for b in range(B):
        for s in range(S):
            for t in range(S):
                if prefix > 0:
                    ok = (s < prefix and t < prefix) or (s >= prefix and t <= s)
                elif causal:
                    ok = t <= s
                else:
                    ok = True
                mask[b, s, t] = ok and (valid is None or valid[b, t])
    return mask


def naive_forward(x, params, heads, mask):
    """Loop over batch items, heads and queries; a softmax over the allowed keys only."""
    B, S, D = x.shape
    Dh = D // heads
    W = {name: params[name]["W"].toarray() for name in "qkvo"}
    q = x @ W["q"].T + params["q"]["b"]
    k = x @ W["k"].T + params["k"]["b"]
    v = x @ W["v"].T + params["v"]["b"]
    full = np.ones((B, S, S), dtype=bool) if mask is None else np.broadcast_to(mask, (B, S, S))
    ctx = np.zeros((B, S, D))
    probs = np.zeros((B, heads, S, S))
    for b in range(B):
        for h in range(heads):
            cols = slice(h * Dh, (h + 1) * Dh)
            for s in range(S):
                keys = [t for t in range(S) if full[b, s, t]]
                if not keys:
                    continue  # no allowed key: weights 0, context 0
                scores = {t: q[b, s, cols] @ k[b, t, cols] / np.sqrt(Dh) for t in keys}
                top = max(scores.values())
                weights = {t: np.exp(scores[t] - top) for t in keys}
                total = sum(weights.values())
                for t in keys:
                    probs[b, h, s, t] = weights[t] / total
                    ctx[b, s, cols] += probs[b, h, s, t] * v[b, t, cols]
    return ctx @ W["o"].T + params["o"]["b"], probs


# ---------------------------------------------------------------- strategies

@st.composite
def configs(draw, kinds=MASK_KINDS):
    S = draw(st.integers(1, 5))
    return dict(
        B=draw(st.integers(1, 2)),
        S=S,
        H=draw(st.integers(1, 3)),
        Dh=draw(st.integers(1, 3)),
        density=draw(st.sampled_from([1.0, 0.5, 0.2])),
        kind=draw(st.sampled_from(kinds)),
        prefix=draw(st.integers(0, S)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_mask_for(cfg, rng):
    B, S, kind = cfg["B"], cfg["S"], cfg["kind"]
    if kind == "none":
        return None
    if kind == "padding":
        return attention.make_mask(rng.random((B, S)) < 0.7)  # some items may be all padding
    if kind == "causal":
        return attention.make_mask(S=S, causal=True)
    if kind == "prefix":
        return attention.make_mask(S=S, causal=True, prefix=cfg["prefix"])
    if kind == "random":
        return rng.random((B, S, S)) < 0.6                    # fully masked rows happen
    return rng.random((S, S)) < 0.6                           # (S, S), shared by the batch


def make_case(cfg, dtype=np.float64):
    rng = np.random.default_rng(cfg["seed"])
    D = cfg["H"] * cfg["Dh"]
    params = attention.init(rng, D, cfg["H"], cfg["density"], dtype)
    for name in "qkvo":
        params[name]["b"] = (0.5 * rng.standard_normal(D)).astype(dtype)
    x = rng.standard_normal((cfg["B"], cfg["S"], D)).astype(dtype)
    return rng, x, params, make_mask_for(cfg, rng)


# ---------------------------------------------------------------- masks

@given(B=st.integers(1, 3), S=st.integers(1, 6), causal=st.booleans(),
       prefix_frac=st.floats(0, 1), use_valid=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_make_mask_matches_naive_loop(B, S, causal, prefix_frac, use_valid, seed):
    prefix = int(round(prefix_frac * S))
    valid = np.random.default_rng(seed).random((B, S)) < 0.6 if use_valid else None
    got = attention.make_mask(valid, S=S, causal=causal, prefix=prefix)
    assert got.dtype == np.bool_
    assert got.shape == ((B if use_valid else 1), S, S)
    np.testing.assert_array_equal(got, naive_make_mask(valid, S, causal, prefix))


def test_prefix_mask_example():
    # 2 image tokens then 3 caption tokens
    mask = attention.make_mask(S=5, causal=True, prefix=2)[0].astype(int)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0],
                                         [1, 1, 0, 0, 0],
                                         [1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 0],
                                         [1, 1, 1, 1, 1]])


# ---------------------------------------------------------------- forward

@given(cfg=configs())
def test_forward_matches_naive_loop(cfg):
    _, x, params, mask = make_case(cfg)
    y, cache = attention.forward(x, params, cfg["H"], mask)
    y_ref, probs_ref = naive_forward(x, params, cfg["H"], mask)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cache.probs, probs_ref, rtol=1e-10, atol=1e-14)


@given(cfg=configs())
def test_probabilities_sum_to_one_and_are_zero_on_masked_keys(cfg):
    _, x, params, mask = make_case(cfg)
    _, cache = attention.forward(x, params, cfg["H"], mask)
    B, S = cfg["B"], cfg["S"]
    allowed = np.broadcast_to(True if mask is None else mask, (B, S, S))[:, None]  # (B,1,S,S)
    allowed = np.broadcast_to(allowed, cache.probs.shape)
    assert np.all(cache.probs[~allowed] == 0.0)               # exactly zero, not tiny
    assert np.all(cache.probs >= 0.0)
    sums = cache.probs.sum(axis=-1)                            # (B, H, S)
    has_key = allowed.any(axis=-1)                             # (B, H, S)
    np.testing.assert_allclose(sums[has_key], 1.0, rtol=1e-12)
    np.testing.assert_array_equal(sums[~has_key], 0.0)


@given(cfg=configs(kinds=["causal"]), data=st.data())
def test_causal_output_ignores_later_inputs(cfg, data):
    rng, x, params, mask = make_case(cfg)
    t = data.draw(st.integers(0, cfg["S"] - 1), label="t")
    y, _ = attention.forward(x, params, cfg["H"], mask)
    x2 = x.copy()
    x2[:, t + 1:] = 10.0 * rng.standard_normal(x2[:, t + 1:].shape)
    y2, _ = attention.forward(x2, params, cfg["H"], mask)
    np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], rtol=1e-12, atol=1e-12)


def test_causal_property_can_fail_without_the_mask(rng):
    cfg = dict(B=1, S=4, H=2, Dh=2, density=1.0, kind="none", prefix=0, seed=5)
    _, x, params, _ = make_case(cfg)
    y, _ = attention.forward(x, params, 2, None)
    x2 = x.copy()
    x2[:, 3] += 1.0
    y2, _ = attention.forward(x2, params, 2, None)
    assert not np.allclose(y2[:, 0], y[:, 0])


@given(cfg=configs(kinds=["prefix"]), data=st.data())
def test_prefix_causal_dependencies(cfg, data):
    rng, x, params, mask = make_case(cfg)
    S, P, H = cfg["S"], cfg["prefix"], cfg["H"]
    y, _ = attention.forward(x, params, H, mask)
    # the prefix never sees what follows it
    x2 = x.copy()
    x2[:, P:] = 10.0 * rng.standard_normal(x2[:, P:].shape)
    y2, _ = attention.forward(x2, params, H, mask)
    np.testing.assert_allclose(y2[:, :P], y[:, :P], rtol=1e-12, atol=1e-12)
    # a position s >= prefix never sees positions after s
    s = data.draw(st.integers(min(P, S - 1), S - 1), label="s")
    x3 = x.copy()
    x3[:, s + 1:] = 10.0 * rng.standard_normal(x3[:, s + 1:].shape)
    y3, _ = attention.forward(x3, params, H, mask)
    np.testing.assert_allclose(y3[:, :s + 1], y[:, :s + 1], rtol=1e-12, atol=1e-12)
    # ... while the first prefix position does see the last one (bidirectional prefix)
    if P >= 2:
        x4 = x.copy()
        x4[:, P - 1] += 1.0
        y4, _ = attention.forward(x4, params, H, mask)
        assert not np.allclose(y4[:, 0], y[:, 0])


def test_two_and_three_dimensional_masks_agree(rng):
    cfg = dict(B=2, S=4, H=2, Dh=2, density=0.5, kind="none", prefix=0, seed=6)
    _, x, params, _ = make_case(cfg)
    mask2 = rng.random((4, 4)) < 0.5
    y2, _ = attention.forward(x, params, 2, mask2)
    y3, _ = attention.forward(x, params, 2, mask2[None])
    np.testing.assert_array_equal(y2, y3)


def test_fully_masked_row_gives_bias_and_finite_gradients(rng):
    cfg = dict(B=2, S=4, H=2, Dh=3, density=1.0, kind="none", prefix=0, seed=7)
    _, x, params, _ = make_case(cfg)
    mask = np.ones((2, 4, 4), dtype=bool)
    mask[0, 1] = False                                         # query 1 of item 0 sees nothing
    mask[1] = False                                            # item 1 sees nothing at all
    y, cache = attention.forward(x, params, 2, mask)           # RuntimeWarnings are errors
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0, 1], params["o"]["b"])
    np.testing.assert_array_equal(y[1], np.broadcast_to(params["o"]["b"], (4, 6)))
    np.testing.assert_array_equal(cache.probs[0, :, 1], 0.0)
    dx, dparams = attention.backward(rng.standard_normal(y.shape), cache)
    assert np.all(np.isfinite(dx))
    np.testing.assert_array_equal(dx[1], 0.0)                  # item 1 does not reach y
    assert all(np.all(np.isfinite(dparams[n]["W"].data)) for n in "qkvo")
    assert_gradients(attention_case("attention(fully masked rows)", x, params, 2, mask), rng)


@given(cfg=configs(kinds=["padding", "random", "random2d"]))
def test_probabilities_are_the_softmax_op_of_scores_with_masked_keys_at_minus_inf(cfg):
    """One softmax: attention's weights are softmax.forward of the scores with every
    masked key's score set to -inf, bit for bit (fully masked rows: all zeros)."""
    _, x, params, mask = make_case(cfg)
    _, cache = attention.forward(x, params, cfg["H"], mask)
    scores = (cache.q @ cache.k.transpose(0, 1, 3, 2)) * cache.scale    # (B, H, S, S)
    allowed = mask[:, None] if mask.ndim == 3 else mask                 # (B, 1, S, S) or (S, S)
    p, _ = softmax.forward(np.where(allowed, scores, -np.inf), axis=-1)
    np.testing.assert_array_equal(cache.probs, p)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fully_masked_rows_raise_no_floating_point_error(dtype):
    cfg = dict(B=2, S=4, H=2, Dh=3, density=0.5, kind="none", prefix=0, seed=11)
    rng, x, params, _ = make_case(cfg, dtype)
    mask = attention.make_mask(np.array([[True, True, False, False], [False] * 4]), causal=True)
    with warnings.catch_warnings(), np.errstate(divide="raise", over="raise", invalid="raise"):
        warnings.simplefilter("error")
        y, cache = attention.forward(x, params, 2, mask)
        dx, _ = attention.backward(rng.standard_normal(y.shape).astype(dtype), cache)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(cache.probs[1], 0.0)         # item 1: every row masked
    np.testing.assert_array_equal(dx[1], 0.0)
    np.testing.assert_array_equal(y[1], np.broadcast_to(params["o"]["b"], (4, 6)))


def test_large_logits_stay_finite(rng):
    cfg = dict(B=2, S=5, H=1, Dh=4, density=1.0, kind="none", prefix=0, seed=8)
    _, x, params, _ = make_case(cfg)
    for name in "qk":                                          # scores of magnitude ~1e4
        params[name]["W"].data *= 30.0
    mask = attention.make_mask(np.array([[True] * 5, [True, True, False, True, False]]),
                               causal=True)
    y, cache = attention.forward(x, params, 1, mask)
    scores = cache.q @ cache.k.transpose(0, 1, 3, 2) * cache.scale
    assert np.abs(scores).max() > 1e3
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(cache.probs))
    np.testing.assert_allclose(cache.probs.sum(axis=-1), 1.0, rtol=1e-12)
    dx, _ = attention.backward(np.ones_like(y), cache)
    assert np.all(np.isfinite(dx))


def test_init_shapes_and_dtype(rng):
    params = attention.init(rng, 8, 2, density=0.25)
    assert set(params) == {"q", "k", "v", "o"}
    for name in "qkvo":
        assert params[name]["W"].shape == (8, 8)
        assert params[name]["W"].nnz == 8 * 2
        assert params[name]["W"].dtype == np.float32 and params[name]["b"].dtype == np.float32


def test_float32_in_float32_out():
    cfg = dict(B=2, S=3, H=2, Dh=2, density=0.5, kind="causal", prefix=0, seed=9)
    rng, x, params, mask = make_case(cfg, np.float32)
    y, cache = attention.forward(x, params, 2, mask)
    assert y.dtype == np.float32 and cache.probs.dtype == np.float32
    dx, dparams = attention.backward(np.ones_like(y), cache)
    assert dx.dtype == np.float32
    assert all(dparams[n]["W"].dtype == np.float32 and dparams[n]["b"].dtype == np.float32
               for n in "qkvo")
    y64, _ = attention.forward(x.astype(np.float64), make_case(cfg)[2], 2, mask)
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- backward

@given(cfg=configs())
def test_gradients(cfg):
    rng, x, params, mask = make_case(cfg)
    assert_gradients(attention_case(f"attention(mask={cfg['kind']})", x, params, cfg["H"],
                                    mask), rng)


@given(cfg=configs())
def test_key_bias_gradient_is_zero_and_output_ignores_it(cfg):
    rng, x, params, mask = make_case(cfg)
    y, cache = attention.forward(x, params, cfg["H"], mask)
    dy = rng.standard_normal(y.shape)
    _, dparams = attention.backward(dy, cache)
    scale = np.abs(dparams["q"]["W"].data).max(initial=0) + np.abs(dparams["v"]["b"]).max()
    assert np.abs(dparams["k"]["b"]).max() <= 1e-12 * max(1.0, scale)
    shifted = dict(params, k={"W": params["k"]["W"],
                              "b": params["k"]["b"] + rng.standard_normal(x.shape[-1])})
    y2, _ = attention.forward(x, shifted, cfg["H"], mask)
    np.testing.assert_allclose(y2, y, rtol=1e-10, atol=1e-12)


def test_backward_leaves_dy_and_cache_untouched(rng):
    cfg = dict(B=2, S=4, H=2, Dh=2, density=0.5, kind="padding", prefix=0, seed=10)
    _, x, params, mask = make_case(cfg)
    readonly(x, mask, *(params[n]["b"] for n in "qkvo"))
    y, cache = attention.forward(x, params, 2, mask)
    dy = readonly(rng.standard_normal(y.shape))
    saved = [a.copy() for a in (dy, cache.q, cache.k, cache.v, cache.probs)]
    readonly(cache.q, cache.k, cache.v, cache.probs)
    attention.backward(dy, cache)
    for before, after in zip(saved, (dy, cache.q, cache.k, cache.v, cache.probs)):
        np.testing.assert_array_equal(after, before)


# ---------------------------------------------------------------- bad input

def test_bad_x_and_heads(rng):
    params = attention.init(rng, 6, 2, dtype=np.float64)
    msg = r"x must have 3 dimensions \(B, S, D\), got shape \(4, 6\)"
    with pytest.raises(ValueError, match=msg):
        attention.forward(np.zeros((4, 6)), params, 2)
    with pytest.raises(ValueError, match=r"heads must divide the width D=6, got heads=4"):
        attention.forward(np.zeros((1, 4, 6)), params, 4)
    with pytest.raises(ValueError, match=r"heads must divide the width D=6, got heads=4"):
        attention.init(rng, 6, 4)
    msg = r"params\['q'\]\['W'\] must have shape \(D, D\)=\(4, 4\), got \(6, 6\)"
    with pytest.raises(ValueError, match=msg):
        attention.forward(np.zeros((1, 3, 4)), params, 2)
    with pytest.raises(TypeError, match=r"x must have the dtype of params\['q'\]\['W'\] \(float64\), got float32"):
        attention.forward(np.zeros((1, 3, 6), np.float32), params, 2)
    with pytest.raises(ValueError, match=r"x must be finite"):
        attention.forward(np.full((1, 3, 6), np.inf), params, 2)


def test_bad_mask(rng):
    params = attention.init(rng, 4, 2, dtype=np.float64)
    x = np.zeros((2, 3, 4))
    msg = r"mask must be broadcastable to \(B, S, S\)=\(2, 3, 3\), got shape \(2, 3, 4\)"
    with pytest.raises(ValueError, match=msg):
        attention.forward(x, params, 2, np.ones((2, 3, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"mask must be broadcastable .*got shape \(3,\)"):
        attention.forward(x, params, 2, np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match=r"mask must be broadcastable .*got shape \(2, 2, 3, 3\)"):
        attention.forward(x, params, 2, np.ones((2, 2, 3, 3), dtype=bool))
    with pytest.raises(TypeError, match=r"mask must have dtype bool, got float64"):
        attention.forward(x, params, 2, np.ones((3, 3)))


@pytest.mark.parametrize("S", [1, 2, 5])
def test_make_mask_defaults_are_padding_only(S):
    """``make_mask(valid)`` and ``make_mask(S=S)`` with the default ``causal`` and
    ``prefix``: every query sees every valid key, later ones included."""
    rng = np.random.default_rng(S)
    valid = rng.random((3, S)) < 0.6
    valid[0] = True                                              # one item without padding
    got = attention.make_mask(valid)
    np.testing.assert_array_equal(got, attention.make_mask(valid, causal=False, prefix=0))
    np.testing.assert_array_equal(got, np.broadcast_to(valid[:, None, :], (3, S, S)))
    np.testing.assert_array_equal(got, naive_make_mask(valid, S, False, 0))
    assert got[0].all()                                          # query 0 sees key S-1 too
    np.testing.assert_array_equal(attention.make_mask(S=S), np.ones((1, S, S), dtype=bool))


def test_bad_make_mask_arguments():
    with pytest.raises(ValueError, match=r"S must be given when valid is None"):
        attention.make_mask(causal=True)
    with pytest.raises(ValueError, match=r"prefix must be in \[0, 4\], got 5"):
        attention.make_mask(S=4, prefix=5)
    with pytest.raises(TypeError, match=r"valid must have dtype bool, got int64"):
        attention.make_mask(np.ones((2, 3), dtype=np.int64))
    msg = r"valid must have 2 dimensions \(B, S\), got shape \(3,\)"
    with pytest.raises(ValueError, match=msg):
        attention.make_mask(np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match=r"S must equal valid.shape\[1\]=3, got 4"):
        attention.make_mask(np.ones((2, 3), dtype=bool), S=4)
