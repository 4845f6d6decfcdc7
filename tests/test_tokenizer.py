"""Tests of the word-level tokenizer (minivlmoe/tokenizer.py)."""

import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minivlmoe.scenes import grammar_words
from minivlmoe.tokenizer import (BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Tokenizer,
                                 normalize, tokenize)
from minivlmoe.world import World

TOK = Tokenizer(grammar_words())


def naive_encode(tok, caption, max_len):
    """Reference: one token at a time (punctuation-only pieces are no words)."""
    row = [BOS_ID]
    for word in caption.lower().split():
        word = word.strip(".,!?;:")
        if not word:
            continue
        row.append(tok.vocab.index(word) if word in tok.vocab[4:] else UNK_ID)
    row.append(EOS_ID)
    return row + [PAD_ID] * (max_len - len(row))


def test_special_tokens_and_grammar_vocabulary():
    assert SPECIALS == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert TOK.vocab[:4] == list(SPECIALS) and TOK.words == grammar_words()
    assert TOK.vocab_size == 20
    assert Tokenizer(grammar_words()) == TOK                     # deterministic


def test_encode_layout():
    ids = TOK.encode(["a small red circle", "a large blue cross left of a small red square"],
                     max_len=14)
    assert ids.dtype == np.int32 and ids.shape == (2, 14)
    assert (ids[:, 0] == BOS_ID).all()
    assert ids[0, 5] == EOS_ID and (ids[0, 6:] == PAD_ID).all()
    assert ids[1, 11] == EOS_ID and (ids[1, 12:] == PAD_ID).all()
    assert TOK.vocab[ids[0, 3]] == "red"
    assert TOK.encode(["a small red circle"]).shape == (1, 6)   # max_len=None: longest + 2


def test_generated_captions_round_trip():
    ds = World(max_objects=3).sample(1500, np.random.default_rng(0))
    ids = TOK.encode(ds.captions, max_len=18)
    assert not (ids == UNK_ID).any()
    assert TOK.decode_batch(ids) == ds.captions
    for b in range(0, 1500, 97):
        assert ids[b].tolist() == naive_encode(TOK, ds.captions[b], 18)


@given(words=st.lists(st.sampled_from(grammar_words() + ["zebra", "7", "."]), max_size=12),
       extra=st.integers(0, 3))
def test_random_word_sequences_round_trip(words, extra):
    caption = " ".join(words)
    ids = TOK.encode([caption], max_len=len(words) + 2 + extra)
    assert ids[0].tolist() == naive_encode(TOK, caption, len(words) + 2 + extra)
    known = [w if w in grammar_words() else "<unk>" for w in words if w != "."]
    assert TOK.decode(ids[0]) == " ".join(known)


def test_unknown_words_become_unk():
    ids = TOK.encode(["a huge red circle"])
    assert ids[0].tolist() == [BOS_ID, TOK.ids["a"], UNK_ID, TOK.ids["red"],
                               TOK.ids["circle"], EOS_ID]
    assert TOK.decode(ids[0]) == "a <unk> red circle"


def test_decode_skips_pad_and_bos_and_stops_at_eos():
    a, red = TOK.ids["a"], TOK.ids["red"]
    assert TOK.decode([BOS_ID, a, PAD_ID, red, EOS_ID, a, a]) == "a red"
    assert TOK.decode(np.array([EOS_ID, a], np.int32)) == ""
    assert TOK.decode(np.array([a, red], np.int64)) == "a red"   # no <eos>: the whole row
    assert TOK.decode_batch(np.array([[BOS_ID, a, EOS_ID], [BOS_ID, red, EOS_ID]])) == ["a", "red"]


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red circle, left-of it.") == ["a", "red", "circle", "left", "of", "it"]
    assert tokenize("  ") == [] and tokenize("...!") == []
    assert tokenize("The dog's ball (7 of them)!") == ["the", "dog's", "ball", "7", "of",
                                                       "them"]
    assert normalize("  A small RED circle. ") == "a small red circle"


