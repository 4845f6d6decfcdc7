"""AdamW, its schedule and gradient clipping (minivlmoe/optim.py)."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe import optim
from minivlmoe.ops import sparse_linear
from minivlmoe.tree import flatten, tree_map
from minivlmoe.optim import AdamWConfig

# Paths of make_tree() that decay, written out by hand (not derived from optim.decays).
DECAYED = {"enc.W", "head.W", "embed.tok"}


def make_tree(rng, d_in, d_out, density, dtype):
    """A small parameter-like tree: a sparse weight, a dense weight and non-decayed leaves."""
    enc = sparse_linear.init(rng, d_in, d_out, density, dtype=dtype)
    enc["b"] = rng.standard_normal(d_out).astype(dtype)
    return {
        "enc": enc,
        "head": {"W": rng.standard_normal((2, d_out)).astype(dtype)},
        "embed": {"tok": rng.standard_normal((4, d_in)).astype(dtype),
                  "pos": rng.standard_normal((3, d_in)).astype(dtype)},
        "ln": {"gamma": np.ones(d_in, dtype), "beta": np.zeros(d_in, dtype)},
        "log_logit_scale": np.array(0.5, dtype),
    }


def grads_like(params, rng, scale=1.0):
    """Random gradients with the structure (and sparse patterns) of ``params``."""
    def one(w):
        if isinstance(w, sp.csr_array):
            g = sp.csr_array(((scale * rng.standard_normal(w.nnz)).astype(w.dtype),
                              w.indices.copy(), w.indptr.copy()), shape=w.shape)
            g.has_canonical_format = True
            return g
        return np.asarray(scale * rng.standard_normal(w.shape), dtype=w.dtype)
    return {k: grads_like(v, rng, scale) if isinstance(v, dict) else one(v)
            for k, v in params.items()}


def values_of(tree):
    """{path: flat float list} of every leaf's values (csr: its stored entries)."""
    return {p: [float(x) for x in np.ravel(leaf.data if isinstance(leaf, sp.csr_array) else leaf)]
            for p, leaf in flatten(tree).items()}


