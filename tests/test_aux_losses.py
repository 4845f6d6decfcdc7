"""Tests of minivlmoe.moe.aux_losses: gradient checks, naive loop references, properties,
edge cases (N = 0, exact zeros, |logits| = 500) and bad input."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.moe import aux_losses as aux
from minivlmoe.moe import router
from minivlmoe.ops import softmax as softmax_op
from minivlmoe.gradcheck import GradcheckCase, assert_gradients, check_case
from minivlmoe.testing.moe import aux_losses_cases, load_balance_case

SEEDS = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------------------
# helpers and naive loop references (definitions written out token by token)


def softmax(logits):
    """Router probabilities (N, E): the softmax op over the experts."""
    return softmax_op.forward(logits, axis=1)[0]


def top_k_indicator(probs, k):
    """0/1 indicator (N, E) of each row's k largest entries: the library's one top-k
    (router.top_k, lowest index wins ties) and aux.top_k_indicator."""
    return aux.top_k_indicator(router.top_k(probs, k), probs.shape[1])


def naive_top_k_indicator(probs, k):
    """The same indicator built with a loop over tokens: sort by (-prob, index)."""
    assign = np.zeros(probs.shape)
    for n in range(probs.shape[0]):
        for e in sorted(range(probs.shape[1]), key=lambda e: (-probs[n, e], e))[:k]:
            assign[n, e] = 1.0
    return assign


def naive_load_balance(probs, assign, k):
    n_tokens, n_experts = probs.shape
    total = 0.0
    for e in range(n_experts):
        count, prob_sum = 0.0, 0.0
        for n in range(n_tokens):
            count += assign[n, e]
            prob_sum += probs[n, e]
        total += (count / (n_tokens * k)) * (prob_sum / n_tokens)
    return n_experts * total


def naive_importance(probs):
    n_tokens, n_experts = probs.shape
    imp = [sum(probs[n, e] for n in range(n_tokens)) for e in range(n_experts)]
    mean = sum(imp) / n_experts
    var = sum((i - mean) ** 2 for i in imp) / n_experts
    return var / mean**2


def naive_z_loss(logits):
    total = 0.0
    for row in logits:
        lse = math.log(sum(math.exp(v) for v in row))
        total += lse**2
    return total / len(logits)


def naive_entropy(p):
    return -sum(v * math.log(v) for v in p if v > 0)


def naive_entropy_local(probs):
    return sum(naive_entropy(row) for row in probs) / len(probs)


def naive_entropy_global(probs, tau):
    n_tokens, n_experts = probs.shape
    mean = [sum(probs[n, e] for n in range(n_tokens)) / n_tokens for e in range(n_experts)]
    return max(0.0, tau - naive_entropy(mean))


FLOOR = 0.05  # weight of the uniform distribution mixed into the test probs


def floored_softmax(logits):
    """Softmax mixed with 5% of the uniform distribution: rows still sum to 1 and every
    entry is >= 0.05 / E >= 0.01, so a finite-difference step of 1e-6 can neither leave
    the domain p >= 0 nor hit the 1/p curvature of log p (the analogue, for a loss of
    probabilities, of keeping a margin from routing ties)."""
    n_experts = logits.shape[1]
    return (1.0 - FLOOR) * softmax(logits) + FLOOR / n_experts


@st.composite
def router_probs(draw, min_e=1, max_e=5, max_n=6):
    """(probs, logits, k): probs = floored_softmax(logits) of seeded random logits."""
    n_tokens = draw(st.integers(1, max_n))
    n_experts = draw(st.integers(min_e, max_e))
    k = draw(st.integers(1, n_experts))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    rng = np.random.default_rng(draw(SEEDS))
    logits = scale * rng.standard_normal((n_tokens, n_experts))
    return floored_softmax(logits), logits, k


def grad_case(op, key, value, fwd, bwd):
    """GradcheckCase for a loss of one differentiable array ``key``."""
    return GradcheckCase(op, {key: value}, lambda a: fwd(a), lambda d, c: {key: bwd(d, c)})


# ----------------------------------------------------------------------------------------
# forward == naive loop reference


@given(router_probs(), st.booleans())
def test_top_k_indicator_matches_naive_loop_ties_included(case, tied):
    probs, _, k = case
    if tied:                                                     # few distinct values: ties
        probs = np.round(4.0 * probs) / 4.0
    assign = top_k_indicator(probs, k)
    assert assign.dtype == np.float64
    np.testing.assert_array_equal(assign, naive_top_k_indicator(probs, k))
    experts = router.top_k(probs, k)
    got = aux.top_k_indicator(experts, probs.shape[1], np.float32)
    assert got.dtype == np.float32 and got.shape == probs.shape
    np.testing.assert_array_equal(got, assign)


@given(router_probs())
def test_load_balance_matches_naive(case):
    probs, _, k = case
    assign = top_k_indicator(probs, k)
    loss, _ = aux.load_balance_forward(probs, assign, k)
    assert isinstance(loss, float)
    assert loss == pytest.approx(naive_load_balance(probs, assign, k), rel=1e-12)


@given(router_probs())
def test_importance_matches_naive(case):
    probs, _, _ = case
    loss, _ = aux.importance_forward(probs)
    assert loss == pytest.approx(naive_importance(probs), rel=1e-9, abs=1e-14)


@given(router_probs())
def test_z_loss_matches_naive(case):
    _, logits, _ = case
    loss, _ = aux.z_loss_forward(logits)
    assert loss == pytest.approx(naive_z_loss(logits), rel=1e-12)


@given(router_probs())
def test_entropy_local_matches_naive(case):
    probs, _, _ = case
    loss, _ = aux.entropy_local_forward(probs)
    assert loss == pytest.approx(naive_entropy_local(probs), rel=1e-12, abs=1e-15)


@given(router_probs(), st.floats(0.0, 1.0))
def test_entropy_global_matches_naive(case, frac):
    probs, _, _ = case
    tau = frac * math.log(probs.shape[1])
    loss, _ = aux.entropy_global_forward(probs, tau)
    assert loss == pytest.approx(naive_entropy_global(probs, tau), rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------------------
# float64 gradient checks (probs treated as free inputs)


@given(router_probs(), SEEDS)
def test_load_balance_gradient(case, seed):
    probs, _, k = case
    assign = top_k_indicator(probs, k)
    assert_gradients(load_balance_case("load_balance", probs, assign, k),
                     np.random.default_rng(seed))


@given(router_probs(), SEEDS)
def test_importance_gradient(case, seed):
    probs, _, _ = case
    assert_gradients(grad_case("importance", "probs", probs,
                               lambda a: aux.importance_forward(a["probs"]),
                               aux.importance_backward),
                     np.random.default_rng(seed))


@given(router_probs(), SEEDS)
def test_z_loss_gradient(case, seed):
    _, logits, _ = case
    assert_gradients(grad_case("z_loss", "logits", logits,
                               lambda a: aux.z_loss_forward(a["logits"]),
                               aux.z_loss_backward),
                     np.random.default_rng(seed))


@given(router_probs(), SEEDS)
def test_entropy_local_gradient(case, seed):
    probs, _, _ = case
    assert_gradients(grad_case("entropy_local", "probs", probs,
                               lambda a: aux.entropy_local_forward(a["probs"]),
                               aux.entropy_local_backward),
                     np.random.default_rng(seed))


@st.composite
def hinge_case(draw, active):
    """(probs, tau) at least ``margin`` away from the kink tau = H(mean probs).

    Active side: every token gives expert 0 at least 0.7, so H(pbar) <= log E - 0.08 and
    tau is put between H(pbar) + 0.01 and log E.  Inactive side: nearly uniform probs, so H(pbar)
    is near log E, and tau = u * H(pbar) with u <= 0.9."""
    n_tokens = draw(st.integers(1, 6))
    n_experts = draw(st.integers(2, 5))
    rng = np.random.default_rng(draw(SEEDS))
    z = rng.standard_normal((n_tokens, n_experts))
    u = draw(st.floats(0.0, 0.9))
    if active:
        probs = 0.7 * np.eye(n_experts)[0] + 0.3 * floored_softmax(z)  # pbar_0 >= 0.7
        h_mean = naive_entropy(probs.mean(axis=0))
        tau = h_mean + 0.01 + u * (math.log(n_experts) - h_mean - 0.01)
    else:
        probs = floored_softmax(0.5 * z)
        h_mean = naive_entropy(probs.mean(axis=0))
        tau = u * h_mean
    margin = 1e-3
    assert (tau - h_mean > margin) if active else (h_mean - tau > margin)
    return probs, tau


@given(st.booleans().flatmap(lambda active: st.tuples(st.just(active), hinge_case(active))),
       SEEDS)
def test_entropy_global_gradient_both_sides_of_the_hinge(drawn, seed):
    active, (probs, tau) = drawn
    case = grad_case("entropy_global", "probs", probs,
                     lambda a: aux.entropy_global_forward(a["probs"], tau),
                     aux.entropy_global_backward)
    assert_gradients(case, np.random.default_rng(seed))
    loss, cache = aux.entropy_global_forward(probs, tau)
    grad = aux.entropy_global_backward(1.0, cache)
    assert cache.active == active
    if not active:
        assert loss == 0.0
        assert np.array_equal(grad, np.zeros_like(probs))


def test_gradcheck_cases_pass():
    rng = np.random.default_rng(0)
    cases = aux_losses_cases(rng)
    names = " ".join(c.op for c in cases)
    for name in aux.AUX_LOSSES:
        assert name in names
    for case in cases:
        for row in check_case(case, rng):
            assert row.passed, row


# ----------------------------------------------------------------------------------------
# properties: load balance


def balanced_assignment(n_experts, k, reps):
    """N = reps * E tokens; token n picks experts n, n+1, ..., n+k-1 (mod E)."""
    n_tokens = reps * n_experts
    assign = np.zeros((n_tokens, n_experts))
    for n in range(n_tokens):
        for j in range(k):
            assign[n, (n + j) % n_experts] = 1.0
    return assign


@given(st.integers(1, 8).flatmap(lambda e: st.tuples(st.just(e), st.integers(1, e))),
       st.integers(1, 3), st.sampled_from([np.float32, np.float64]))
def test_load_balance_is_one_at_uniform_routing_for_every_k(e_and_k, reps, dtype):
    n_experts, k = e_and_k
    assign = balanced_assignment(n_experts, k, reps)
    probs = np.full(assign.shape, 1.0 / n_experts, dtype=dtype)
    loss, _ = aux.load_balance_forward(probs, assign, k)
    assert loss == pytest.approx(1.0, rel=1e-6 if dtype == np.float32 else 1e-12)
    # the other convention (divide the counts by N only) would give k instead:
    assert k * loss == pytest.approx(naive_load_balance(probs, assign, 1), rel=1e-6)


@given(st.integers(1, 8).flatmap(lambda e: st.tuples(st.just(e), st.integers(1, e))),
       st.integers(1, 5))
def test_load_balance_collapse(e_and_k, n_tokens):
    n_experts, k = e_and_k
    # every token picks experts 0..k-1 with probability 1/k each
    assign = np.zeros((n_tokens, n_experts))
    assign[:, :k] = 1.0
    probs = assign / k
    loss, _ = aux.load_balance_forward(probs, assign, k)
    assert loss == pytest.approx(n_experts / k, rel=1e-12)  # = E for k = 1 (one-hot)


@given(router_probs(min_e=2))
def test_load_balance_above_one_unless_balanced(case):
    probs, _, k = case
    assign = top_k_indicator(probs, k)
    consistent = assign / k  # probs that agree with the assignment: loss = E sum f^2
    loss, cache = aux.load_balance_forward(consistent, assign, k)
    assert loss >= 1.0 - 1e-12
    balanced = np.allclose(cache.f, 1.0 / probs.shape[1])
    assert balanced == (loss < 1.0 + 1e-9)


def test_load_balance_gradient_is_row_constant_and_ignores_probs():
    # f is a count (no gradient): dprobs depends on assign, not on the probs values
    assign = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p1 = softmax(np.arange(9.0).reshape(3, 3))
    p2 = softmax(-np.arange(9.0).reshape(3, 3))
    g1 = aux.load_balance_backward(2.0, aux.load_balance_forward(p1, assign, 1)[1])
    g2 = aux.load_balance_backward(2.0, aux.load_balance_forward(p2, assign, 1)[1])
    assert np.array_equal(g1, g2)
    expected = 2.0 * 3 * np.array([2 / 3, 1 / 3, 0.0]) / 3  # dloss * E * f_e / N
    assert np.allclose(g1, np.tile(expected, (3, 1)), rtol=1e-15, atol=0)


@pytest.mark.parametrize("assign_dtype", [np.float32, np.int8, np.bool_, np.float64])
def test_load_balance_fraction_is_exact_whatever_the_assign_dtype(assign_dtype):
    """f = counts / (N K) in probs' dtype (float64) whatever assign's dtype: with N = 7,
    K = 2 the fractions c / 14 are not float32 numbers, so a float32 f is off by ~1e-8."""
    rng = np.random.default_rng(0)
    probs = softmax(rng.standard_normal((7, 5)))                 # (N, E) float64
    experts = np.argsort(-probs, axis=1)[:, :2]                  # (N, K) distinct
    assign64 = np.zeros((7, 5))
    np.put_along_axis(assign64, experts, 1.0, axis=1)            # (N, E) 0/1
    counts = assign64.sum(axis=0)                                # (E,) exact integers
    loss, cache = aux.load_balance_forward(probs, assign64.astype(assign_dtype), 2)
    assert cache.f.dtype == np.float64
    np.testing.assert_allclose(cache.f, counts / 14, rtol=1e-12, atol=0)
    assert loss == pytest.approx(naive_load_balance(probs, assign64, 2), rel=1e-12, abs=0)
    dprobs = aux.load_balance_backward(1.0, cache)
    assert dprobs.dtype == np.float64
    np.testing.assert_allclose(dprobs, np.tile(5 * counts / 14 / 7, (7, 1)), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------
# properties: importance


@given(st.integers(1, 6), st.integers(1, 3))
def test_importance_zero_when_balanced(n_experts, reps):
    one_hot = np.eye(n_experts)[np.arange(reps * n_experts) % n_experts]
    assert aux.importance_forward(one_hot)[0] == pytest.approx(0.0, abs=1e-15)
    uniform = np.full((reps, n_experts), 1.0 / n_experts)
    assert aux.importance_forward(uniform)[0] == pytest.approx(0.0, abs=1e-15)


@given(st.integers(1, 6), st.integers(1, 4))
def test_importance_is_e_minus_one_at_collapse(n_experts, n_tokens):
    probs = np.zeros((n_tokens, n_experts))
    probs[:, 0] = 1.0
    assert aux.importance_forward(probs)[0] == pytest.approx(n_experts - 1, rel=1e-12)


@given(router_probs(), st.floats(0.1, 10.0), SEEDS)
def test_importance_scale_and_token_permutation_invariant(case, scale, seed):
    probs, _, _ = case
    loss, _ = aux.importance_forward(probs)
    perm = np.random.default_rng(seed).permutation(probs.shape[0])
    assert aux.importance_forward(scale * probs)[0] == pytest.approx(loss, rel=1e-9, abs=1e-15)
    assert aux.importance_forward(probs[perm])[0] == pytest.approx(loss, rel=1e-9, abs=1e-15)


# ----------------------------------------------------------------------------------------
# properties: z-loss


@given(st.integers(1, 5), st.integers(1, 8))
def test_z_loss_at_zero_logits(n_tokens, n_experts):
    loss, _ = aux.z_loss_forward(np.zeros((n_tokens, n_experts)))
    assert loss == pytest.approx(math.log(n_experts) ** 2, rel=1e-12, abs=1e-15)


@given(router_probs(), st.floats(0.01, 5.0))
def test_z_loss_is_not_shift_invariant(case, shift):
    _, logits, _ = case
    centered = logits - logits.mean(axis=1, keepdims=True)  # lse >= log E >= 0 (Jensen)
    before, cache = aux.z_loss_forward(centered)
    after, _ = aux.z_loss_forward(centered + shift)
    assert after > before
    # d loss / d logits does not sum to zero over experts (as it would for a shift
    # invariant function of the logits): each row sums to 2 lse_n / N
    dlogits = aux.z_loss_backward(1.0, cache)
    assert np.allclose(dlogits.sum(axis=1), 2 * cache.lse / len(logits), rtol=1e-12)


# ----------------------------------------------------------------------------------------
# properties: entropies


@given(st.integers(1, 5), st.integers(1, 8))
def test_entropy_local_uniform_and_one_hot(n_tokens, n_experts):
    uniform = np.full((n_tokens, n_experts), 1.0 / n_experts)
    assert aux.entropy_local_forward(uniform)[0] == pytest.approx(math.log(n_experts),
                                                                  rel=1e-12, abs=1e-15)
    one_hot = np.eye(n_experts)[np.arange(n_tokens) % n_experts]
    loss, cache = aux.entropy_local_forward(one_hot)
    assert loss == 0.0
    grad = aux.entropy_local_backward(1.0, cache)
    assert np.all(np.isfinite(grad))
    # the chain rule through a softmax multiplies the zero entries' gradient by p = 0
    dlogits = one_hot * (grad - (grad * one_hot).sum(axis=1, keepdims=True))
    assert np.array_equal(dlogits, np.zeros_like(dlogits))


@given(router_probs(min_e=2), SEEDS)
def test_entropy_global_value_and_descent(case, seed):
    probs, _, _ = case
    h_mean = naive_entropy(probs.mean(axis=0))
    log_e = math.log(probs.shape[1])
    # hinge inactive: tau <= H(pbar)
    for tau in (0.0, 0.5 * h_mean, h_mean - 1e-9):  # (not exactly at the kink: rounding)
        loss, cache = aux.entropy_global_forward(probs, tau)
        assert loss == 0.0
        assert not np.any(aux.entropy_global_backward(1.0, cache))
    # hinge active: tau = log E > H(pbar) (unless probs average to exactly uniform)
    peaked = softmax(np.log(probs) + 3.0 * np.eye(probs.shape[1])[0])
    h_peaked = naive_entropy(peaked.mean(axis=0))
    loss, cache = aux.entropy_global_forward(peaked, log_e)
    assert loss == pytest.approx(log_e - h_peaked, rel=1e-12)
    assert loss > 0
    # a small step against the gradient raises H(pbar) and lowers the loss
    grad = aux.entropy_global_backward(1.0, cache)
    stepped = peaked - 1e-3 * grad
    assert naive_entropy(stepped.mean(axis=0)) > h_peaked
    assert aux.entropy_global_forward(stepped, log_e)[0] < loss


@given(st.integers(1, 6), st.integers(1, 8))
def test_global_threshold(min_experts, n_experts):
    if min_experts > n_experts:
        with pytest.raises(ValueError, match="min_experts"):
            aux.global_threshold(min_experts, n_experts)
    else:
        assert aux.global_threshold(min_experts, n_experts) == pytest.approx(
            math.log(min_experts), abs=1e-15)
        # uniform routing over exactly min_experts experts sits at the kink: loss 0
        probs = np.zeros((min_experts, n_experts))
        probs[np.arange(min_experts), np.arange(min_experts)] = 1.0
        tau = aux.global_threshold(min_experts, n_experts)
        assert aux.entropy_global_forward(probs, tau)[0] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------
# edge cases: N = 0, huge logits, dtype, read-only cache


def all_losses(probs, logits, k, tau):
    """(name, loss, grad) for each loss, with dloss = 1."""
    assign = top_k_indicator(probs, k)
    pairs = [
        ("load_balance", aux.load_balance_forward(probs, assign, k), aux.load_balance_backward),
        ("importance", aux.importance_forward(probs), aux.importance_backward),
        ("z_loss", aux.z_loss_forward(logits), aux.z_loss_backward),
        ("entropy_local", aux.entropy_local_forward(probs), aux.entropy_local_backward),
        ("entropy_global", aux.entropy_global_forward(probs, tau),
         aux.entropy_global_backward),
    ]
    return [(name, loss, bwd(1.0, cache)) for name, (loss, cache), bwd in pairs]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_experts", [1, 4])
def test_empty_batch_gives_zero_loss_and_empty_gradients(dtype, n_experts):
    empty = np.zeros((0, n_experts), dtype=dtype)
    results = all_losses(empty, empty, 1, 0.0)
    assert [r[0] for r in results] == list(aux.AUX_LOSSES)
    for name, loss, grad in results:
        assert loss == 0.0, name
        assert grad.shape == (0, n_experts) and grad.dtype == dtype, name


@given(st.integers(1, 5), st.integers(2, 6), SEEDS)
def test_no_nan_at_logits_of_magnitude_500(n_tokens, n_experts, seed):
    rng = np.random.default_rng(seed)
    logits = 500.0 * rng.choice([-1.0, 1.0], size=(n_tokens, n_experts))
    probs = softmax(logits)  # exact zeros: exp(-1000) underflows
    for name, loss, grad in all_losses(probs, logits, 1, math.log(n_experts)):
        assert math.isfinite(loss), name
        assert np.all(np.isfinite(grad)), name
    # lse of a row = 500 + log(number of entries equal to 500), or -500 + log E
    z_loss, _ = aux.z_loss_forward(logits)
    top = logits.max(axis=1)
    ties = (logits == top[:, None]).sum(axis=1)
    assert z_loss == pytest.approx(np.mean((top + np.log(ties)) ** 2), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_and_losses_are_python_floats(dtype):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 4)).astype(dtype)
    probs = softmax(logits)
    for name, loss, grad in all_losses(probs, logits, 2, 1.0):
        assert type(loss) is float, name
        assert grad.dtype == dtype and grad.shape == probs.shape, name


def test_backward_does_not_write_into_the_cache():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((4, 3))
    probs = softmax(logits + 3.0 * np.eye(3)[0])
    forwards = [
        (aux.load_balance_forward(probs, top_k_indicator(probs, 2), 2),
         aux.load_balance_backward),
        (aux.importance_forward(probs), aux.importance_backward),
        (aux.z_loss_forward(logits), aux.z_loss_backward),
        (aux.entropy_local_forward(probs), aux.entropy_local_backward),
        (aux.entropy_global_forward(probs, math.log(3)), aux.entropy_global_backward),
    ]
    for (_, cache), bwd in forwards:
        for field in cache:
            if isinstance(field, np.ndarray):
                field.flags.writeable = False
        first = bwd(0.5, cache)
        assert np.array_equal(first, bwd(0.5, cache))


# ----------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_naming_the_argument():
    probs = softmax(np.random.default_rng(5).standard_normal((3, 4)))
    assign = top_k_indicator(probs, 2)
    bad = [
        (lambda: aux.load_balance_forward(probs[0], assign[0], 2), ValueError, "probs"),
        (lambda: aux.load_balance_forward(probs, assign[:2], 2), ValueError, "assign"),
        (lambda: aux.load_balance_forward(probs, assign.T, 2), ValueError, "assign"),
        (lambda: aux.load_balance_forward(probs, assign, 0), ValueError, "k"),
        (lambda: aux.load_balance_forward(probs, assign, 5), ValueError, "k"),
        (lambda: aux.load_balance_forward(probs, assign, 1.0), TypeError, "k"),
        (lambda: aux.load_balance_forward(probs, assign, 1), ValueError, "assign.*k=1"),
        (lambda: aux.load_balance_forward(probs, 0.5 * assign, 1), ValueError, "assign"),
        (lambda: aux.load_balance_forward(probs, assign.tolist(), 2), TypeError, "assign"),
        (lambda: aux.importance_forward(probs[None]), ValueError, "probs"),
        (lambda: aux.importance_forward(np.zeros((3, 4))), ValueError, "probs"),
        (lambda: aux.importance_forward(np.zeros((3, 0))), ValueError, "probs"),
        (lambda: aux.z_loss_forward(np.zeros(4)), ValueError, "logits"),
        (lambda: aux.z_loss_forward(np.array([[0.0, np.nan]])), ValueError, "logits"),
        (lambda: aux.z_loss_forward(np.zeros((2, 3), dtype=np.int64)), TypeError, "logits"),
        (lambda: aux.entropy_local_forward(-probs), ValueError, "probs"),
        (lambda: aux.entropy_local_forward(probs.reshape(2, 3, 2)), ValueError, "probs"),
        (lambda: aux.entropy_global_forward(probs, -0.1), ValueError, "tau"),
        (lambda: aux.entropy_global_forward(probs, math.log(4) + 0.01), ValueError, "tau"),
        (lambda: aux.entropy_global_forward(probs[:, :1], 0.5), ValueError, "tau"),
        (lambda: aux.global_threshold(0), ValueError, "min_experts"),
        (lambda: aux.global_threshold(5, num_experts=4), ValueError, "min_experts"),
        (lambda: aux.global_threshold(2.0), TypeError, "min_experts"),
        (lambda: aux.global_threshold(1, num_experts=0), ValueError, "num_experts"),
        (lambda: aux.top_k_indicator(np.array([[0, 4]]), 4), ValueError,
         r"experts must be in \[0, num_experts=4\), got values in \[0, 4\]"),
        (lambda: aux.top_k_indicator(np.array([[-1, 0]]), 4), ValueError, "experts"),
        (lambda: aux.top_k_indicator(np.array([[0.0, 1.0]]), 4), TypeError, "experts"),
        (lambda: aux.top_k_indicator(np.array([0, 1]), 4), ValueError, "experts"),
        (lambda: aux.top_k_indicator(np.array([[0, 1]]), 0), ValueError, "num_experts"),
    ]
    for i, (call, error, name) in enumerate(bad):
        with pytest.raises(error, match=name):
            call()
