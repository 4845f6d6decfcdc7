"""Word-level tokenizer: captions <-> (B, T) int32 token ids.

Vocabulary
----------
Ids 0..3 are the special tokens, then one id per word::

    0 <pad>   fills a caption's row after <eos>
    1 <bos>   first token of every row
    2 <eos>   ends the caption
    3 <unk>   any word not in the vocabulary
    4 ...     the words, in the order given (``Tokenizer(words)``) or sorted
              (``Tokenizer.from_captions(captions)``)

For the built-in world use ``Tokenizer(scenes.grammar_words())``: 16 words, V = 20.

Text to words
-------------
:func:`tokenize` lowercases a text and splits it into words: runs of letters and digits
(``\\w+``), an apostrophe inside a word kept ("dog's"); punctuation and white space only
separate words and are dropped, so "A red circle." -> ["a", "red", "circle"] and
"left-of" -> ["left", "of"].  A decoded caption is its words joined by single spaces, and
:func:`normalize` is that form of any text: two captions with the same words are the same
caption to the model, and the metrics compare captions in this form (the built-in
captions, lowercase without punctuation, are unchanged by it).

Encoding
--------
``encode(captions, max_len)`` returns ids (B, T=max_len)::

    <bos> w1 w2 ... wn <eos> <pad> ... <pad>

A caption longer than ``max_len - 2`` words raises ``ValueError`` unless
``truncate=True``, which keeps ``<bos>`` and the first ``max_len - 1`` words (no
``<eos>``: the row does not claim the caption ended).  ``decode`` skips ``<pad>`` and
``<bos>`` and stops at the first ``<eos>``.

Saving
------
``to_dict()`` is a JSON-able dict (format name, version, words); ``from_dict`` checks it.
"""

from __future__ import annotations

import re

import numpy as np

from ._checks import check_array, check_bool, check_int, shorten

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FORMAT = "minivlmoe.tokenizer"
VERSION = 1
_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")


