"""Tests for minivlmoe.ops.token_embed: the lookup and its scatter-add backward."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import token_embed
from minivlmoe.gradcheck import GradcheckCase, assert_gradients

from conftest import readonly


# ---------------------------------------------------------------- naive references

def naive_forward(ids, params):
    B, T = ids.shape
    out = np.zeros((B, T, params["tok"].shape[1]), dtype=params["tok"].dtype)
    for b in range(B):
        for t in range(T):
            out[b, t] = params["tok"][ids[b, t]] + params["pos"][t]
    return out


def naive_backward(dx, ids, V, Tmax):
    """Per id: add up the gradient rows of every position holding that id."""
    B, T, D = dx.shape
    dtok = np.zeros((V, D))
    dpos = np.zeros((Tmax, D))
    for v in range(V):
        for b in range(B):
            for t in range(T):
                if ids[b, t] == v:
                    dtok[v] += dx[b, t]
    for t in range(T):
        for b in range(B):
            dpos[t] += dx[b, t]
    return {"tok": dtok, "pos": dpos}


# The output is linear in each argument taken alone, so a centered difference is exact
# up to round-off (about eps * |L| / h): a large step only makes it more accurate.
H_STEP = 1e-3


# ---------------------------------------------------------------- strategies

@st.composite
def configs(draw):
    """Small vocabularies so that ids repeat; T <= Tmax by construction."""
    Tmax = draw(st.integers(1, 6))
    return dict(
        B=draw(st.integers(1, 3)),
        T=draw(st.integers(1, Tmax)),
        Tmax=Tmax,
        V=draw(st.integers(1, 5)),
        d=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_case(cfg, dtype=np.float64):
    rng = np.random.default_rng(cfg["seed"])
    params = token_embed.init(rng, cfg["V"], cfg["Tmax"], cfg["d"], dtype)
    ids = rng.integers(0, cfg["V"], size=(cfg["B"], cfg["T"]))
    return rng, ids, params


# ---------------------------------------------------------------- forward

@given(cfg=configs())
def test_forward_matches_naive_loop(cfg):
    _, ids, params = make_case(cfg)
    x, _ = token_embed.forward(ids, params)
    np.testing.assert_array_equal(x, naive_forward(ids, params))


def test_init_shapes_and_dtype(rng):
    params = token_embed.init(rng, vocab=11, max_len=7, d=4)
    assert params["tok"].shape == (11, 4) and params["pos"].shape == (7, 4)
    assert params["tok"].dtype == np.float32 and params["pos"].dtype == np.float32
    assert 0 < np.abs(params["tok"]).max() < 0.2


def test_float32_in_float32_out(rng):
    params = token_embed.init(rng, 5, 4, 3)
    ids = np.array([[0, 4, 4]], dtype=np.int32)
    x, cache = token_embed.forward(ids, params)
    assert x.dtype == np.float32
    dparams = token_embed.backward(np.ones_like(x), cache)
    assert dparams["tok"].dtype == np.float32 and dparams["pos"].dtype == np.float32


# ---------------------------------------------------------------- backward

@given(cfg=configs())
def test_backward_matches_naive_per_id_loop(cfg):
    rng, ids, params = make_case(cfg)
    x, cache = token_embed.forward(ids, params)
    dx = rng.standard_normal(x.shape)
    got = token_embed.backward(dx, cache)
    want = naive_backward(dx, ids, cfg["V"], cfg["Tmax"])
    np.testing.assert_allclose(got["tok"], want["tok"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["pos"], want["pos"], rtol=1e-12, atol=1e-12)


def test_repeated_ids_accumulate(rng):
    # every position holds id 2: its gradient row is the sum of all B*T rows of dx
    params = token_embed.init(rng, 4, 5, 3, np.float64)
    ids = np.full((2, 5), 2)
    x, cache = token_embed.forward(ids, params)
    dx = rng.standard_normal(x.shape)
    dtok = token_embed.backward(dx, cache)["tok"]
    np.testing.assert_allclose(dtok[2], dx.sum(axis=(0, 1)))
    np.testing.assert_array_equal(dtok[[0, 1, 3]], 0.0)


@given(cfg=configs())
def test_gradients(cfg):
    rng, ids, params = make_case(cfg)
    assert_gradients(GradcheckCase(
        "token_embed", {"ids": ids, "params": params},
        lambda a: token_embed.forward(a["ids"], a["params"]),
        lambda dout, cache: {"params": token_embed.backward(dout, cache)},
        h=H_STEP), rng)


def test_readonly_inputs_and_dx_untouched(rng):
    params = token_embed.init(rng, 6, 4, 3, np.float64)
    ids = readonly(np.array([[1, 1, 5], [0, 1, 2]]))
    readonly(params["tok"], params["pos"])
    x, cache = token_embed.forward(ids, params)
    dx = readonly(rng.standard_normal(x.shape))
    before = dx.copy()
    token_embed.backward(dx, cache)
    np.testing.assert_array_equal(dx, before)


# ---------------------------------------------------------------- bad input

def test_bad_ids(rng):
    params = token_embed.init(rng, 5, 4, 3)
    with pytest.raises(ValueError, match=r"ids must be in \[0, V=5\), got values in \[0, 5\]"):
        token_embed.forward(np.array([[0, 5]]), params)
    with pytest.raises(ValueError, match=r"ids must be in \[0, V=5\), got values in \[-1, 2\]"):
        token_embed.forward(np.array([[-1, 2]]), params)
    with pytest.raises(ValueError, match=r"ids must have at most max_len=4 .*got T=5"):
        token_embed.forward(np.zeros((1, 5), dtype=int), params)
    with pytest.raises(ValueError, match=r"ids must have 2 dimensions \(B, T\), got shape \(3,\)"):
        token_embed.forward(np.zeros(3, dtype=int), params)
    with pytest.raises(TypeError, match=r"ids must have an integer dtype, got float64"):
        token_embed.forward(np.zeros((1, 2)), params)


def test_bad_params(rng):
    params = token_embed.init(rng, 5, 4, 3)
    ids = np.zeros((1, 2), dtype=int)
    msg = r"params\['pos'\] must have shape \(Tmax, D=3\), got \(4, 2\)"
    with pytest.raises(ValueError, match=msg):
        token_embed.forward(ids, dict(params, pos=np.zeros((4, 2), np.float32)))
    with pytest.raises(TypeError, match=r"params\['pos'\] must have the dtype of params\['tok'\]"):
        token_embed.forward(ids, dict(params, pos=np.zeros((4, 3))))
    with pytest.raises(ValueError, match=r"params\['tok'\] must have 2 dimensions"):
        token_embed.forward(ids, dict(params, tok=np.zeros(5, np.float32)))
    with pytest.raises(ValueError, match=r"vocab must be in \[1, inf\], got 0"):
        token_embed.init(rng, 0, 4, 3)
