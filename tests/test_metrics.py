"""Evaluation metrics (minivlmoe/metrics.py) against naive loop references."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.metrics import bleu4, exact_match, retrieval_recall, zero_shot_accuracy


# ------------------------------------------------------------------------- retrieval

def naive_recall(sim, query_keys, item_keys, k):
    """Per query: sort items by score, incorrect before correct among equal scores,
    and look for a correct item in the first k."""
    hits = 0
    for q in range(sim.shape[0]):
        correct = [item_keys[j] == query_keys[q] for j in range(sim.shape[1])]
        order = sorted(range(sim.shape[1]), key=lambda j: (-sim[q, j], correct[j]))
        hits += any(correct[j] for j in order[:k])
    return hits / sim.shape[0]


@given(seed=st.integers(0, 2**32 - 1), n_img=st.integers(1, 7), n_txt=st.integers(1, 9),
       levels=st.sampled_from([2, 3, 100]), n_keys=st.integers(1, 5))
def test_recall_matches_naive_loop(seed, n_img, n_txt, levels, n_keys):
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, levels, (n_img, n_txt)).astype(np.float64)  # few levels: many ties
    img_keys = rng.integers(0, n_keys, n_img)                           # duplicate captions
    txt_keys = rng.integers(0, n_keys + 1, n_txt)                       # some match no image
    got = retrieval_recall(sim, img_keys, txt_keys, ks=(1, 2, 5), distinct_texts=False)
    for k in (1, 2, 5):
        assert got[f"i2t_r{k}"] == pytest.approx(naive_recall(sim, img_keys, txt_keys, k))
        assert got[f"t2i_r{k}"] == pytest.approx(naive_recall(sim.T, txt_keys, img_keys, k))


def naive_distinct_recall(sim, img_keys, txt_keys, k):
    """Image-to-text over distinct texts: each key scored by its best copy, keys sorted
    by score with incorrect before correct among equals, the image's key in the first k."""
    hits = 0
    for q in range(sim.shape[0]):
        best = {}
        for j in range(sim.shape[1]):
            best[txt_keys[j]] = max(best.get(txt_keys[j], -math.inf), sim[q, j])
        order = sorted(best, key=lambda key: (-best[key], key == img_keys[q]))
        hits += img_keys[q] in order[:k]
    return hits / sim.shape[0]


@given(seed=st.integers(0, 2**32 - 1), n_img=st.integers(1, 7), n_txt=st.integers(1, 12),
       levels=st.sampled_from([2, 3, 100]), n_keys=st.integers(1, 4))
def test_distinct_recall_matches_naive_loop(seed, n_img, n_txt, levels, n_keys):
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, levels, (n_img, n_txt)).astype(np.float64)  # few levels: many ties
    img_keys = rng.integers(0, n_keys, n_img)
    txt_keys = rng.integers(0, n_keys + 1, n_txt)                       # many copies per key
    got = retrieval_recall(sim, img_keys, txt_keys, ks=(1, 2, 5))
    per_item = retrieval_recall(sim, img_keys, txt_keys, ks=(1, 2, 5), distinct_texts=False)
    for k in (1, 2, 5):
        assert got[f"i2t_r{k}"] == pytest.approx(
            naive_distinct_recall(sim, img_keys, txt_keys, k))
        # text-to-image: items are images; each caption row is one query, as before
        assert got[f"t2i_r{k}"] == pytest.approx(naive_recall(sim.T, txt_keys, img_keys, k))
        assert got[f"t2i_r{k}"] == per_item[f"t2i_r{k}"]
    assert got["i2t_r1"] == per_item["i2t_r1"]       # at k = 1 the definitions agree