def naive_lr(t, cfg):
    if t < cfg.warmup_steps:
        return cfg.lr * t / cfg.warmup_steps
    if cfg.total_steps == cfg.warmup_steps:
        frac = 1.0
    else:
        frac = min(1.0, (t - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def naive_adamw(weights, grad_steps, cfg):
    """Reference: AdamW one scalar at a time, in Python floats."""
    w = {p: list(vals) for p, vals in weights.items()}
    m = {p: [0.0] * len(vals) for p, vals in weights.items()}
    v = {p: [0.0] * len(vals) for p, vals in weights.items()}
    b1, b2 = cfg.betas
    for t, grads in enumerate(grad_steps, start=1):
        lr = naive_lr(t, cfg)
        norm = math.sqrt(sum(g * g for vals in grads.values() for g in vals))
        scale = 1.0
        if cfg.max_grad_norm is not None and norm > cfg.max_grad_norm:
            scale = cfg.max_grad_norm / norm
        for p in w:
            for i in range(len(w[p])):
                g = grads[p][i] * scale
                m[p][i] = b1 * m[p][i] + (1 - b1) * g
                v[p][i] = b2 * v[p][i] + (1 - b2) * g * g
                m_hat = m[p][i] / (1 - b1 ** t)
                v_hat = v[p][i] / (1 - b2 ** t)
                if p in DECAYED:
                    w[p][i] -= lr * cfg.weight_decay * w[p][i]
                w[p][i] -= lr * m_hat / (math.sqrt(v_hat) + cfg.eps)
    return w


configs = st.builds(
    lambda lr, wd, warmup, extra, clip, b1, b2: AdamWConfig(
        lr=lr, weight_decay=wd, warmup_steps=warmup, total_steps=warmup + extra,
        max_grad_norm=clip, betas=(b1, b2), min_lr_ratio=0.2),
    lr=st.sampled_from([1e-3, 0.05]), wd=st.sampled_from([0.0, 0.1]),
    warmup=st.integers(0, 3), extra=st.integers(1, 4),
    clip=st.sampled_from([None, 0.5, 100.0]),
    b1=st.sampled_from([0.0, 0.9]), b2=st.sampled_from([0.5, 0.999]))
shapes = st.tuples(st.integers(1, 6), st.integers(1, 5), st.sampled_from([0.3, 1.0]))


@given(seed=st.integers(0, 2**32 - 1), shape=shapes, cfg=configs, n_steps=st.integers(1, 4))
def test_step_matches_naive_loop_float64(seed, shape, cfg, n_steps):
    rng = np.random.default_rng(seed)
    params = make_tree(rng, *shape, np.float64)
    start = values_of(params)
    state = optim.init_state(params)
    grad_steps = [grads_like(params, rng) for _ in range(n_steps)]
    for t, grads in enumerate(grad_steps, start=1):
        info = optim.step(params, grads, state, cfg)
        assert info["lr"] == pytest.approx(naive_lr(t, cfg), rel=1e-15, abs=0)
        assert info["grad_norm"] == pytest.approx(
            math.sqrt(sum(g * g for vals in values_of(grads).values() for g in vals)), rel=1e-12)
    assert state["step"] == n_steps
    expected = naive_adamw(start, [values_of(g) for g in grad_steps], cfg)
    got = values_of(params)
    for path in expected:
        np.testing.assert_allclose(got[path], expected[path], rtol=1e-10, atol=1e-12,
                                   err_msg=path)


def cast(tree, dtype):
    """A deep copy of ``tree`` with every value cast to ``dtype`` (csr patterns copied)."""
    def one(leaf):
        if isinstance(leaf, sp.csr_array):
            out = sp.csr_array((leaf.data.astype(dtype), leaf.indices.copy(), leaf.indptr.copy()),
                               shape=leaf.shape)
            out.has_canonical_format = True
            return out
        return leaf.astype(dtype)
    return tree_map(one, tree)


@given(seed=st.integers(0, 2**32 - 1), shape=shapes, cfg=configs)
def test_float32_keeps_dtype_and_tracks_float64(seed, shape, cfg):
    rng = np.random.default_rng(seed)
    p64 = make_tree(rng, *shape, np.float64)
    p32 = cast(p64, np.float32)
    s64, s32 = optim.init_state(p64), optim.init_state(p32)
    for _ in range(3):
        g64 = grads_like(p64, rng)
        optim.step(p64, g64, s64, cfg)
        optim.step(p32, cast(g64, np.float32), s32, cfg)
    for tree in (p32, s32["m"], s32["v"]):
        for path, leaf in flatten(tree).items():
            assert leaf.dtype == np.float32, path
    v32, v64 = values_of(p32), values_of(p64)
    for path in v64:
        np.testing.assert_allclose(v32[path], v64[path], rtol=1e-4, atol=1e-5, err_msg=path)


def test_update_is_in_place_and_pattern_never_changes(rng):
    params = make_tree(rng, 6, 5, 0.3, np.float64)
    W = params["enc"]["W"]
    leaves_before = {p: id(leaf) for p, leaf in flatten(params).items()}
    data, indices, indptr = W.data, W.indices.copy(), W.indptr.copy()
    state = optim.init_state(params)
    cfg = AdamWConfig(lr=0.1, warmup_steps=0, total_steps=5)
    for _ in range(5):
        optim.step(params, grads_like(params, rng), state, cfg)
    assert {p: id(leaf) for p, leaf in flatten(params).items()} == leaves_before
    assert params["enc"]["W"].data is data
    assert W.indices.tobytes() == indices.tobytes() and W.indptr.tobytes() == indptr.tobytes()
    assert W.nnz == indices.size and W.has_canonical_format
    assert state["m"]["enc"]["W"].shape == (W.nnz,)


def test_decay_only_on_documented_leaves(rng):
    params = make_tree(rng, 4, 3, 1.0, np.float64)
    before = values_of(params)
    zero = grads_like(params, rng, scale=0.0)            # no Adam step: m = v = 0
    cfg = AdamWConfig(lr=0.5, weight_decay=0.1, warmup_steps=0, total_steps=10)
    info = optim.step(params, zero, optim.init_state(params), cfg)
    factor = 1 - info["lr"] * 0.1
    after = values_of(params)
    for path in before:
        want = [x * factor for x in before[path]] if path in DECAYED else before[path]
        np.testing.assert_allclose(after[path], want, rtol=1e-15, err_msg=path)
    assert {p for p in before if optim.decays(p)} == DECAYED


@pytest.mark.parametrize("path, decayed", [
    ("blocks.0.attn.qkv.W", True), ("W", True), ("embed.tok", True), ("moe.experts.3.W", True),
    ("blocks.0.attn.qkv.b", False), ("ln1.gamma", False), ("ln1.beta", False),
    ("embed.cls", False), ("embed.pos", False), ("log_logit_scale", False), ("tok.pos", False),
    ("Wq", False)])
def test_decays_rule(path, decayed):
    assert optim.decays(path) is decayed


def test_first_step_moves_each_value_by_lr_times_sign(rng):
    """Bias correction: at t=1, m_hat = g and v_hat = g^2, so the step is lr*g/(|g|+eps)."""
    params = make_tree(rng, 5, 4, 0.5, np.float64)
    before = values_of(params)
    grads = grads_like(params, rng)
    cfg = AdamWConfig(lr=0.01, weight_decay=0.0, warmup_steps=0, total_steps=100, eps=1e-12,
                      max_grad_norm=None)
    lr = optim.step(params, grads, optim.init_state(params), cfg)["lr"]
    g, after = values_of(grads), values_of(params)
    for path in before:
        np.testing.assert_allclose(np.subtract(before[path], after[path]),
                                   lr * np.sign(g[path]), rtol=1e-8, err_msg=path)


def test_schedule_key_values():
    cfg = AdamWConfig(lr=0.1, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert optim.lr_at(0, cfg) == 0.0
    assert optim.lr_at(5, cfg) == pytest.approx(0.05)
    assert optim.lr_at(10, cfg) == pytest.approx(0.1)                  # peak
    assert optim.lr_at(60, cfg) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))  # half-way down
    assert optim.lr_at(110, cfg) == pytest.approx(0.01)                # floor
    assert optim.lr_at(10_000, cfg) == pytest.approx(0.01)             # stays there
    no_warmup = AdamWConfig(lr=0.1, warmup_steps=0, total_steps=4, min_lr_ratio=0.0)
    assert optim.lr_at(0, no_warmup) == pytest.approx(0.1)
    assert optim.lr_at(4, no_warmup) == pytest.approx(0.0, abs=1e-18)
    flat = AdamWConfig(lr=0.1, warmup_steps=3, total_steps=3)
    assert [optim.lr_at(t, flat) for t in range(5)] == pytest.approx(
        [0, 0.1 / 3, 0.2 / 3, 0.01, 0.01])


@given(warmup=st.integers(0, 20), extra=st.integers(1, 50), ratio=st.floats(0, 1))
def test_schedule_shape(warmup, extra, ratio):
    cfg = AdamWConfig(lr=2.0, warmup_steps=warmup, total_steps=warmup + extra, min_lr_ratio=ratio)
    lrs = np.array([optim.lr_at(t, cfg) for t in range(warmup + extra + 3)])
    assert np.all(np.diff(lrs[:warmup + 1]) > 0)                     # rises during warmup
    assert np.all(np.diff(lrs[warmup:]) <= 1e-15)                     # never rises afterwards
    assert lrs.max() == pytest.approx(2.0) and lrs[-1] == pytest.approx(2.0 * ratio)


@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       max_norm=st.sampled_from([0.1, 1.0, 5.0]))
def test_clip_by_global_norm(seed, scale, max_norm):
    rng = np.random.default_rng(seed)
    grads = grads_like(make_tree(rng, 5, 4, 0.5, np.float64), rng, scale)
    for leaf in flatten(grads).values():                                # inputs read-only
        (leaf.data if isinstance(leaf, sp.csr_array) else leaf).flags.writeable = False
    before = values_of(grads)
    clipped, norm = optim.clip_by_global_norm(grads, max_norm)
    naive_norm = math.sqrt(sum(x * x for vals in before.values() for x in vals))
    assert norm == pytest.approx(naive_norm, rel=1e-12)
    assert values_of(grads) == before                                    # input untouched
    after = values_of(clipped)
    new_norm = optim.global_norm(clipped)
    assert new_norm <= max_norm * (1 + 1e-12)
    factor = min(1.0, max_norm / naive_norm)                             # one factor for all
    for path in before:
        np.testing.assert_allclose(after[path], np.multiply(before[path], factor), rtol=1e-12)
    if naive_norm <= max_norm:
        assert after == before                                           # no-op below
    W, cW = flatten(grads)["enc.W"], flatten(clipped)["enc.W"]
    assert np.array_equal(W.indices, cW.indices) and np.array_equal(W.indptr, cW.indptr)


