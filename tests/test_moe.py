"""Tests for minivlmoe/moe/moe_layer.py and minivlmoe/moe/experts.py: the whole sparse MoE layer."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlmoe.moe import aux_losses, experts, moe_config, moe_layer, router
from minivlmoe.gradcheck import assert_gradients
from minivlmoe.testing.moe import moe_layer_case, naive_pool, separated_inputs
from minivlmoe.testing.ops import naive_ffn
from minivlmoe.tree import flatten

SEEDS = st.integers(0, 2**32 - 1)
ALL_AUX = {name: 0.1 for name in aux_losses.AUX_LOSSES}
NO_AUX = {}
N = 8
ALTERNATING = np.array([0, 1] * (N // 2))                      # image, text, image, ...


def plans(cache):
    """{pool name: Plan} of a forward pass."""
    return {name: c.dispatch.plan for name, _, c, _ in cache.pools if c is not None}


def assert_same_routing(config, modality, x, params, x2, noise_seed=None):
    """Routing decisions (choices and drops) are identical at x and x2."""
    kw = {} if noise_seed is None else dict(rng=np.random.default_rng(noise_seed), train=True)
    p1 = plans(moe_layer.forward(x, params, config, modality, **kw)[2])
    kw = {} if noise_seed is None else dict(rng=np.random.default_rng(noise_seed), train=True)
    p2 = plans(moe_layer.forward(x2, params, config, modality, **kw)[2])
    for name in p1:
        np.testing.assert_array_equal(p1[name].experts, p2[name].experts)
        np.testing.assert_array_equal(p1[name].kept, p2[name].kept)


# ----------------------------------------------------------------------------------------
# gradient checks: every combination of the list, then random shapes


# (renormalize, drops, bpr): an orthogonal array, so every pair of values of these three
# options appears together, for every k in {1, 2, 3} and both modality modes (24 cases).
PATTERNS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
GRID = [(k, *pattern, mode) for k in (1, 2, 3) for pattern in PATTERNS
        for mode in ("shared", "modality")]


@pytest.mark.parametrize("k, renormalize, drops, bpr, mode", GRID,
                         ids=[f"k{k}-{'renorm' if r else 'raw'}-{'drops' if d else 'dropless'}"
                              f"-{'bpr' if b else 'order'}-{m}" for k, r, d, b, m in GRID])
def test_gradients_every_option(k, renormalize, drops, bpr, mode):
    """E = 3, N = 8 (4 per modality).  capacity_factor 0.5 drops by pigeonhole:
    E * ceil(0.5 K N / E) < K N.  Router noise is on (train=True)."""
    rng = np.random.default_rng(GRID.index((k, renormalize, drops, bpr, mode)))
    config = moe_config.MoEConfig(num_experts=3, k=k, capacity_factor=0.5 if drops else None,
                           renormalize=renormalize, task_blind_top1=k == 1 and renormalize,
                           bpr=bpr, mode=mode, min_experts=3,
                           aux_weights=ALL_AUX, noise_std=0.2)
    x, params = separated_inputs(rng, config, N, 3, 2, ALTERNATING, noise_seed=1)
    y, aux, _ = moe_layer.forward(x, params, config, ALTERNATING, rng=np.random.default_rng(1),
                            train=True)
    assert (aux.dropped_fraction > 0) == drops                  # the case is what it says
    assert aux.losses["entropy_global"] > 0                     # the hinge is active
    for sign in (1, -1):                                        # no decision flips at +-h
        assert_same_routing(config, ALTERNATING, x, params,
                            x + sign * 1e-6 * rng.uniform(-1, 1, x.shape), noise_seed=1)
    assert_gradients(moe_layer_case("moe", x, params, config, ALTERNATING, noise_seed=1), rng)


@st.composite
def layer_setup(draw):
    rng = np.random.default_rng(draw(SEEDS))
    e = draw(st.integers(1, 4))
    mode = draw(st.sampled_from(["shared", "modality"]))
    k, renormalize = draw(st.integers(1, e)), draw(st.booleans())
    config = moe_config.MoEConfig(num_experts=e, k=k,
                           capacity_factor=draw(st.sampled_from([None, 0.5, 1.0, 1.5])),
                           renormalize=renormalize, task_blind_top1=k == 1 and renormalize,
                           bpr=draw(st.booleans()),
                           mode=mode, min_experts=draw(st.integers(1, e)),
                           aux_weights=draw(st.sampled_from([ALL_AUX, NO_AUX])))
    n = draw(st.integers(1, 7))
    d = e + draw(st.integers(0, 2))
    hidden = draw(st.integers(1, 3))
    modality = None
    if mode == "modality" or draw(st.booleans()):
        modality = rng.integers(0, 2, size=n)
    x, params = separated_inputs(rng, config, n, d, hidden, modality)
    return rng, x, params, config, modality


@settings(max_examples=6)
@given(layer_setup())
def test_gradients_random_shapes(setup):
    rng, x, params, config, modality = setup
    assert_gradients(moe_layer_case("moe", x, params, config, modality), rng)


# ----------------------------------------------------------------------------------------
# forward against the definition, written with loops


@settings(max_examples=12)
@given(layer_setup())
def test_forward_matches_naive_loop_including_drops(setup):
    rng, x, params, config, modality = setup
    y, aux, cache = moe_layer.forward(x, params, config, modality)
    got = plans(cache)
    if config.mode == "shared":
        want, kept = naive_pool(x, params, config)
        np.testing.assert_array_equal(got["shared"].kept, kept)
    else:
        want = np.zeros_like(x)
        for m, name in enumerate(moe_config.MODALITIES):
            idx = np.flatnonzero(modality == m)
            if idx.size:
                want[idx], kept = naive_pool(x[idx], params[name], config)
                np.testing.assert_array_equal(got[name].kept, kept)
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# invariants


@given(layer_setup())
def test_stats_and_capacity(setup):
    rng, x, params, config, modality = setup
    y, aux, cache = moe_layer.forward(x, params, config, modality)
    total_kept = 0
    for name, plan in plans(cache).items():
        s = aux.stats[name]
        assert np.all(s.load <= s.capacity) and s.capacity == plan.capacity
        np.testing.assert_array_equal(s.load, plan.load)
        np.testing.assert_array_equal(s.routed, np.bincount(plan.experts.ravel(),
                                                            minlength=config.num_experts))
        assert math.isclose(s.dropped_fraction, 1 - plan.kept.sum() / plan.kept.size)
        if s.usage is not None:
            np.testing.assert_array_equal(s.usage.sum(axis=0), s.load)
        total_kept += int(plan.kept.sum())
    assert math.isclose(aux.dropped_fraction, 1 - total_kept / (x.shape[0] * config.k))
    want_total = sum(config.aux_weights[n] * v for n, v in aux.losses.items())
    assert math.isclose(aux.aux_total, want_total, rel_tol=1e-12, abs_tol=1e-15)


@given(layer_setup())
def test_dropped_tokens_and_idle_experts_get_exactly_zero(setup):
    """A fully dropped token: y row 0 and (without aux losses) dx row 0; an expert that
    got no token: all-zero gradients."""
    rng, x, params, config, modality = setup
    config = moe_config.MoEConfig(**{**config.__dict__, "aux_weights": NO_AUX})
    y, aux, cache = moe_layer.forward(x, params, config, modality)
    dx, grads = moe_layer.backward(rng.standard_normal(y.shape), cache, daux_total=0.0)
    pools = ([("shared", np.arange(len(x)), grads)] if config.mode == "shared" else
             [(name, np.flatnonzero(modality == m), grads[name])
              for m, name in enumerate(moe_config.MODALITIES)])
    p = plans(cache)
    for name, idx, g in pools:
        if name not in p:
            for leaf in (g["router"]["W"].data, g["router"]["b"]):
                assert not leaf.any()
            continue
        dropped = idx[~p[name].kept.any(axis=1)]
        assert np.all(y[dropped] == 0.0) and np.all(dx[dropped] == 0.0)
        for e, load in enumerate(p[name].load):
            if load == 0:
                for layer in g["experts"][f"e{e}"].values():
                    assert not layer["W"].data.any() and not layer["b"].any()


@given(layer_setup())
def test_permuting_experts_with_their_weights_leaves_the_output_unchanged(setup):
    rng, x, params, config, modality = setup
    perm = rng.permutation(config.num_experts)

    def permuted(pool):
        w = pool["router"]["W"].toarray()[perm]
        out = {"router": {"W": type(pool["router"]["W"])(w), "b": pool["router"]["b"][perm]},
               "experts": {f"e{i}": pool["experts"][f"e{int(p)}"] for i, p in enumerate(perm)}}
        out["router"]["W"].has_canonical_format = True
        return out

    params2 = (permuted(params) if config.mode == "shared" else
               {name: permuted(params[name]) for name in moe_config.MODALITIES})
    y, aux, _ = moe_layer.forward(x, params, config, modality)
    y2, aux2, _ = moe_layer.forward(x, params2, config, modality)
    np.testing.assert_allclose(y2, y, rtol=1e-10, atol=1e-12)
    assert math.isclose(aux2.aux_total, aux.aux_total, rel_tol=1e-9, abs_tol=1e-12)


@given(layer_setup())
def test_dropless_permuting_tokens_permutes_the_output(setup):
    rng, x, params, config, modality = setup
    config = moe_config.MoEConfig(**{**config.__dict__, "capacity_factor": None})
    perm = rng.permutation(len(x))
    y, _, _ = moe_layer.forward(x, params, config, modality)
    y2, _, _ = moe_layer.forward(x[perm], params, config, None if modality is None else modality[perm])
    np.testing.assert_allclose(y2, y[perm], rtol=1e-12, atol=1e-13)


@given(setup=layer_setup(), shift=st.floats(-30, 30))
def test_adding_a_constant_to_all_logits_changes_no_output(setup, shift):
    rng, x, params, config, modality = setup

    def shifted(pool):
        return {"router": {"W": pool["router"]["W"], "b": pool["router"]["b"] + shift},
                "experts": pool["experts"]}

    params2 = (shifted(params) if config.mode == "shared" else
               {name: shifted(params[name]) for name in moe_config.MODALITIES})
    y, _, _ = moe_layer.forward(x, params, config, modality)
    y2, _, _ = moe_layer.forward(x, params2, config, modality)
    np.testing.assert_allclose(y2, y, rtol=1e-9, atol=1e-12)


@given(layer_setup())
def test_bpr_changes_only_which_tokens_are_dropped(setup):
    rng, x, params, config, modality = setup
    on = moe_config.MoEConfig(**{**config.__dict__, "bpr": True})
    off = moe_config.MoEConfig(**{**config.__dict__, "bpr": False})
    y1, aux1, c1 = moe_layer.forward(x, params, on, modality)
    y0, aux0, c0 = moe_layer.forward(x, params, off, modality)
    p1, p0 = plans(c1), plans(c0)
    same_rows = np.ones(len(x), dtype=bool)
    for name in p1:
        np.testing.assert_array_equal(p1[name].experts, p0[name].experts)  # same choices
        np.testing.assert_array_equal(p1[name].load, p0[name].load)        # same loads
        rows = np.all(p1[name].kept == p0[name].kept, axis=1)
        if config.mode == "shared":
            same_rows &= rows
        else:
            same_rows[np.flatnonzero(modality == moe_config.MODALITIES.index(name))] = rows
    np.testing.assert_allclose(y1[same_rows], y0[same_rows], rtol=1e-12, atol=1e-13)
    assert aux1.losses == aux0.losses                           # losses see choices, not drops
    if config.capacity_factor is None:
        np.testing.assert_array_equal(y1, y0)


@given(seed=SEEDS, e=st.integers(1, 4), n=st.integers(1, 6))
def test_k_equal_e_dropless_is_the_dense_softmax_mixture(seed, e, n):
    rng = np.random.default_rng(seed)
    renormalize = bool(rng.integers(2))
    config = moe_config.MoEConfig(num_experts=e, k=e, capacity_factor=None,
                           renormalize=renormalize, task_blind_top1=e == 1 and renormalize)
    params = moe_layer.init(rng, 3, 4, config, dtype=np.float64)
    x = rng.standard_normal((n, 3))
    y, _, _ = moe_layer.forward(x, params, config)
    logits = x @ params["router"]["W"].toarray().T + params["router"]["b"]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    want = sum(p[:, [i]] * np.stack([naive_ffn(r, params["experts"][f"e{i}"]) for r in x])
               for i in range(e))
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logits_of_magnitude_500_give_no_nan(dtype):
    rng = np.random.default_rng(0)
    config = moe_config.MoEConfig(num_experts=4, k=2, aux_weights=ALL_AUX)
    x, params = separated_inputs(rng, config, 6, 5, 3, dtype=dtype)
    params["router"]["b"] = (500.0 * np.sign(rng.standard_normal(4))).astype(dtype)
    params["router"]["W"].data *= 300
    y, aux, cache = moe_layer.forward(x, params, config)
    assert np.abs(cache.pools[0][2].router.softmax.p).max() <= 1
    dx, grads = moe_layer.backward(np.ones_like(y), cache)
    for a in (y, dx, grads["router"]["W"].data, [aux.aux_total]):
        assert np.all(np.isfinite(a))


def test_float32_in_float32_out():
    rng = np.random.default_rng(0)
    config = moe_config.MoEConfig(num_experts=4, k=2, mode="modality")
    params = moe_layer.init(rng, 6, 8, config)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    modality = np.array([0, 1] * 5)
    y, aux, cache = moe_layer.forward(x, params, config, modality)
    dx, grads = moe_layer.backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == np.float32
    assert grads["text"]["experts"]["e3"]["fc2"]["W"].dtype == np.float32
    assert isinstance(aux.aux_total, float)


@pytest.mark.parametrize("mode", ["shared", "modality"])
def test_float32_with_router_noise_in_training(mode):
    """Router noise is drawn in float64 and must reach the router in x's dtype: a float32
    forward and backward with train=True stays float32 and finite."""
    rng = np.random.default_rng(0)
    config = moe_config.MoEConfig(num_experts=4, k=2, mode=mode, noise_std=0.5,
                                 aux_weights=ALL_AUX)
    params = moe_layer.init(rng, 6, 8, config)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    modality = np.array([0, 1] * 5)
    y, aux, cache = moe_layer.forward(x, params, config, modality,
                                      rng=np.random.default_rng(1), train=True)
    clean, _, _ = moe_layer.forward(x, params, config, modality)
    assert not np.allclose(y, clean)                             # the noise was applied
    dx, grads = moe_layer.backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == np.float32
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)) and np.isfinite(aux.aux_total)
    for path, g in flatten(grads).items():
        values = g.data if sp.issparse(g) else g
        assert values.dtype == np.float32 and np.all(np.isfinite(values)), path


def test_training_noise_is_sample_noise_of_noise_std_per_pool():
    """The layer's router sees ``router.sample_noise(rng, (N_p, E), noise_std)``, drawn
    pool after pool (image then text) from the one generator."""
    rng = np.random.default_rng(0)
    config = moe_config.MoEConfig(num_experts=4, k=2, noise_std=0.3, mode="modality")
    params = moe_layer.init(rng, 5, 6, config, dtype=np.float64)
    x = rng.standard_normal((9, 5))
    modality = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1])
    _, _, cache = moe_layer.forward(x, params, config, modality,
                                    rng=np.random.default_rng(2), train=True)
    draws = np.random.default_rng(2)
    for name, idx, pool_cache, _ in cache.pools:
        noise = router.sample_noise(draws, (len(idx), 4), 0.3, np.float64)
        want, _ = router.forward(x[idx], params[name]["router"], 2, True, noise)
        np.testing.assert_array_equal(pool_cache.router.softmax.p, want.probs)


def test_noise_only_in_training_and_only_from_the_generator():
    rng = np.random.default_rng(0)
    config = moe_config.MoEConfig(num_experts=4, k=2, noise_std=0.5)
    params = moe_layer.init(rng, 5, 6, config, dtype=np.float64)
    x = rng.standard_normal((9, 5))
    clean, _, _ = moe_layer.forward(x, params, config)
    eval_, _, _ = moe_layer.forward(x, params, config, rng=np.random.default_rng(1), train=False)
    np.testing.assert_array_equal(eval_, clean)                 # no noise at evaluation
    a, _, _ = moe_layer.forward(x, params, config, rng=np.random.default_rng(1), train=True)
    b, _, _ = moe_layer.forward(x, params, config, rng=np.random.default_rng(1), train=True)
    np.testing.assert_array_equal(a, b)                         # pure given the generator
    assert not np.allclose(a, clean)
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        moe_layer.forward(x, params, config, train=True)


def test_modality_pools_route_each_modality_to_its_own_experts():
    rng = np.random.default_rng(0)
    config = moe_config.MoEConfig(num_experts=3, k=1, mode="modality")
    params = moe_layer.init(rng, 4, 5, config, dtype=np.float64)
    x = rng.standard_normal((7, 4))
    modality = np.array([0, 0, 1, 0, 1, 1, 1])
    y, aux, cache = moe_layer.forward(x, params, config, modality)
    yt, _, _ = moe_layer.forward(x[modality == 1], params["text"],
                           moe_config.MoEConfig(num_experts=3, k=1), None)
    np.testing.assert_allclose(y[modality == 1], yt, rtol=1e-12)
    assert aux.stats["image"].usage[1].sum() == 0 and aux.stats["text"].usage[0].sum() == 0
    assert aux.stats["image"].load.sum() == 3 and aux.stats["text"].load.sum() == 4
    # a batch without images: the image pool is idle and gets zero gradients
    y, aux, cache = moe_layer.forward(x, params, config, np.ones(7, dtype=int))
    _, grads = moe_layer.backward(np.ones_like(y), cache)
    assert not grads["image"]["experts"]["e0"]["fc1"]["W"].data.any()
    assert aux.stats["image"].load.sum() == 0


def test_a_pool_without_tokens_reports_zero_usage():
    """An idle modality pool reports usage zeros (2, E) like a busy one, never None; a
    shared pool reports zeros when a modality array was given and None when not."""
    rng = np.random.default_rng(0)
    config = moe_config.MoEConfig(num_experts=3, k=1, mode="modality")
    params = moe_layer.init(rng, 4, 5, config, dtype=np.float64)
    x = rng.standard_normal((7, 4))
    _, aux, _ = moe_layer.forward(x, params, config, np.ones(7, dtype=int))  # no image
    image, text = aux.stats["image"], aux.stats["text"]
    assert isinstance(image.usage, np.ndarray) and image.usage.shape == (2, 3)
    assert image.usage.dtype == text.usage.dtype == np.int64
    np.testing.assert_array_equal(image.usage, np.zeros((2, 3)))
    np.testing.assert_array_equal(image.load, np.zeros(3))
    np.testing.assert_array_equal(text.usage, [[0, 0, 0], text.load])
    assert text.usage.sum() == 7
    shared = moe_config.MoEConfig(num_experts=3, k=1)
    p_shared = moe_layer.init(rng, 4, 5, shared, dtype=np.float64)
    _, aux, _ = moe_layer.forward(np.zeros((0, 4)), p_shared, shared, np.zeros(0, dtype=int))
    np.testing.assert_array_equal(aux.stats["shared"].usage, np.zeros((2, 3)))
    assert aux.stats["shared"].usage.shape == (2, 3)
    _, aux, _ = moe_layer.forward(np.zeros((0, 4)), p_shared, shared)
    assert aux.stats["shared"].usage is None                     # no modality array given


def test_shared_mode_splits_entropy_losses_by_modality():
    rng = np.random.default_rng(0)
    config = moe_config.MoEConfig(num_experts=4, k=1, min_experts=4, capacity_factor=None,
                           aux_weights={"entropy_local": 1.0, "entropy_global": 1.0})
    params = moe_layer.init(rng, 5, 6, config, dtype=np.float64)
    x = rng.standard_normal((8, 5))
    modality = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    _, aux, cache = moe_layer.forward(x, params, config, modality)
    probs = cache.pools[0][2].router.softmax.p
    want_local = sum(aux_losses.entropy_local_forward(probs[modality == m])[0] for m in (0, 1))
    want_global = sum(aux_losses.entropy_global_forward(probs[modality == m], math.log(4))[0]
                      for m in (0, 1))
    assert math.isclose(aux.losses["entropy_local"], want_local)
    assert math.isclose(aux.losses["entropy_global"], want_global)
    np.testing.assert_array_equal(aux.stats["shared"].usage.sum(axis=1), [3, 5])


def test_experts_loop_matches_one_ffn_per_block():
    rng = np.random.default_rng(0)
    params = experts.init(rng, 4, 5, 3, dtype=np.float64)
    xs = rng.standard_normal((6, 4))
    offsets = np.array([0, 2, 2, 6])
    ys, _ = experts.forward(xs, offsets, params)
    np.testing.assert_allclose(ys[:2], np.stack([naive_ffn(r, params["e0"]) for r in xs[:2]]))
    np.testing.assert_allclose(ys[2:], np.stack([naive_ffn(r, params["e2"]) for r in xs[2:]]))


# ----------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=0), r"num_experts must be in \[1, inf\], got 0"),
    (dict(num_experts=4, k=0), r"k must be in \[1, num_experts=4\], got 0"),
    (dict(num_experts=4, k=5), r"k must be in \[1, num_experts=4\], got 5"),
    (dict(num_experts=4, capacity_factor=0.0), r"capacity_factor must be in \(0.0, inf\]"),
    (dict(num_experts=4, capacity_factor=-1.0), "capacity_factor"),
    (dict(num_experts=4, noise_std=-0.1), "noise_std"),
    (dict(num_experts=4, mode="both"), "mode must be one of"),
    (dict(num_experts=4, aux_weights={"balance": 1.0}), "aux_weights must have keys"),
    (dict(num_experts=4, aux_weights={"z_loss": -1.0}), r"aux_weights\['z_loss'\]"),
    (dict(num_experts=4, min_experts=0), "min_experts"),
])
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe_config.MoEConfig(**kwargs)


def test_bad_forward_input_names_the_argument():
    rng = np.random.default_rng(0)
    shared = moe_config.MoEConfig(num_experts=3, k=1)
    split = moe_config.MoEConfig(num_experts=3, k=1, mode="modality")
    p_shared = moe_layer.init(rng, 4, 5, shared, dtype=np.float64)
    p_split = moe_layer.init(rng, 4, 5, split, dtype=np.float64)
    x = rng.standard_normal((6, 4))
    with pytest.raises(ValueError, match=r"modality must have shape \(6,\)"):
        moe_layer.forward(x, p_shared, shared, np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="modality must contain only 0 .image. and 1 .text."):
        moe_layer.forward(x, p_split, split, np.array([0, 1, 2, 0, 1, 0]))
    with pytest.raises(ValueError, match="modality must be given"):
        moe_layer.forward(x, p_split, split)
    with pytest.raises(TypeError, match="modality must have an integer dtype"):
        moe_layer.forward(x, p_split, split, np.zeros(6))
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        moe_layer.forward(x, p_shared, moe_config.MoEConfig(num_experts=3, k=1, noise_std=0.3), train=True)
    with pytest.raises(ValueError, match=r"router W must have shape \(3, 5\)"):
        moe_layer.forward(rng.standard_normal((6, 5)), p_shared, shared)
    with pytest.raises(TypeError, match="x must have the dtype"):
        moe_layer.forward(x.astype(np.float32), p_shared, shared)
    with pytest.raises(ValueError, match="dy must have shape"):
        moe_layer.backward(np.zeros((5, 4)), moe_layer.forward(x, p_shared, shared)[2])


@pytest.mark.parametrize("mode", ["shared", "modality"])
def test_no_tokens(mode):
    rng = np.random.default_rng(0)
    config = moe_config.MoEConfig(num_experts=3, k=2, mode=mode, aux_weights=ALL_AUX)
    params = moe_layer.init(rng, 4, 5, config, dtype=np.float64)
    y, aux, cache = moe_layer.forward(np.zeros((0, 4)), params, config, np.zeros(0, dtype=int))
    dx, grads = moe_layer.backward(np.zeros((0, 4)), cache)
    assert y.shape == dx.shape == (0, 4) and aux.aux_total == 0.0
    router_grad = grads["router"] if mode == "shared" else grads["text"]["router"]
    assert not router_grad["W"].data.any()
