"""Cross-entropy: gradients, the loop definition, ignore_index, large logits, bad input."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import cross_entropy
from minivlmoe.gradcheck import GradcheckCase, assert_gradients

from conftest import readonly

IGNORE = -100
LEADS = st.sampled_from([(1,), (4,), (2, 3), (3, 1, 2)])


def make(seed, lead, n_vocab, p_ignore, scale=2.0):
    """Logits with values from a Generator; targets in [0, V), some set to IGNORE."""
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((*lead, n_vocab))
    targets = rng.integers(0, n_vocab, size=lead)
    targets[rng.random(lead) < p_ignore] = IGNORE
    return rng, logits, targets


def naive_cross_entropy(logits, targets, ignore_index=IGNORE):
    """Loop over positions: -log softmax(z)[t] with math.exp / math.log, averaged over kept."""
    z = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    total, count = 0.0, 0
    for n in range(z.shape[0]):
        if t[n] == ignore_index:
            continue
        row = [float(v) for v in z[n]]
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[t[n]]
        count += 1
    return total / count if count else 0.0


def naive_dlogits(logits, targets, ignore_index=IGNORE):
    """(softmax - onehot) / count on kept rows, built one row at a time."""
    z = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    count = int(np.sum(t != ignore_index))
    out = np.zeros(z.shape)
    for n in range(z.shape[0]):
        if t[n] == ignore_index:
            continue
        e = np.exp(z[n] - z[n].max())
        out[n] = e / e.sum()
        out[n, t[n]] -= 1.0
        out[n] /= count
    return out.reshape(logits.shape)


def ce_case(logits, targets, ignore_index=IGNORE):
    return GradcheckCase("cross_entropy", {"logits": logits, "targets": targets},
                         lambda a: cross_entropy.forward(a["logits"], a["targets"], ignore_index),
                         lambda dout, cache: {"logits": cross_entropy.backward(dout, cache)})


@given(seed=st.integers(0, 2**32 - 1), lead=LEADS, n_vocab=st.integers(1, 7),
       p_ignore=st.sampled_from([0.0, 0.3, 1.0]))
def test_gradients(seed, lead, n_vocab, p_ignore):
    # scale 1: with a few saturated rows every gradient could be < 1e-4 (round-off bound)
    rng, logits, targets = make(seed, lead, n_vocab, p_ignore, scale=1.0)
    assert_gradients(ce_case(logits, targets), rng)


@given(seed=st.integers(0, 2**32 - 1), lead=LEADS, n_vocab=st.integers(1, 7),
       p_ignore=st.sampled_from([0.0, 0.3, 0.7]), dloss=st.floats(-3.0, 3.0))
def test_matches_naive_loop(seed, lead, n_vocab, p_ignore, dloss):
    _, logits, targets = make(seed, lead, n_vocab, p_ignore, scale=5.0)
    loss, cache = cross_entropy.forward(logits, targets)
    assert isinstance(loss, float)
    assert loss == pytest.approx(naive_cross_entropy(logits, targets), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(cross_entropy.backward(dloss, cache),
                               dloss * naive_dlogits(logits, targets), rtol=1e-10, atol=1e-14)


@given(seed=st.integers(0, 2**32 - 1), lead=LEADS, n_vocab=st.integers(2, 7))
def test_ignored_rows_get_exactly_zero_gradient_and_do_not_count(seed, lead, n_vocab):
    rng, logits, targets = make(seed, lead, n_vocab, 0.5)
    targets.reshape(-1)[0] = 0                                   # at least one kept row
    loss, cache = cross_entropy.forward(logits, targets)
    dlogits = cross_entropy.backward(1.0, cache)
    ignored = targets == IGNORE
    assert np.all(dlogits[ignored] == 0.0)
    # changing the logits of ignored rows changes neither the loss nor the gradient
    other = logits.copy()
    other[ignored] = 10.0 * rng.standard_normal(other[ignored].shape)
    loss2, cache2 = cross_entropy.forward(other, targets)
    assert loss2 == loss
    np.testing.assert_array_equal(cross_entropy.backward(1.0, cache2), dlogits)
    # the mean runs over kept rows only: kept rows alone give the same loss
    kept = ~ignored
    loss_kept, _ = cross_entropy.forward(logits[kept], targets[kept])
    assert loss_kept == pytest.approx(loss, rel=1e-12)


def test_all_ignored_gives_zero_loss_and_zero_gradient():
    logits = np.random.default_rng(0).standard_normal((2, 3, 5))
    targets = np.full((2, 3), IGNORE)
    loss, cache = cross_entropy.forward(logits, targets)
    assert loss == 0.0 and isinstance(loss, float)
    dlogits = cross_entropy.backward(1.0, cache)
    assert dlogits.shape == logits.shape and np.all(dlogits == 0.0)


def test_known_values_and_gradient_rows_sum_to_zero():
    # uniform logits: loss = log V exactly; gradient rows sum to 0
    loss, cache = cross_entropy.forward(np.zeros((3, 8)), np.array([0, 5, 7]))
    assert loss == pytest.approx(math.log(8.0), rel=1e-15)
    dz = cross_entropy.backward(1.0, cache)
    np.testing.assert_allclose(dz.sum(axis=-1), 0.0, atol=1e-16)
    np.testing.assert_allclose(dz[1], (np.full(8, 1 / 8) - np.eye(8)[5]) / 3)
    # a custom ignore_index that is also a valid class id (pad id 0)
    loss, _ = cross_entropy.forward(np.log(np.array([[0.5, 0.5], [0.25, 0.75]])),
                                    np.array([0, 1]), ignore_index=0)
    assert loss == pytest.approx(-math.log(0.75))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_finite(dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [1e4, 1e4, 1e4]], dtype=dtype)
    targets = np.array([1, 1, 2])
    loss, cache = cross_entropy.forward(logits, targets)
    dz = cross_entropy.backward(1.0, cache)
    assert math.isfinite(loss) and np.all(np.isfinite(dz))
    # row 0: -log p = 2e4; row 1: log 2; row 2: log 3
    assert loss == pytest.approx((2e4 + math.log(2.0) + math.log(3.0)) / 3, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_inputs_untouched(dtype):
    rng, logits, targets = make(0, (2, 3), 5, 0.3)
    logits = readonly(logits.astype(dtype))
    targets = readonly(targets)
    before = logits.copy(), targets.copy()
    loss, cache = cross_entropy.forward(logits, targets)
    dz = cross_entropy.backward(np.float64(1.0), cache)
    assert isinstance(loss, float) and dz.dtype == dtype and dz.shape == logits.shape
    np.testing.assert_array_equal(logits, before[0])
    np.testing.assert_array_equal(targets, before[1])
    assert loss == pytest.approx(naive_cross_entropy(logits, targets),
                                 rel=1e-6 if dtype == np.float32 else 1e-12)
    dz2 = cross_entropy.backward(1.0, cache)
    np.testing.assert_array_equal(dz, dz2)                       # cache not mutated


def test_unsigned_targets_and_single_position():
    loss, cache = cross_entropy.forward(np.array([0.0, 1.0, 2.0]), np.array(2, dtype=np.uint8))
    assert loss == pytest.approx(naive_cross_entropy(np.array([[0.0, 1.0, 2.0]]), np.array([2])))
    assert cross_entropy.backward(1.0, cache).shape == (3,)


@pytest.mark.parametrize("logits, targets, kwargs, error, match", [
    (np.array(1.0), np.array(0), {}, ValueError, r"logits must have shape \(\.\.\., V\)"),
    (np.zeros((2, 0)), np.zeros(2, int), {}, ValueError, r"logits must have shape \(\.\.\., V\)"),
    (np.zeros((2, 3)), np.zeros(3, int), {}, ValueError,
     r"targets must have shape \(2,\) \(the logits' leading axes\), got \(3,\)"),
    (np.zeros((2, 3)), np.zeros((2, 1), int), {}, ValueError, "targets must have shape"),
    (np.zeros((2, 3)), np.array([0, 3]), {}, ValueError,
     r"targets must be in \[0, V=3\) or equal ignore_index=-100, got 3 at index \(1,\)"),
    (np.zeros((2, 3)), np.array([-1, 0]), {}, ValueError, r"got -1 at index \(0,\)"),
    (np.zeros((2, 3)), np.array([-100, 0]), {"ignore_index": -1}, ValueError,
     "equal ignore_index=-1, got -100"),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), {}, TypeError,
     "targets must have an integer dtype, got float64"),
    (np.array([[0.0, np.nan, 1.0]]), np.array([0]), {}, ValueError, "logits must be finite"),
    (np.array([[0.0, -np.inf, 1.0]]), np.array([0]), {}, ValueError, "logits must be finite"),
    (np.zeros((2, 3)), [0, 1], {}, TypeError, "targets must be a numpy.ndarray, got list"),
    (np.zeros((2, 3)), np.array([0, 1]), {"ignore_index": 1.5}, TypeError,
     "ignore_index must be an int, got float"),
])
def test_bad_input(logits, targets, kwargs, error, match):
    with pytest.raises(error, match=match):
        cross_entropy.forward(logits, targets, **kwargs)