def test_distinct_recall_with_heavy_duplication():
    # 30 images, 3 distinct caption texts, each text 10 times; identical texts have
    # identical embeddings, so their columns of sim are identical.
    rng = np.random.default_rng(0)
    keys = np.repeat(["a red circle", "a blue square", "a green triangle"], 10)
    img = rng.normal(size=(30, 8)) + 3 * np.eye(8)[np.repeat([0, 1, 2], 10)]  # (30, 8)
    txt_of_key = rng.normal(size=(3, 8)) + 3 * np.eye(8)[[2, 0, 1]]            # (3, 8)
    txt = txt_of_key[np.repeat([0, 1, 2], 10)]                                  # (30, 8)
    sim = img @ txt.T                                                           # (30, 30)
    got = retrieval_recall(sim, keys, keys, ks=(1, 2, 3, 5))
    per_item = retrieval_recall(sim, keys, keys, ks=(1, 2, 3, 5), distinct_texts=False)
    for k in (1, 2, 3, 5):
        assert got[f"i2t_r{k}"] == pytest.approx(naive_distinct_recall(sim, keys, keys, k))
        assert per_item[f"i2t_r{k}"] == pytest.approx(naive_recall(sim, keys, keys, k))
    assert got["i2t_r3"] == 1.0                      # 3 distinct texts: always within 3
    assert got["i2t_r1"] == per_item["i2t_r1"] < 1.0
    assert per_item["i2t_r5"] == per_item["i2t_r1"]  # ten copies of one wrong text fill the top 5
    assert got["i2t_r2"] > got["i2t_r1"]


def test_distinct_texts_one_wrong_caption_with_copies():
    sim = np.array([[0.9, 0.9, 0.9, 0.5]])           # three copies of "b" beat "a"
    got = retrieval_recall(sim, np.array(["a"]), np.array(["b", "b", "b", "a"]), ks=(1, 2))
    assert got["i2t_r1"] == 0.0 and got["i2t_r2"] == 1.0      # "a" is the 2nd distinct text
    per_item = retrieval_recall(sim, np.array(["a"]), np.array(["b", "b", "b", "a"]),
                                ks=(1, 2, 4), distinct_texts=False)
    assert per_item["i2t_r2"] == 0.0 and per_item["i2t_r4"] == 1.0


def test_constant_similarity_scores_nothing():
    sim = np.zeros((4, 4), dtype=np.float32)
    r = retrieval_recall(sim, np.arange(4), np.arange(4), ks=(1, 3, 4))
    assert r["i2t_r1"] == r["t2i_r1"] == 0.0 and r["i2t_r3"] == 0.0
    assert r["i2t_r4"] == r["t2i_r4"] == 1.0     # 3 incorrect ahead: found at rank 4


def test_duplicate_captions_count_for_every_matching_item():
    # images 0 and 1 share the caption "red circle" (key "rc"); one text copy per caption.
    img_keys = np.array(["rc", "rc", "bs"])
    txt_keys = np.array(["bs", "rc"])
    sim = np.array([[0.1, 0.9],     # image 0 -> text "rc": correct
                    [0.2, 0.8],     # image 1 -> text "rc": correct (same caption)
                    [0.7, 0.3]])    # image 2 -> text "bs": correct
    r = retrieval_recall(sim, img_keys, txt_keys, ks=(1,))
    assert r == {"i2t_r1": 1.0, "t2i_r1": 1.0}   # text "rc" finds image 0, a correct image


def test_tie_between_correct_and_incorrect_is_a_miss_at_1():
    sim = np.array([[1.0, 1.0, 0.0]])
    assert retrieval_recall(sim, np.array([1]), np.array([0, 1, 2]), ks=(1, 2))["i2t_r1"] == 0.0
    assert retrieval_recall(sim, np.array([1]), np.array([0, 1, 2]), ks=(1, 2))["i2t_r2"] == 1.0
    assert retrieval_recall(sim, np.array([0]), np.array([0, 1, 2]), ks=(1,))["i2t_r1"] == 0.0


def test_perfect_and_query_without_match():
    sim = np.eye(3)
    assert set(retrieval_recall(sim, np.arange(3), np.arange(3)).values()) == {1.0}
    r = retrieval_recall(sim, np.array([0, 1, 7]), np.arange(3), ks=(5,))
    assert r["i2t_r5"] == pytest.approx(2 / 3)    # image 2's key 7 has no text: a miss
    assert r["t2i_r5"] == pytest.approx(2 / 3)    # text 2 has no image