def test_punctuation_and_case_do_not_change_the_ids():
    ids = TOK.encode(["a small red circle"])
    for variant in ("A small red circle.", "a Small, red circle!", "  a small red circle ?"):
        assert TOK.encode([variant]).tolist() == ids.tolist(), variant
    # the built-in captions are already normalized: the built-in world is unchanged
    ds = World(max_objects=3).sample(300, np.random.default_rng(1))
    assert [normalize(c) for c in ds.captions] == ds.captions


def test_from_captions_is_sorted_and_counts():
    caps = ["The dog runs.", "the cat runs", "a dog"]
    tok = Tokenizer.from_captions(caps)
    assert tok.words == ["a", "cat", "dog", "runs", "the"]
    assert Tokenizer.from_captions(caps[::-1]) == tok
    assert Tokenizer.from_captions(caps, min_count=2).words == ["dog", "runs", "the"]
    assert tok.decode(tok.encode(["The dog runs."])[0]) == "the dog runs"
    assert tok.max_words(caps) == 3


def test_truncation():
    with pytest.raises(ValueError, match=r"captions\[0\] must fit in max_len=4 tokens.*got 6"):
        TOK.encode(["a small red circle"], max_len=4)
    ids = TOK.encode(["a small red circle"], max_len=4, truncate=True)
    assert ids[0].tolist() == [BOS_ID, TOK.ids["a"], TOK.ids["small"], TOK.ids["red"]]
    assert TOK.decode(ids[0]) == "a small red"


def test_json_round_trip():
    d = json.loads(json.dumps(TOK.to_dict()))
    assert d == {"format": "minivlmoe.tokenizer", "version": 1, "words": grammar_words()}
    assert Tokenizer.from_dict(d) == TOK
    assert Tokenizer.from_dict(d).encode(["a small red circle"]).tolist() == \
        TOK.encode(["a small red circle"]).tolist()


@pytest.mark.parametrize("d, error, match", [
    ([1, 2], TypeError, "d must be a dict"),
    ({"format": "other", "version": 1, "words": []}, ValueError, "d must have format"),
    ({"format": "minivlmoe.tokenizer", "version": 2, "words": []}, ValueError, "version 2"),
    ({"format": "minivlmoe.tokenizer", "version": 1, "words": "ab"}, ValueError,
     "exactly the keys"),
    ({"format": "minivlmoe.tokenizer", "version": 1, "words": [], "x": 1}, ValueError,
     "exactly the keys"),
    ({"format": "minivlmoe.tokenizer", "version": 1, "words": ["a", "a"]}, ValueError,
     "must not repeat"),
])
def test_from_dict_rejects_bad_input(d, error, match):
    with pytest.raises(error, match=match):
        Tokenizer.from_dict(d)


@pytest.mark.parametrize("words, error, match", [
    ("abc", TypeError, "single str"),
    (["a", 3], TypeError, r"words\[1\] must be a str"),
    (["a", "Red"], ValueError, r"words\[1\] must be one lowercase word.*'Red'"),
    (["two words"], ValueError, r"words\[0\] must be one lowercase word"),
    (["a", "."], ValueError, r"words\[1\] must be one lowercase word \(no punctuation\)"),
    (["<pad>"], ValueError, "not a special token"),
    ([""], ValueError, r"words\[0\]"),
])
def test_constructor_rejects_bad_words(words, error, match):
    with pytest.raises(error, match=match):
        Tokenizer(words)


def test_encode_and_decode_reject_bad_input():
    with pytest.raises(TypeError, match="captions must be a list of str, got str"):
        TOK.encode("a small red circle")
    with pytest.raises(TypeError, match=r"captions\[1\] must be a str, got NoneType"):
        TOK.encode(["a", None])
    with pytest.raises(ValueError, match="captions must hold at least one caption"):
        TOK.encode([])
    with pytest.raises(ValueError, match=r"max_len must be in \[2, inf\], got 1"):
        TOK.encode(["a"], max_len=1)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 19\] \(V=20\), got values in"):
        TOK.decode([1, 20])
    with pytest.raises(TypeError, match="ids must have an integer dtype, got float64"):
        TOK.decode(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"ids must have 1 dimensions \(T,\)"):
        TOK.decode(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"ids must have 2 dimensions \(B, T\)"):
        TOK.decode_batch(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"min_count must be in \[1, inf\], got 0"):
        Tokenizer.from_captions(["a"], min_count=0)