def test_step_clips_like_clip_by_global_norm(rng):
    params = make_tree(rng, 4, 3, 0.5, np.float64)
    twin = cast(params, np.float64)
    grads = grads_like(params, rng, scale=10.0)
    clipped, norm = optim.clip_by_global_norm(grads, 0.3)
    kw = dict(lr=0.01, warmup_steps=0, total_steps=3)
    info = optim.step(params, grads, optim.init_state(params),
                      AdamWConfig(max_grad_norm=0.3, **kw))
    optim.step(twin, clipped, optim.init_state(twin), AdamWConfig(max_grad_norm=None, **kw))
    assert info["grad_norm"] == norm > 0.3
    assert values_of(params) == values_of(twin)


def test_deterministic(rng):
    runs = []
    for _ in range(2):
        r = np.random.default_rng(7)
        params = make_tree(r, 5, 4, 0.3, np.float32)
        state = optim.init_state(params)
        cfg = AdamWConfig(lr=0.01, warmup_steps=1, total_steps=4)
        for _ in range(4):
            optim.step(params, grads_like(params, r), state, cfg)
        runs.append(values_of(params))
    assert runs[0] == runs[1]


def test_bad_pattern_names_leaf_and_changes_nothing(rng):
    params = make_tree(rng, 6, 4, 0.5, np.float64)
    grads = grads_like(params, rng)
    W = grads["enc"]["W"]
    shifted = sp.csr_array((W.data, (W.indices + 1) % 6, W.indptr), shape=W.shape)
    shifted.sort_indices()
    grads["enc"]["W"] = shifted
    before, state = values_of(params), optim.init_state(params)
    cfg = AdamWConfig(warmup_steps=0, total_steps=2)
    with pytest.raises(ValueError, match=r"grads\['enc\.W'\].*sparsity pattern"):
        optim.step(params, grads, state, cfg)
    assert values_of(params) == before and state["step"] == 0