def tokenize(text):
    """Lowercase ``text`` and split it into words; punctuation is dropped (module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def normalize(text):
    """The words of ``text`` joined by single spaces: "A red circle." -> "a red circle"."""
    return " ".join(tokenize(text))


class Tokenizer:
    """A fixed word vocabulary with the special tokens <pad>=0, <bos>=1, <eos>=2, <unk>=3.

    Parameters
    ----------
    words : iterable of str, the vocabulary after the special tokens, in id order; each
        word must be what :func:`tokenize` makes of it (one lowercase word, no
        punctuation), not repeated.
    """

    def __init__(self, words):
        if isinstance(words, str):
            raise TypeError("words must be an iterable of str, got a single str")
        if not hasattr(words, "__iter__"):
            raise TypeError(f"words must be an iterable of str, got {type(words).__name__}")
        words = list(words)
        for i, word in enumerate(words):
            if not isinstance(word, str):
                raise TypeError(f"words[{i}] must be a str, got {type(word).__name__}")
            if word in SPECIALS or tokenize(word) != [word]:
                raise ValueError(f"words[{i}] must be one lowercase word (no punctuation) "
                                 f"and not a special token, got {shorten(repr(word))}")
        if len(set(words)) != len(words):
            dup = next(w for w in words if words.count(w) > 1)
            raise ValueError(f"words must not repeat a word, got {shorten(repr(dup))} more "
                             f"than once")
        self.vocab = list(SPECIALS) + words                  # id -> token string
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}  # token string -> id

    @classmethod
    def from_captions(cls, captions, min_count=1):
        """Vocabulary of every word seen at least ``min_count`` times, sorted (so it does
        not depend on the captions' order)."""
        captions = _check_captions(captions)
        min_count = check_int("min_count", min_count, 1)
        counts = {}
        for caption in captions:
            for word in tokenize(caption):
                counts[word] = counts.get(word, 0) + 1
        return cls(sorted(w for w, c in counts.items() if c >= min_count))

    @property
    def vocab_size(self):
        """V, the number of ids (special tokens included)."""
        return len(self.vocab)

    @property
    def words(self):
        """The vocabulary without the special tokens, in id order."""
        return self.vocab[len(SPECIALS):]

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and self.vocab == other.vocab

    def __repr__(self):
        return f"Tokenizer(V={self.vocab_size})"

    def max_words(self, captions):
        """The number of words in the longest of ``captions``."""
        return max(len(tokenize(c)) for c in _check_captions(captions))

    def encode(self, captions, max_len=None, *, truncate=False):
        """Captions -> ids (B, T) int32: <bos> words <eos> then <pad> up to T = max_len.

        ``max_len=None`` uses the longest caption's length + 2.  Unknown words -> <unk>.
        """
        captions = _check_captions(captions)
        truncate = check_bool("truncate", truncate)
        words = [tokenize(c) for c in captions]
        if max_len is None:
            max_len = max(len(w) for w in words) + 2
        max_len = check_int("max_len", max_len, 2)
        ids = np.full((len(captions), max_len), PAD_ID, dtype=np.int32)  # (B, T)
        for b, caption_words in enumerate(words):          # string work: one row per caption
            row = [BOS_ID] + [self.ids.get(w, UNK_ID) for w in caption_words] + [EOS_ID]
            if len(row) > max_len:
                if not truncate:
                    raise ValueError(f"captions[{b}] must fit in max_len={max_len} tokens "
                                     f"(<bos> + words + <eos>), got {len(row)}: "
                                     f"{shorten(repr(captions[b]))}; raise max_len or pass "
                                     f"truncate=True")
                row = row[:max_len]
            ids[b, :len(row)] = row
        return ids

    def decode(self, ids):
        """One row of ids (T,) -> str: skip <pad> and <bos>, stop at the first <eos>."""
        ids = self._check_ids(ids, ndim=1, axes="(T,)")
        out = []
        for i in ids.tolist():
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(self.vocab[i])
        return " ".join(out)

    def decode_batch(self, ids):
        """ids (B, T) -> list of B str, each as :meth:`decode`."""
        ids = self._check_ids(ids, ndim=2, axes="(B, T)")
        return [self.decode(row) for row in ids]

    def _check_ids(self, ids, ndim, axes):
        if isinstance(ids, (list, tuple)):                  # floats stay floats: refused below
            try:
                ids = np.asarray(ids) if len(ids) else np.zeros((0,) * ndim, dtype=np.int64)
            except ValueError:                              # ragged rows
                raise ValueError(f"ids must be a rectangular {axes} array of ints, got "
                                 f"{shorten(repr(ids))}") from None
        check_array("ids", ids, ndim=ndim, axes=axes, dtype_kind="i")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size - 1}] (V={self.vocab_size}),"
                             f" got values in [{ids.min()}, {ids.max()}]")
        return ids

    def to_dict(self):
        """A JSON-able description: ``{"format", "version", "words"}``."""
        return {"format": FORMAT, "version": VERSION, "words": list(self.words)}

    @classmethod
    def from_dict(cls, d):
        """Rebuild a tokenizer from :meth:`to_dict`'s output, checking format and version."""
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict from Tokenizer.to_dict, got {type(d).__name__}")
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"d must have format {FORMAT!r} version {VERSION}, got format "
                             f"{d.get('format')!r} version {d.get('version')!r}")
        if set(d) != {"format", "version", "words"} or not isinstance(d["words"], list):
            raise ValueError(f"d must have exactly the keys format, version and words "
                             f"(a list), got keys {sorted(d)}")
        return cls(d["words"])


def _check_captions(captions):
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        hint = " (wrap a single caption in a list)" if isinstance(captions, str) else ""
        raise TypeError(f"captions must be a list of str, got {type(captions).__name__}{hint}")
    if not captions:
        raise ValueError("captions must hold at least one caption, got an empty list")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions[{i}] must be a str, got {type(caption).__name__}")
    return captions
