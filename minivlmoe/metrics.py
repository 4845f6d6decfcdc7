"""Evaluation metrics: retrieval recall@k, corpus BLEU-4, exact match, zero-shot accuracy.

All are pure functions of arrays or token lists (definitions in docs/training.md).

Retrieval with keys
-------------------
Each image and each text carries a *key* that identifies the caption text (e.g. the
caption string itself).  A retrieved item is correct when its key equals the query's
key, so two images with the same caption both count as correct answers to that
caption, and either copy of a duplicated caption counts for an image.

Recall@k is the fraction of queries with at least one correct item among the top k.
Ties are broken *pessimistically*: every incorrect item whose score is >= the best
correct item's score ranks ahead of it.  The query is a hit at k when fewer than k
incorrect items rank ahead.  A model that outputs a constant similarity therefore
scores no better than its worst case, instead of winning every tie.  A query with no
correct item at all counts as a miss.

Distinct texts (the default, ``distinct_texts=True``)
-----------------------------------------------------
Image-to-text recall ranks *distinct caption texts*, not caption rows: the texts with
one key form one item whose score is the best score of its copies (identical texts
have identical embeddings, so this is ranking the unique rows), and an image is a hit
at k when its caption text is among the k best distinct texts.  Counting every copy
(``distinct_texts=False``, the per-item ranking) lets one wrong caption that occurs
ten times push the right one out of the top 5 by itself, so that R@5 can equal R@1 on
templated captions.  Text-to-image recall is the same under both: its items are
images, which are never copies of one another, and each caption row stays one query
(a text with m copies weighs as its m pairs, as every image weighs once in
image-to-text).  With no duplicate texts the two definitions agree; at k = 1 they
always agree (no incorrect copy ahead <=> no incorrect text ahead).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter

import numpy as np

from ._checks import check_array, shorten


def _check_keys(name, keys, length, axis):
    if keys is None:
        raise TypeError(f"{name} must be a 1-D array or list of keys, got None")
    try:
        keys = np.asarray(keys)
    except ValueError:                                               # ragged nested lists
        raise ValueError(f"{name} must be a 1-D array or list of keys, got "
                         f"{shorten(repr(keys))}") from None
    if keys.dtype == object or keys.dtype.kind == "f" and not np.all(np.isfinite(keys)):
        raise TypeError(f"{name} must hold ints or strings (comparable keys), got "
                        f"dtype {keys.dtype}")
    if keys.ndim != 1 or keys.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) matching sim's {axis}, "
                         f"got {keys.shape}")
    return keys


def _hits(sim, correct, ks):
    """Per k: the fraction of rows whose best correct item has < k incorrect items at/above it."""
    best = np.where(correct, sim, -np.inf).max(axis=1, initial=-np.inf)  # (Q,) best correct score
    ahead = np.sum(~correct & (sim >= best[:, None]), axis=1)           # (Q,) pessimistic rank - 1
    has_correct = correct.any(axis=1)                                    # (Q,)
    return {k: float(np.mean(has_correct & (ahead < k))) for k in ks}


def _max_over_copies(sim, txt_keys):
    """(Ni, U) best score of each distinct key among the columns, and the (U,) keys."""
    uniq, inverse = np.unique(txt_keys, return_inverse=True)          # (U,), (Nt,)
    order = np.argsort(inverse.reshape(-1), kind="stable")             # (Nt,) columns by key
    starts = np.searchsorted(inverse.reshape(-1)[order], np.arange(uniq.size))  # (U,)
    return np.maximum.reduceat(sim[:, order], starts, axis=1), uniq    # (Ni, U), (U,)


def retrieval_recall(sim, img_keys, txt_keys, ks=(1, 5), *, distinct_texts=True):
    """Image-to-text and text-to-image recall@k with pessimistic ties.

    Parameters
    ----------
    sim : (Ni, Nt) float array, similarity of image i and text j (higher is closer).
    img_keys : (Ni,) caption key of each image (ints or strings).
    txt_keys : (Nt,) caption key of each text.
    ks : tuple of ints >= 1.
    distinct_texts : image-to-text ranks distinct texts (the texts of one key are one
        item scored by their best copy; the module docstring) if True, every text
        column if False.  Text-to-image is the same either way.

    Returns
    -------
    dict with ``"i2t_r{k}"`` and ``"t2i_r{k}"`` for each k (floats in [0, 1]).
    """
    check_array("sim", sim, ndim=2, axes="(Ni, Nt)")
    n_img, n_txt = sim.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"sim must have at least one image and one text, got shape {sim.shape}")
    img_keys = _check_keys("img_keys", img_keys, n_img, "rows Ni")
    txt_keys = _check_keys("txt_keys", txt_keys, n_txt, "columns Nt")
    ks = tuple(ks) if isinstance(ks, (list, tuple)) else ks
    if not isinstance(ks, tuple) or not ks or any(
            isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple of ints >= 1, got {shorten(repr(ks))}")
    correct = img_keys[:, None] == txt_keys[None, :]                     # (Ni, Nt)
    if distinct_texts:                                                   # items: texts
        text_sim, text_keys = _max_over_copies(sim, txt_keys)           # (Ni, U), (U,)
        i2t = _hits(text_sim, img_keys[:, None] == text_keys[None, :], ks)
    else:                                                                # items: columns
        i2t = _hits(sim, correct, ks)                                    # queries: images
    t2i = _hits(sim.T, correct.T, ks)                                    # queries: texts
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = i2t[k]
        out[f"t2i_r{k}"] = t2i[k]
    return out


def _check_corpus(hyp_name, hyps, ref_name, refs):
    for name, corpus in ((hyp_name, hyps), (ref_name, refs)):
        if not isinstance(corpus, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(corpus).__name__}")
    if len(hyps) != len(refs):
        raise ValueError(f"{hyp_name} and {ref_name} must have the same length, "
                         f"got {len(hyps)} and {len(refs)}")
    if not hyps:
        raise ValueError(f"{hyp_name} must not be empty")


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(hypotheses, references):
    """Corpus-level BLEU-4 (Papineni et al., 2002), one reference per hypothesis.

    ``BLEU = BP * exp(mean_n log p_n)`` over n = 1..4, where the clipped precision
    ``p_n`` = (sum over sentences of sum over n-grams g of min(count_hyp(g),
    count_ref(g))) / (number of hypothesis n-grams), and the brevity penalty is
    ``BP = 1`` if ``c > r`` else ``exp(1 - r / c)`` with c, r the total hypothesis and
    reference lengths.  If any p_n is 0 (or the hypotheses hold no n-grams of some
    order), the geometric mean is 0 and so is BLEU: no smoothing, as in the standard
    corpus BLEU.  Returns a float in [0, 1] (not multiplied by 100).

    Its exact equivalent is ``sacrebleu.corpus_bleu([" ".join(h) for h in hypotheses],
    [[" ".join(r) for r in references]], tokenize="none", smooth_method="none").score
    / 100`` (same clipping, pooled counts, brevity penalty with BP = 1 at c = r, and 0
    when any p_n is 0; checked to 1e-15 on 2,000 random short corpora with sacrebleu
    2.6.0).  sacrebleu's default ``smooth_method="exp"`` differs whenever some p_n is 0,
    which is common on short corpora: ``["the the the the"]`` against ``["the cat"]``
    scores 0 here and 15.97 there.

    Parameters
    ----------
    hypotheses, references : lists of token lists (``list[list[str]]``), same length.
    """
    _check_corpus("hypotheses", hypotheses, "references", references)
    matches = [0] * 4                     # clipped n-gram matches, n = 1..4
    totals = [0] * 4                      # hypothesis n-grams
    hyp_len = ref_len = 0
    for i, (hyp, ref) in enumerate(zip(hypotheses, references)):
        for name, tokens in (("hypotheses", hyp), ("references", ref)):
            if not isinstance(tokens, (list, tuple)):
                raise TypeError(f"{name}[{i}] must be a list of tokens, "
                                f"got {type(tokens).__name__}")
            if not all(isinstance(t, str) for t in tokens):
                raise TypeError(f"{name}[{i}] must be a list of str tokens, got "
                                f"{shorten(repr(tokens))}")
        hyp_len += len(hyp)
        ref_len += len(ref)
        for n in range(1, 5):
            hyp_counts, ref_counts = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def exact_match(hyps, refs):
    """Fraction of positions where the hypothesis equals its reference exactly.

    ``hyps`` and ``refs`` are lists of the same length of token lists (or strings).
    """
    _check_corpus("hyps", hyps, "refs", refs)
    for name, corpus in (("hyps", hyps), ("refs", refs)):
        for i, item in enumerate(corpus):
            if not isinstance(item, (list, tuple, str)):
                raise TypeError(f"{name}[{i}] must be a token list or a str, got "
                                f"{type(item).__name__} {shorten(repr(item))}")
    return sum(list(h) == list(r) for h, r in zip(hyps, refs)) / len(hyps)


def zero_shot_accuracy(sim, labels):
    """Fraction of rows whose highest-scoring class is the label.

    Parameters
    ----------
    sim : (Ni, C) float array, similarity of image i with the prompt of class c.
    labels : (Ni,) integer array of classes in [0, C).

    Ties go to the lowest class index (``numpy.argmax``), so the result is deterministic.
    """
    check_array("sim", sim, ndim=2, axes="(Ni, C)")
    n, n_classes = sim.shape
    if n == 0 or n_classes == 0:
        raise ValueError(f"sim must have at least one row and one class, got shape {sim.shape}")
    labels = np.asarray(labels) if isinstance(labels, (list, tuple)) else labels
    check_array("labels", labels, ndim=1, axes="(Ni,)", dtype_kind="i")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) matching sim's rows, got {labels.shape}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes - 1}], got values in "
                         f"[{labels.min()}, {labels.max()}]")
    return float(np.mean(np.argmax(sim, axis=1) == labels))
