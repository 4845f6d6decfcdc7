"""Tests for minivlmoe/moe/dispatch.py: capacity, priority, the plan, dispatch and combine."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.moe import dispatch, router
from minivlmoe.gradcheck import GradcheckCase, assert_gradients

SEEDS = st.integers(0, 2**32 - 1)


@st.composite
def routing_setup(draw):
    """(rng, experts (N, K) distinct per row, top-1 probs (N,), E, capacity, bpr)."""
    rng = np.random.default_rng(draw(SEEDS))
    e = draw(st.integers(1, 5))
    k = draw(st.integers(1, e))
    n = draw(st.integers(1, 12))
    skew = draw(st.floats(0.0, 3.0))                        # unbalanced routers drop more
    scores = rng.standard_normal((n, e)) + skew * np.arange(e)[::-1]
    experts = router.top_k(scores, k)                                   # (N, K)
    top1 = rng.choice(np.linspace(0.2, 1.0, 5), size=n)     # few values: ties in BPR
    cf = draw(st.sampled_from([None, 0.25, 0.5, 1.0, 1.25, 2.0]))
    cap = dispatch.capacity(n, e, k, cf)
    return rng, experts, top1, e, cap, draw(st.booleans())


def naive_plan(experts, top1, e, cap, bpr):
    """The definition: rank by rank, tokens in priority order, first come first served."""
    n, k = experts.shape
    order = sorted(range(n), key=lambda t: (-top1[t], t)) if bpr else list(range(n))
    queue = [0] * e
    kept = np.zeros((n, k), dtype=bool)
    position = np.zeros((n, k), dtype=int)
    for j in range(k):
        for t in order:
            ex = experts[t, j]
            position[t, j] = queue[ex]
            kept[t, j] = queue[ex] < cap
            queue[ex] += 1
    return position, kept


def test_capacity_rounding_and_dropless():
    assert dispatch.capacity(2080, 8, 2, 1.25) == 650
    assert dispatch.capacity(100, 4, 2, 1.1) == 55            # 55.000000000000007 -> 55
    assert dispatch.capacity(10, 4, 1, 1.0) == 3              # ceil(2.5)
    assert dispatch.capacity(10, 4, 1, None) == 10            # dropless: X = N
    assert dispatch.capacity(0, 4, 1, 1.0) == 0


@given(n=st.integers(0, 500), e=st.integers(1, 16), data=st.data())
def test_capacity_formula(n, e, data):
    k = data.draw(st.integers(1, e))
    cf = data.draw(st.floats(0.05, 4.0))
    x = dispatch.capacity(n, e, k, cf)
    assert x == math.ceil(round(cf * k * n / e, 9))
    assert x * e >= cf * k * n - 1e-6                         # never rounds down


@given(routing_setup())
def test_plan_matches_naive_loop(setup):
    rng, experts, top1, e, cap, bpr = setup
    plan = dispatch.make_plan(experts, e, cap, dispatch.priority_order(top1, bpr))
    position, kept = naive_plan(experts, top1, e, cap, bpr)
    np.testing.assert_array_equal(plan.position, position)
    np.testing.assert_array_equal(plan.kept, kept)


@given(routing_setup())
def test_plan_invariants(setup):
    rng, experts, top1, e, cap, bpr = setup
    n, k = experts.shape
    plan = dispatch.make_plan(experts, e, cap, dispatch.priority_order(top1, bpr))
    assert np.all(plan.load <= cap)                           # no expert over capacity
    np.testing.assert_array_equal(plan.load, np.bincount(experts[plan.kept], minlength=e))
    np.testing.assert_array_equal(plan.routed, np.bincount(experts.ravel(), minlength=e))
    for ex in range(e):                                       # first choices before second
        for j in range(k - 1):
            earlier = plan.position[:, j][experts[:, j] == ex]
            later = plan.position[:, j + 1:][experts[:, j + 1:] == ex]
            if earlier.size and later.size:
                assert earlier.max() < later.min()
            if (~plan.kept[:, j][experts[:, j] == ex]).any():  # a rank-j drop at ex ...
                assert not plan.kept[:, j + 1:][experts[:, j + 1:] == ex].any()  # ... no later keep
    # slots: expert blocks, each slot names its (token, rank), CSR rows canonical
    assert plan.num_slots == plan.kept.sum()
    for s in range(plan.num_slots):
        t, j = plan.slot_token[s], plan.slot_rank[s]
        assert plan.slot[t, j] == s and plan.kept[t, j]
        assert plan.offsets[experts[t, j]] <= s < plan.offsets[experts[t, j] + 1]
    assert np.all(plan.slot[~plan.kept] == -1)
    disp = dispatch.dispatch_matrix(plan, np.float64)
    for t in range(n):
        row = disp.indices[disp.indptr[t]:disp.indptr[t + 1]]
        assert np.all(np.diff(row) > 0)
    if cap >= n:                                              # dropless
        assert plan.kept.all() and plan.dropped_fraction == 0.0


def test_bpr_order_is_by_decreasing_top1_with_stable_ties():
    top1 = np.array([0.3, 0.9, 0.3, 0.5, 0.9])
    np.testing.assert_array_equal(dispatch.priority_order(top1, True), [1, 4, 3, 0, 2])
    np.testing.assert_array_equal(dispatch.priority_order(top1, False), [0, 1, 2, 3, 4])


def test_bpr_keeps_the_confident_token():
    experts = np.array([[0], [0], [1]])
    top1 = np.array([0.4, 0.9, 0.8])
    plain = dispatch.make_plan(experts, 2, 1, dispatch.priority_order(top1, False))
    bpr = dispatch.make_plan(experts, 2, 1, dispatch.priority_order(top1, True))
    np.testing.assert_array_equal(plain.kept[:, 0], [True, False, True])
    np.testing.assert_array_equal(bpr.kept[:, 0], [False, True, True])
    np.testing.assert_array_equal(plain.load, bpr.load)        # only *which* token changes


@given(setup=routing_setup(), d=st.integers(1, 4))
def test_dispatch_and_combine_match_dense_one_hot(setup, d):
    """Xs = Disp^T x and y = Comb Ys equal the GShard-style dense (N, E, X) einsums."""
    rng, experts, top1, e, cap, bpr = setup
    n, k = experts.shape
    plan = dispatch.make_plan(experts, e, cap, dispatch.priority_order(top1, bpr))
    x = rng.standard_normal((n, d))
    gates = rng.random((n, k))
    width = max(cap, 1)
    disp = np.zeros((n, e, width))                            # GShard dispatch tensor
    comb = np.zeros((n, e, width))                            # GShard combine tensor
    for t in range(n):
        for j in range(k):
            if plan.kept[t, j]:
                disp[t, experts[t, j], plan.position[t, j]] = 1.0
                comb[t, experts[t, j], plan.position[t, j]] = gates[t, j]
    expert_in = np.einsum("nex,nd->exd", disp, x)             # (E, X, D) padded
    xs, _ = dispatch.dispatch_forward(x, plan)
    for ex in range(e):
        block = xs[plan.offsets[ex]:plan.offsets[ex + 1]]     # compact = padded minus empties
        np.testing.assert_array_equal(block, expert_in[ex, :len(block)])
        assert not expert_in[ex, len(block):].any()
    ys = rng.standard_normal((plan.num_slots, d))
    padded = np.zeros((e, width, d))
    for ex in range(e):
        padded[ex, :plan.load[ex]] = ys[plan.offsets[ex]:plan.offsets[ex + 1]]
    y, _ = dispatch.combine_forward(ys, gates, plan)
    np.testing.assert_allclose(y, np.einsum("nex,exd->nd", comb, padded), atol=1e-12)
    dropped_all = ~plan.kept.any(axis=1)
    assert np.all(y[dropped_all] == 0.0)                      # exactly zero, not small


@given(setup=routing_setup(), d=st.integers(1, 4))
def test_gradients(setup, d):
    rng, experts, top1, e, cap, bpr = setup
    n, k = experts.shape
    plan = dispatch.make_plan(experts, e, cap, dispatch.priority_order(top1, bpr))
    assert_gradients(GradcheckCase(
        "dispatch", {"x": rng.standard_normal((n, d))},
        lambda a: dispatch.dispatch_forward(a["x"], plan),
        lambda dout, cache: {"x": dispatch.dispatch_backward(dout, cache)}), rng)
    if plan.num_slots:
        assert_gradients(GradcheckCase(
            "combine", {"ys": rng.standard_normal((plan.num_slots, d)),
                        "gates": rng.random((n, k))},
            lambda a: dispatch.combine_forward(a["ys"], a["gates"], plan),
            lambda dout, cache: dict(zip(("ys", "gates"), dispatch.combine_backward(dout, cache)))),
            rng)


@given(routing_setup())
def test_dropped_assignments_get_exactly_zero_gate_gradient(setup):
    rng, experts, top1, e, cap, bpr = setup
    n, k = experts.shape
    plan = dispatch.make_plan(experts, e, cap, dispatch.priority_order(top1, bpr))
    ys = rng.standard_normal((plan.num_slots, 3))
    y, cache = dispatch.combine_forward(ys, rng.random((n, k)), plan)
    _, dgates = dispatch.combine_backward(rng.standard_normal(y.shape), cache)
    assert np.all(dgates[~plan.kept] == 0.0)


def test_float32_stays_float32(rng):
    experts = np.array([[0, 1], [1, 0], [0, 1]])
    plan = dispatch.make_plan(experts, 2, 2, np.arange(3))
    x = rng.standard_normal((3, 4)).astype(np.float32)
    xs, dcache = dispatch.dispatch_forward(x, plan)
    y, ccache = dispatch.combine_forward(xs, np.ones((3, 2), np.float32), plan)
    dys, dg = dispatch.combine_backward(y, ccache)
    for a in (xs, y, dys, dg, dispatch.dispatch_backward(dys, dcache)):
        assert a.dtype == np.float32


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"capacity_factor must be in \(0.0, inf\], got 0.0"):
        dispatch.capacity(10, 4, 2, 0.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        dispatch.capacity(10, 4, 2, -1.0)
    with pytest.raises(ValueError, match="num_experts"):
        dispatch.capacity(10, 0, 1, 1.0)
    with pytest.raises(ValueError, match="k must be in"):
        dispatch.capacity(10, 4, 5, 1.0)
    with pytest.raises(ValueError, match="experts must be in"):
        dispatch.make_plan(np.array([[0], [4]]), 4, 2, np.arange(2))
    plan = dispatch.make_plan(np.array([[0], [1]]), 2, 2, np.arange(2))
    with pytest.raises(ValueError, match="x must have 2 rows"):
        dispatch.dispatch_forward(np.zeros((3, 2)), plan)