@pytest.mark.parametrize("args, error, match", [
    ((np.zeros(3), [0, 1, 2], [0, 1, 2]), ValueError, r"sim must have 2 dimensions \(Ni, Nt\)"),
    ((np.zeros((2, 3)), [0, 1, 2], [0, 1, 2]), ValueError,
     r"img_keys must have shape \(2,\) matching sim's rows Ni, got \(3,\)"),
    ((np.zeros((2, 3)), [0, 1], [0, 1]), ValueError, r"txt_keys must have shape \(3,\)"),
    ((np.zeros((2, 0)), [0, 1], []), ValueError, "at least one image and one text"),
    ((np.array([[np.nan, 0.0]]), [0], [0, 1]), ValueError, "sim must be finite"),
    ((np.zeros((2, 2), dtype=int), [0, 1], [0, 1]), TypeError, "sim must have dtype float32"),
    (([[0.0]], [0], [0]), TypeError, "sim must be a numpy.ndarray"),
])
def test_recall_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        retrieval_recall(*args)


@pytest.mark.parametrize("ks", [(), (0,), (1, 2.0), (True,)])
def test_recall_bad_ks(ks):
    with pytest.raises(ValueError, match="ks must be a non-empty tuple of ints >= 1"):
        retrieval_recall(np.zeros((1, 1)), [0], [0], ks=ks)


# ------------------------------------------------------------------------------ BLEU

def naive_bleu4(hyps, refs):
    """Corpus BLEU-4 counting matches by crossing off reference n-gram occurrences."""
    matches, totals, c, r = [0] * 4, [0] * 4, 0, 0
    for hyp, ref in zip(hyps, refs):
        c, r = c + len(hyp), r + len(ref)
        for n in range(1, 5):
            available = [ref[i:i + n] for i in range(len(ref) - n + 1)]
            for i in range(len(hyp) - n + 1):
                totals[n - 1] += 1
                if hyp[i:i + n] in available:
                    available.remove(hyp[i:i + n])
                    matches[n - 1] += 1
    if any(m == 0 for m in matches):
        return 0.0
    geo = math.prod(m / t for m, t in zip(matches, totals)) ** 0.25
    return geo * (1.0 if c > r else math.exp(1 - r / c))


sentences = st.lists(st.sampled_from(["a", "red", "blue", "circle", "left", "of"]),
                     min_size=0, max_size=9)


@st.composite
def near_copies(draw):
    """(hypothesis, reference) with the hypothesis an edited copy of the reference:
    a cut, inserted noise and a repeated chunk, so that 4-grams match, clipping matters
    and either side may be the longer one."""
    ref = draw(st.lists(st.sampled_from(["a", "red", "blue", "circle", "left", "of"]),
                        min_size=4, max_size=10))
    i = draw(st.integers(0, len(ref)))
    j = draw(st.integers(i, len(ref)))
    noise = draw(sentences.map(lambda t: t[:2]))
    repeat = ref[:draw(st.integers(0, 5))]
    return ref[:i] + noise + ref[j:] + repeat, ref


@given(pairs=st.lists(st.tuples(sentences, sentences) | near_copies(), min_size=1, max_size=5))
def test_bleu_matches_naive(pairs):
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    assert bleu4(hyps, refs) == pytest.approx(naive_bleu4(hyps, refs), rel=1e-12, abs=0)


def test_bleu_clips_repeated_ngrams():
    hyp, ref = "a b c d e a b c d".split(), "a b c d e".split()
    # clipped matches 5/9, 4/8, 3/7, 2/6 (each repeated n-gram counts once); c > r: BP = 1
    expected = (5 / 9 * 4 / 8 * 3 / 7 * 2 / 6) ** 0.25
    assert bleu4([hyp], [ref]) == pytest.approx(expected, rel=1e-14)


