"""Contrastive (InfoNCE) loss: gradients, the loop definition, positives, properties, bad input."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import contrastive
from minivlmoe.ops.contrastive import LOG_LOGIT_SCALE_INIT, duplicate_positives
from minivlmoe.gradcheck import assert_gradients
from minivlmoe.testing.ops import contrastive_case, unit_rows

from conftest import readonly


def make(seed, b, d, dtype=np.float64):
    """Unit rows and a moderate logit scale exp(log_logit_scale) in [0.6, 4.5]: with a
    large scale and B = 2 both softmaxes saturate, every gradient drops below ~1e-4 and
    the centered difference's round-off (~1e-10) exceeds 1e-6 of it.  Large logits are
    tested apart."""
    rng = np.random.default_rng(seed)
    img = unit_rows(rng.standard_normal((b, d))).astype(dtype)
    txt = unit_rows(rng.standard_normal((b, d))).astype(dtype)
    log_logit_scale = np.array(rng.uniform(-0.5, 1.5), dtype=dtype)
    return rng, img, txt, log_logit_scale


def naive_contrastive(img, txt, log_logit_scale, positives=None):
    """Explicit loops: per-row and per-column log-sum-exp, uniform targets over positives."""
    b = img.shape[0]
    pos = np.eye(b, dtype=bool) if positives is None else positives
    s = math.exp(float(log_logit_scale))
    logits = [[s * sum(float(img[i, k]) * float(txt[j, k]) for k in range(img.shape[1]))
               for j in range(b)] for i in range(b)]

    def lse(values):
        m = max(values)
        return m + math.log(sum(math.exp(v - m) for v in values))

    i2t = 0.0
    for i in range(b):                                           # image i over captions j
        js = [j for j in range(b) if pos[i, j]]
        i2t += lse(logits[i]) - sum(logits[i][j] for j in js) / len(js)
    t2i = 0.0
    for j in range(b):                                           # caption j over images i
        column = [logits[i][j] for i in range(b)]
        is_ = [i for i in range(b) if pos[i, j]]
        t2i += lse(column) - sum(logits[i][j] for i in is_) / len(is_)
    return 0.5 * (i2t / b + t2i / b)


def staged_backward(dloss, img, txt, log_logit_scale, positives):
    """The backward one primitive per line (docs/ops/contrastive.md)."""
    b = img.shape[0]
    pos = positives.astype(float)
    s = np.exp(log_logit_scale)
    sim = img @ txt.T
    logits = s * sim
    # loss = 0.5 * (loss_i2t + loss_t2i)
    dloss_i2t = dloss_t2i = 0.5 * dloss
    # loss_i2t = mean_i (lse_row_i - <Qr_i, logits_i>)
    dlse_row = np.full(b, dloss_i2t / b)
    dlogits = -(dloss_i2t / b) * pos / pos.sum(1, keepdims=True)
    # lse_row = logsumexp over j
    p_row = np.exp(logits - logits.max(1, keepdims=True))
    p_row /= p_row.sum(1, keepdims=True)
    dlogits = dlogits + dlse_row[:, None] * p_row
    # loss_t2i = mean_j (lse_col_j - <Qc_j, logits_j>)
    dlse_col = np.full(b, dloss_t2i / b)
    dlogits = dlogits - (dloss_t2i / b) * pos / pos.sum(0, keepdims=True)
    p_col = np.exp(logits - logits.max(0, keepdims=True))
    p_col /= p_col.sum(0, keepdims=True)
    dlogits = dlogits + dlse_col[None, :] * p_col
    # logits = s * sim
    ds = np.sum(dlogits * sim)
    dsim = s * dlogits
    # sim = img @ txt.T
    dimg = dsim @ txt
    dtxt = dsim.T @ img
    # s = exp(log_logit_scale)
    dlog_logit_scale = ds * s
    return dimg, dtxt, dlog_logit_scale


def keys_strategy(max_b=6):
    """Caption ids with duplicates: B ids drawn from a small range."""
    return st.integers(1, max_b).flatmap(
        lambda b: st.lists(st.integers(0, max(1, b // 2)), min_size=b, max_size=b))


# D >= 2: unit rows in D = 1 are +-1, so equal rows (and an exactly zero true gradient,
# which round-off of 1e-16 in the analytic value "fails" against) are common.
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 6), d=st.integers(2, 5),
       duplicates=st.booleans())
def test_gradients(seed, b, d, duplicates):
    rng, img, txt, log_logit_scale = make(seed, b, d)
    positives = duplicate_positives(rng.integers(0, max(1, b // 2), b)) if duplicates else None
    assert_gradients(contrastive_case("contrastive", img, txt, log_logit_scale, positives), rng)


@given(seed=st.integers(0, 2**32 - 1), b=st.integers(2, 5), d=st.integers(2, 4))
def test_gradients_unnormalized_inputs(seed, b, d):
    # the op does not normalize: any embeddings are valid inputs
    rng, img, txt, log_logit_scale = make(seed, b, d)
    img = img * rng.uniform(0.5, 2.0, (b, 1))
    assert_gradients(contrastive_case("contrastive", img, txt, np.array(log_logit_scale - 1.0)), rng)


@given(seed=st.integers(0, 2**32 - 1), keys=keys_strategy(), d=st.integers(1, 4),
       use_positives=st.booleans(), dloss=st.floats(-2.0, 2.0))
def test_matches_naive_loop_and_staged_backward(seed, keys, d, use_positives, dloss):
    b = len(keys)
    _, img, txt, log_logit_scale = make(seed, b, d)
    positives = duplicate_positives(np.array(keys)) if use_positives else None
    loss, cache = contrastive.forward(img, txt, log_logit_scale, positives)
    assert isinstance(loss, float)
    assert loss == pytest.approx(naive_contrastive(img, txt, log_logit_scale, positives),
                                 rel=1e-12, abs=1e-12)
    pos = np.eye(b, dtype=bool) if positives is None else positives
    grads = contrastive.backward(dloss, cache)
    for got, want in zip(grads, staged_backward(dloss, img, txt, log_logit_scale, pos)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    assert grads[2].shape == ()


@st.composite
def lopsided_positives(draw):
    """(B, B) bool with a True diagonal and extra positives that make some row's count
    differ from the same-index column's count (not a union of classes, not symmetric),
    so swapping the row and column normalizations changes the loss."""
    b = draw(st.integers(2, 6))
    extra = np.array(draw(st.lists(st.booleans(), min_size=b * b, max_size=b * b)))
    pos = np.eye(b, dtype=bool) | extra.reshape(b, b)
    i, j = draw(st.integers(0, b - 1)), draw(st.integers(0, b - 2))
    j += j >= i                                                  # j != i
    pos[i, j], pos[j, i] = True, False                           # one pair in one direction
    if np.array_equal(pos.sum(axis=1), pos.sum(axis=0)):
        pos[:, j] = True                                         # column j holds every image
        pos[j, :] = np.eye(b, dtype=bool)[j]                     # row j only itself (B >= 2)
    return pos


def test_lopsided_positives_example():
    """Identity plus one extra pair (image 0 with caption 1): loop, op and gradients."""
    rng, img, txt, log_logit_scale = make(7, 4, 3)
    pos = np.eye(4, dtype=bool)
    pos[0, 1] = True                                             # row 0: 2 positives, row 1: 1
    loss, cache = contrastive.forward(img, txt, log_logit_scale, pos)
    assert loss == pytest.approx(naive_contrastive(img, txt, log_logit_scale, pos),
                                 rel=1e-12, abs=1e-12)
    for got, want in zip(contrastive.backward(1.0, cache),
                         staged_backward(1.0, img, txt, log_logit_scale, pos)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    assert_gradients(contrastive_case("contrastive(identity + (0, 1))", img, txt,
                                      log_logit_scale, pos), rng)


@given(seed=st.integers(0, 2**32 - 1), pos=lopsided_positives(), d=st.integers(2, 4),
       dloss=st.floats(-2.0, 2.0))
def test_lopsided_positives_match_naive_loop_and_gradients(seed, pos, d, dloss):
    assert not np.array_equal(pos.sum(axis=1), pos.sum(axis=0))
    b = pos.shape[0]
    rng, img, txt, log_logit_scale = make(seed, b, d)
    loss, cache = contrastive.forward(img, txt, log_logit_scale, pos)
    assert loss == pytest.approx(naive_contrastive(img, txt, log_logit_scale, pos),
                                 rel=1e-12, abs=1e-12)
    for got, want in zip(contrastive.backward(dloss, cache),
                         staged_backward(dloss, img, txt, log_logit_scale, pos)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    assert_gradients(contrastive_case("contrastive(lopsided)", img, txt, log_logit_scale,
                                      pos), rng)


def test_duplicate_positives():
    pos = duplicate_positives(np.array([4, 9, 4, 1, 9]))
    assert pos.dtype == bool and pos.shape == (5, 5)
    assert np.array_equal(pos, pos.T) and np.all(np.diagonal(pos))
    assert pos[0, 2] and pos[1, 4] and not pos[0, 1] and pos[3].sum() == 1
    assert np.array_equal(duplicate_positives(["a cat", "a dog", "a cat"]),
                          [[True, False, True], [False, True, False], [True, False, True]])
    with pytest.raises(ValueError, match=r"keys must have 1 dimension \(B,\), got shape \(2, 2\)"):
        duplicate_positives(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="keys must each equal themselves"):
        duplicate_positives(np.array([1.0, np.nan]))


def test_duplicates_make_identical_captions_interchangeable():
    # captions 0 and 2 are the same text (same embedding)
    rng, img, txt, log_logit_scale = make(3, 4, 3)
    txt[2] = txt[0]
    positives = duplicate_positives(np.array([0, 1, 0, 2]))
    loss, cache = contrastive.forward(img, txt, log_logit_scale, positives)
    dimg, dtxt, dlt = contrastive.backward(1.0, cache)
    # with positives the two copies get the same gradient ...
    np.testing.assert_allclose(dtxt[0], dtxt[2], rtol=1e-12)
    # ... without, copy 0 is pulled toward image 0 and copy 2 pushed away from it
    loss_plain, cache_plain = contrastive.forward(img, txt, log_logit_scale)
    dimg_p, dtxt_p, dlt_p = contrastive.backward(1.0, cache_plain)
    assert np.abs(dtxt_p[0] - dtxt_p[2]).max() > 0.1
    # for exactly equal embeddings the loss and the summed gradients agree
    assert loss == pytest.approx(loss_plain, rel=1e-12)
    np.testing.assert_allclose(dtxt[0] + dtxt[2], dtxt_p[0] + dtxt_p[2], atol=1e-12)
    np.testing.assert_allclose(dimg, dimg_p, atol=1e-12)
    np.testing.assert_allclose(dlt, dlt_p, rtol=1e-12)


def test_perfect_alignment_and_single_pair():
    # img == txt with orthonormal rows: logits s on the diagonal, 0 elsewhere
    eye = np.eye(4)
    loss, cache = contrastive.forward(eye, eye, np.array(np.log(10.0)))
    assert loss == pytest.approx(math.log1p(3 * math.exp(-10.0)), rel=1e-9)
    # B = 1: one candidate per row, loss exactly 0 and zero gradients
    one = unit_rows(np.array([[1.0, 2.0]]))
    loss, cache = contrastive.forward(one, one, np.array(LOG_LOGIT_SCALE_INIT))
    assert loss == 0.0
    for g in contrastive.backward(1.0, cache):
        assert np.all(g == 0.0)
    # all similarities equal: loss = log B
    same = np.tile(unit_rows(np.array([[1.0, 1.0]])), (5, 1))
    loss, _ = contrastive.forward(same, same, np.array(2.0))
    assert loss == pytest.approx(math.log(5.0), rel=1e-14)


def test_log_logit_scale_init_is_clip_and_numpy_scalars_are_accepted():
    assert isinstance(LOG_LOGIT_SCALE_INIT, float)
    assert math.exp(LOG_LOGIT_SCALE_INIT) == pytest.approx(1 / 0.07)
    _, img, txt, log_logit_scale = make(0, 3, 2)
    shifted = log_logit_scale - 1.0                              # a NumPy scalar, not an array
    assert not isinstance(shifted, np.ndarray)
    assert contrastive.forward(img, txt, shifted)[0] == contrastive.forward(
        img, txt, np.array(shifted))[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_finite(dtype):
    # log_logit_scale = log(1e4) with unit rows: logits of magnitude up to 1e4
    rng, img, txt, _ = make(5, 6, 3, dtype)
    log_logit_scale = np.array(np.log(1e4), dtype=dtype)
    for positives in (None, duplicate_positives(np.array([0, 1, 0, 2, 3, 3]))):
        loss, cache = contrastive.forward(img, txt, log_logit_scale, positives)
        grads = contrastive.backward(1.0, cache)
        assert math.isfinite(loss)
        assert all(np.all(np.isfinite(g)) for g in grads)
        ref = naive_contrastive(img.astype(np.float64), txt.astype(np.float64),
                                np.log(1e4), positives)
        assert loss == pytest.approx(ref, rel=1e-3 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_inputs_untouched(dtype):
    rng, img, txt, log_logit_scale = make(1, 4, 3, dtype)
    positives = readonly(duplicate_positives(np.array([0, 1, 1, 2])))
    img, txt, log_logit_scale = readonly(img, txt, log_logit_scale)
    before = [a.copy() for a in (img, txt, log_logit_scale, positives)]
    loss, cache = contrastive.forward(img, txt, log_logit_scale, positives)
    dimg, dtxt, dlog_logit_scale = contrastive.backward(np.float64(1.0), cache)
    assert isinstance(loss, float)
    assert dimg.dtype == dtype and dtxt.dtype == dtype and dlog_logit_scale.dtype == dtype
    assert dimg.shape == img.shape and dtxt.shape == txt.shape and dlog_logit_scale.shape == ()
    for a, b in zip((img, txt, log_logit_scale, positives), before):
        np.testing.assert_array_equal(a, b)
    again = contrastive.backward(1.0, cache)
    for a, b in zip(again, (dimg, dtxt, dlog_logit_scale)):
        np.testing.assert_array_equal(a, b)                      # cache not mutated


def _good(b=3, d=2):
    _, img, txt, log_logit_scale = make(0, b, d)
    return img, txt, log_logit_scale


@pytest.mark.parametrize("change, error, match", [
    (lambda i, t, l, p: (i[0], t, l, p), ValueError,
     r"img must have 2 dimensions \(B, D\), got shape \(2,\)"),
    (lambda i, t, l, p: (i, t[None], l, p), ValueError,
     r"txt must have 2 dimensions \(B, D\), got shape \(1, 3, 2\)"),
    (lambda i, t, l, p: (i, t[:2], l, p), ValueError,
     r"txt must have the shape of img \(B, D\) = \(3, 2\), got \(2, 2\)"),
    (lambda i, t, l, p: (i, np.hstack([t, t]), l, p), ValueError, "txt must have the shape of img"),
    (lambda i, t, l, p: (i[:0], t[:0], l, p), ValueError, r"img must hold at least one pair"),
    (lambda i, t, l, p: (i, t.astype(np.float32), l, p), TypeError,
     r"txt must have the dtype of img \(float64\), got float32"),
    (lambda i, t, l, p: (i, t, np.array([0.5]), p), ValueError,
     r"log_logit_scale must have 0 dimensions \(\), got shape \(1,\)"),
    (lambda i, t, l, p: (i, t, 0.5, p), TypeError,
     "log_logit_scale must be a numpy.ndarray, got float"),
    (lambda i, t, l, p: (i, t, l.astype(np.float32), p), TypeError,
     r"log_logit_scale must have the dtype of img"),
    (lambda i, t, l, p: (i, t, np.array(np.inf), p), ValueError, "log_logit_scale must be finite"),
    (lambda i, t, l, p: (i, t, np.array(800.0), p), ValueError,
     r"log_logit_scale must be at most log\(max float64\) = 709.78 .* got 800.0"),
    (lambda i, t, l, p: (np.where(i > 0, np.nan, i), t, l, p), ValueError, "img must be finite"),
    (lambda i, t, l, p: (i, t, l, np.eye(2, dtype=bool)), ValueError,
     r"positives must have shape \(B, B\) = \(3, 3\), got \(2, 2\)"),
    (lambda i, t, l, p: (i, t, l, np.ones(3, dtype=bool)), ValueError,
     r"positives must have 2 dimensions \(B, B\), got shape \(3,\)"),
    (lambda i, t, l, p: (i, t, l, np.eye(3)), TypeError,
     "positives must have dtype bool, got float64"),
    (lambda i, t, l, p: (i, t, l, ~np.eye(3, dtype=bool)), ValueError,
     r"positives must have a True diagonal .* got False at \(0, 0\)"),
])
def test_bad_input(change, error, match):
    img, txt, log_logit_scale = _good()
    args = change(img, txt, log_logit_scale, None)
    with pytest.raises(error, match=match):
        contrastive.forward(*args)