@pytest.mark.parametrize("mutate, error, match", [
    (lambda g: g["embed"].pop("pos"), ValueError, r"grads .*missing \['embed\.pos'\]"),
    (lambda g: g.update(extra=np.zeros(2)), ValueError, r"unexpected \['extra'\]"),
    (lambda g: g["head"].update(W=g["head"]["W"].astype(np.float32)), TypeError,
     r"grads\['head\.W'\].*dtype"),
    (lambda g: g["head"].update(W=g["head"]["W"][:1]), ValueError, r"grads\['head\.W'\].*shape"),
    (lambda g: g["enc"].update(W=g["enc"]["W"].toarray()), TypeError, r"grads\['enc\.W'\]"),
    (lambda g: g["ln"]["gamma"].__setitem__(0, np.nan), ValueError,
     r"grads\['ln\.gamma'\].*finite"),
])
def test_bad_grads(rng, mutate, error, match):
    params = make_tree(rng, 4, 3, 0.5, np.float64)
    grads = grads_like(params, rng)
    mutate(grads)
    before, state = values_of(params), optim.init_state(params)
    with pytest.raises(error, match=match):
        optim.step(params, grads, state, AdamWConfig(warmup_steps=0, total_steps=2))
    assert values_of(params) == before


def test_bad_state_and_cfg(rng):
    params = make_tree(rng, 4, 3, 0.5, np.float64)
    grads = grads_like(params, rng)
    cfg = AdamWConfig(warmup_steps=0, total_steps=2)
    state = optim.init_state(params)
    state["m"]["head"]["W"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"state\['m'\]\['head\.W'\]"):
        optim.step(params, grads, state, cfg)
    with pytest.raises(ValueError, match="state must be a dict with keys"):
        optim.step(params, grads, {"m": {}}, cfg)
    with pytest.raises(TypeError, match="cfg must be an AdamWConfig"):
        optim.step(params, grads, optim.init_state(params), {"lr": 1e-3})
    with pytest.raises(TypeError, match=r"params\['x'\].*csr_array"):
        optim.init_state({"x": [1.0, 2.0]})


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr must be in"), (dict(lr=-1.0), "lr must be in"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must be in"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(eps=0.0), "eps must be in"), (dict(weight_decay=-0.1), "weight_decay must be in"),
    (dict(warmup_steps=-1), "warmup_steps must be in"),
    (dict(warmup_steps=5, total_steps=4), r"total_steps must be in \[5"),
    (dict(total_steps=0), "total_steps must be in"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio must be in"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be in"),
])
def test_config_validation(kwargs, match):
    full = dict(warmup_steps=0, total_steps=10) | kwargs
    with pytest.raises(ValueError, match=match):
        AdamWConfig(**full)


def test_config_types():
    with pytest.raises(TypeError, match="warmup_steps must be an int"):
        AdamWConfig(warmup_steps=1.5, total_steps=10)
    with pytest.raises(TypeError, match="max_grad_norm must be a real number"):
        AdamWConfig(warmup_steps=0, total_steps=10, max_grad_norm="1")
    with pytest.raises(TypeError):
        AdamWConfig(total_steps=10)                                     # warmup_steps required
    cfg = AdamWConfig(betas=[0.8, 0.9], warmup_steps=0, total_steps=1)
    assert cfg.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="step must be in"):
        optim.lr_at(-1, cfg)
    with pytest.raises(ValueError, match="max_norm must be in"):
        optim.clip_by_global_norm({}, 0.0)