def test_bleu_hand_computed():
    hyp = "a red circle left of a blue square".split()
    ref = "a red circle left of a large blue square".split()
    # precisions 8/8, 6/7, 4/6, 3/5; c = 8 < r = 9 so BP = exp(1 - 9/8)
    expected = math.exp(-1 / 8) * (1 * 6 / 7 * 4 / 6 * 3 / 5) ** 0.25
    assert bleu4([hyp], [ref]) == pytest.approx(expected, rel=1e-14)
    assert expected == pytest.approx(0.675292, abs=1e-6)


def test_bleu_edge_cases():
    s = "a small red circle left of a large blue square".split()
    assert bleu4([s, s[:5]], [s, s[:5]]) == pytest.approx(1.0)
    assert bleu4([s[:4]], [s[:5]]) == pytest.approx(math.exp(1 - 5 / 4))    # brevity only
    assert bleu4([["the"] * 7], [["the", "cat", "on", "the", "mat"]]) == 0.0  # p2 = 0
    assert bleu4([s[:3]], [s[:3]]) == 0.0          # no 4-grams at all: p4 = 0/0 -> BLEU 0
    assert bleu4([[]], [s]) == 0.0
    # corpus level: pooled counts, not an average of sentence scores
    assert bleu4([s, s[:3]], [s, s[:3]]) == pytest.approx(1.0)


@pytest.mark.parametrize("args, error, match", [
    (([["a"]], [["a"], ["b"]]), ValueError, "hypotheses and references must have the same length"),
    (([], []), ValueError, "hypotheses must not be empty"),
    (("a b", ["a b"]), TypeError, "hypotheses must be a list, got str"),
    (([["a"], "a b"], [["a"], ["a"]]), TypeError, r"hypotheses\[1\] must be a list of tokens"),
])
def test_bleu_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        bleu4(*args)


# -------------------------------------------------- exact match and zero-shot accuracy

@given(pairs=st.lists(st.tuples(sentences, sentences), min_size=1, max_size=6))
def test_exact_match_matches_naive(pairs):
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    naive = 0
    for h, r in zip(hyps, refs):
        naive += len(h) == len(r) and all(a == b for a, b in zip(h, r))
    assert exact_match(hyps, refs) == naive / len(hyps)
    assert exact_match(refs, refs) == 1.0


def test_exact_match_examples():
    assert exact_match([["a", "b"], ["a"]], [["a", "b"], ["a", "c"]]) == 0.5
    assert exact_match(["a red circle"], ["a red circle"]) == 1.0
    with pytest.raises(ValueError, match="hyps and refs must have the same length, got 1 and 2"):
        exact_match([["a"]], [["a"], ["b"]])


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), n_classes=st.integers(1, 5))
def test_zero_shot_matches_naive(seed, n, n_classes):
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, 3, (n, n_classes)).astype(np.float32)           # ties
    labels = rng.integers(0, n_classes, n)
    correct = 0
    for i in range(n):
        best = 0
        for c in range(1, n_classes):
            if sim[i, c] > sim[i, best]:                                  # first max wins
                best = c
        correct += best == labels[i]
    assert zero_shot_accuracy(sim, labels) == pytest.approx(correct / n)


def test_zero_shot_ties_go_to_lowest_class():
    sim = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert zero_shot_accuracy(sim, np.array([0, 0])) == 1.0
    assert zero_shot_accuracy(sim, np.array([1, 1])) == 0.0


@pytest.mark.parametrize("sim, labels, error, match", [
    (np.zeros((2, 3)), np.array([0, 3]), ValueError, r"labels must be in \[0, 2\]"),
    (np.zeros((2, 3)), np.array([0, -1]), ValueError, r"labels must be in \[0, 2\]"),
    (np.zeros((2, 3)), np.array([0]), ValueError, r"labels must have shape \(2,\)"),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), TypeError, "labels must have an integer dtype"),
    (np.zeros(3), np.array([0]), ValueError, r"sim must have 2 dimensions \(Ni, C\)"),
    (np.zeros((0, 3)), np.array([], dtype=int), ValueError, "at least one row and one class"),
])
def test_zero_shot_bad_inputs(sim, labels, error, match):
    with pytest.raises(error, match=match):
        zero_shot_accuracy(sim, labels)
