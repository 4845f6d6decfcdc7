"""The built-in image-caption world, and the dataset type that also holds your own data.

The world
---------
Each image is R x R RGB (default 32 x 32, float32 in [0, 1]) on a black background, with
one to ``max_objects`` (default 2, at most 3) objects that never overlap.  An object is

* a **shape**: circle, square, triangle (apex up) or cross (a plus sign);
* a **color**: red, green, blue, yellow, magenta or cyan (saturated, well separated);
* a **size**: small (a box of R/4 pixels a side, 8 at R=32) or large (7R/16, 14 at R=32);
* a **position**: the top-left corner of its box, drawn at random.

Images with two or three objects have a **layout**: a *row* (objects side by side) or a
*column* (objects stacked).  In a row, the objects' x-ranges are disjoint, separated by at
least one pixel, and their y-ranges all overlap, so "left of" is true and "above" is not;
a column is the same with the axes swapped.  Three objects only fit along one axis when at
most one is large, so three-object images are drawn only from size combinations that fit.

The grammar
-----------
The caption is a deterministic function of the image's record (a perfect captioner can
reach exact match)::

    caption  := object (relation object)*      objects in reading order:
    object   := "a" size color shape           left to right in a row,
    relation := "left of" | "above"            top to bottom in a column

    "a large cyan cross"
    "a small red circle left of a large blue square"
    "a small green triangle above a small red circle above a large yellow cross"

One caption uses one relation.  :func:`parse_caption` inverts :func:`caption_of`.

The split
---------
:meth:`World.splits` draws a train and a test split from independent streams of one seed.
A few (color, shape) pairs are **held out** (default :data:`DEFAULT_HELDOUT`: each shape
once, with four different colors, so every color and every shape is still seen in
training): no training image contains them.  In the test split a fraction
``heldout_fraction`` of the images (exactly ``round(heldout_fraction * n_test)``) each
contain one held-out object, the rest contain only seen pairs; ``dataset.heldout`` marks
them, so compositional generalization can be measured separately.

Your own data
-------------
``ImageCaptionDataset(images, captions)`` validates and holds any (B, R, R, 3) images with
B captions; the generator returns the same type, with ``records`` and ``heldout`` set.

Axis letters (see minivlmoe/__init__.py): B images, R image side, Ch = 3 channels, and
M object slots (``max_objects``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import NamedTuple

import numpy as np

from ._checks import check_array, check_float, check_int

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "large")
RELATIONS = ("left of", "above")        # index 0: a row layout, index 1: a column layout
# Row c is the RGB value of COLORS[c]; pairwise distances are all >= 0.7.
PALETTE = np.array([[1.00, 0.15, 0.15],   # red
                    [0.15, 0.85, 0.15],   # green
                    [0.15, 0.20, 1.00],   # blue
                    [1.00, 0.90, 0.10],   # yellow
                    [0.90, 0.20, 0.90],   # magenta
                    [0.10, 0.90, 0.95]],  # cyan
                   dtype=np.float32)      # (6, 3)
# Held out of training: every shape once, each with a different color.
DEFAULT_HELDOUT = (("red", "triangle"), ("green", "cross"),
                   ("blue", "circle"), ("yellow", "square"))
MAX_OBJECTS = 3
MIN_IMAGE_SIZE = 16
GAP = 1    # minimum number of black pixels between two objects' boxes along the layout axis


def grammar_words():
    """Every word the grammar can produce, in a fixed order (a tokenizer's vocabulary)."""
    return ["a", *SIZES, *COLORS, *SHAPES, "left", "of", "above"]


def max_caption_words(max_objects=2):
    """Number of words in the longest caption with ``max_objects`` objects."""
    max_objects = check_int("max_objects", max_objects, 1, MAX_OBJECTS)
    return 4 * max_objects + 2 * (max_objects - 1)


# ---------------------------------------------------------------------------- captions

class Scene(NamedTuple):
    """What a caption says: the objects in reading order and the relation between them.

    objects : tuple of (size, color, shape) string triples, e.g. ("small", "red", "circle").
    relation : "left of", "above", or None for a single object.
    """
    objects: tuple
    relation: str | None


def caption_of(scene):
    """The canonical caption of a :class:`Scene` (the grammar in the module docstring)."""
    phrases = [f"a {size} {color} {shape}" for size, color, shape in scene.objects]
    return f" {scene.relation} ".join(phrases)


def parse_caption(caption):
    """Decode a caption of the grammar back into a :class:`Scene`.

    Whitespace and letter case are normalized; anything else outside the grammar raises
    ``ValueError`` naming the word position, what was expected and what was found.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    words = caption.lower().split()
    objects, relation, i = [], None, 0

    def expect(choices, what):
        nonlocal i
        got = words[i] if i < len(words) else "the end of the caption"
        if got not in choices:
            raise ValueError(f"caption {caption!r} is not in the grammar: expected {what} "
                             f"{sorted(choices)} at word {i}, got {got!r}")
        i += 1
        return got

    while True:
        expect({"a"}, "the article")
        size = expect(SIZES, "a size")
        color = expect(COLORS, "a color")
        shape = expect(SHAPES, "a shape")
        objects.append((size, color, shape))
        if i == len(words):
            return Scene(tuple(objects), relation)
        first = expect({"left", "above"}, "the end or a relation")
        rel = "left of" if first == "left" else "above"
        if first == "left":
            expect({"of"}, "'of' after 'left'")
        if relation is not None and rel != relation:
            raise ValueError(f"caption {caption!r} is not in the grammar: it mixes the "
                             f"relations {relation!r} and {rel!r}")
        relation = rel


# ---------------------------------------------------------------------------- records

class Records(NamedTuple):
    """Ground truth of B generated images; object slots are in caption (reading) order.

    n_objects : (B,) int, objects per image.
    relation : (B,) int, index into RELATIONS (0 row, 1 column), -1 for one object.
    size, color, shape : (B, M) int, indices into SIZES, COLORS, SHAPES; -1 = empty slot.
    top, left : (B, M) int, pixel row and column of each object's box corner; -1 = empty.
    extent : (B, M) int, side of each object's square box in pixels; 0 = empty.
    """
    n_objects: np.ndarray
    relation: np.ndarray
    size: np.ndarray
    color: np.ndarray
    shape: np.ndarray
    top: np.ndarray
    left: np.ndarray
    extent: np.ndarray

    def scene(self, i):
        """The :class:`Scene` of image ``i`` (its caption is ``caption_of(scene)``)."""
        n = int(self.n_objects[i])
        objects = tuple((SIZES[self.size[i, m]], COLORS[self.color[i, m]],
                         SHAPES[self.shape[i, m]]) for m in range(n))
        return Scene(objects, RELATIONS[self.relation[i]] if n > 1 else None)

    def subset(self, idx):
        """Records of the images ``idx`` (an index array or slice)."""
        return Records(*(field[idx] for field in self))


# ---------------------------------------------------------------------------- the dataset

class ImageCaptionDataset:
    """Images paired with captions: the built-in world's output, or your own data.

    Parameters
    ----------
    images : ndarray (B, R, R, 3), float32 or float64 in [0, 1] (kept as given), or uint8
        in [0, 255] (converted to float32 / 255).
    captions : list (or tuple) of B non-empty str, ``captions[b]`` describing ``images[b]``.
    records : Records or None, ground truth of generated images.
    heldout : (B,) bool or None, marks images that contain a held-out (color, shape) pair.
    """

    def __init__(self, images, captions, *, records=None, heldout=None):
        self.images = _check_images("images", images)                 # (B, R, R, 3)
        self.captions = _check_captions("captions", captions, self.images.shape[0])
        n = len(self.captions)
        if records is not None:
            if not isinstance(records, Records):
                raise TypeError(f"records must be a Records or None, got "
                                f"{type(records).__name__}")
            if records.n_objects.shape != (n,):
                raise ValueError(f"records must describe {n} images, got "
                                 f"{records.n_objects.shape[0]}")
        if heldout is not None:
            check_array("heldout", heldout, ndim=1, axes="(B,)", dtype_kind="b")
            if heldout.shape != (n,):
                raise ValueError(f"heldout must have shape ({n},), got {heldout.shape}")
        self.records = records
        self.heldout = heldout

    def __len__(self):
        return len(self.captions)

    def __repr__(self):
        return (f"ImageCaptionDataset({len(self)} images of {self.image_size}x"
                f"{self.image_size}, dtype={self.images.dtype})")

    @property
    def image_size(self):
        """R, the image height and width in pixels."""
        return self.images.shape[1]

    def subset(self, idx):
        """A dataset of the images ``idx`` (an integer index array or a slice)."""
        idx = np.arange(len(self))[idx]                                # (b,)
        return ImageCaptionDataset(
            self.images[idx], [self.captions[i] for i in idx],         # (b, R, R, 3)
            records=None if self.records is None else self.records.subset(idx),
            heldout=None if self.heldout is None else self.heldout[idx])

    def astype(self, dtype):
        """The same dataset with images cast to float32 or float64."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        return ImageCaptionDataset(self.images.astype(dtype), self.captions,
                                   records=self.records, heldout=self.heldout)

    def batches(self, batch_size, rng, *, drop_last=False):
        """One shuffled pass: yields sub-datasets of ``batch_size`` images (see
        :func:`minibatch_indices`)."""
        for idx in minibatch_indices(len(self), batch_size, rng, drop_last=drop_last):
            yield self.subset(idx)


def _check_images(name, images):
    check_array(name, images, ndim=4, axes="(B, R, R, 3)", dtype_kind=None, finite=True)
    if images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{name} must be square RGB images of shape (B, R, R, 3), "
                         f"got shape {images.shape}")
    if images.shape[0] == 0 or images.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one image of at least 1 pixel, "
                         f"got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255)             # (B, R, R, 3)
    if images.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64 (values in [0, 1]) or "
                        f"uint8 (values in [0, 255]), got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must have values in [0, 1] (float dtype), got values "
                         f"in [{lo:g}, {hi:g}]")
    return images


def _check_captions(name, captions, n):
    if not isinstance(captions, (list, tuple)):
        raise TypeError(f"{name} must be a list of str, got {type(captions).__name__}")
    if len(captions) != n:
        raise ValueError(f"{name} must hold one caption per image ({n} images), got "
                         f"{len(captions)} captions")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(caption).__name__} "
                            f"{caption!r}")
        if not caption.strip():
            raise ValueError(f"{name}[{i}] must be a non-empty caption, got {caption!r}")
    return list(captions)


def minibatch_indices(n, batch_size, rng, *, drop_last=False):
    """One shuffled pass over ``range(n)`` in batches; deterministic given ``rng``'s state.

    Yields (b,) int64 index arrays, b = batch_size (the last may be shorter unless
    ``drop_last``).  Every index appears exactly once per pass (at most once if dropped).
    """
    n = check_int("n", n, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    order = rng.permutation(n)                                         # (n,)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]                          # (b,)


def to_uint8(images):
    """(B, R, R, 3) float images in [0, 1] -> uint8 in [0, 255] (rounded)."""
    images = _check_images("images", images)
    return np.rint(images * 255).astype(np.uint8)                      # (B, R, R, 3)


def to_ascii(image):
    """One (R, R, 3) image as R lines of text: a color's initial (R G B Y M C) per object
    pixel, '.' for background; a quick look without matplotlib."""
    check_array("image", image, ndim=3, axes="(R, R, 3)", dtype_kind="f")
    palette = np.concatenate([np.zeros((1, 3), np.float32), PALETTE])  # (7, 3)
    dist = ((image[:, :, None, :] - palette) ** 2).sum(-1)            # (R, R, 7)
    letters = np.array(list(".RGBYMC"))[dist.argmin(-1)]              # (R, R)
    return "\n".join("".join(row) for row in letters)


# ---------------------------------------------------------------------------- the world

class Splits(NamedTuple):
    """train and test ImageCaptionDatasets; ``test.heldout`` marks held-out images."""
    train: ImageCaptionDataset
    test: ImageCaptionDataset


@dataclass(frozen=True)
class World:
    """The knobs of the built-in world (see the module docstring).

    Parameters
    ----------
    image_size : int >= 16, R.
    max_objects : int in [1, 3], objects per image are uniform in [1, max_objects].
    noise : float in [0, 0.5], std of Gaussian pixel noise added after rendering (clipped
        to [0, 1]); 0 gives exact colors.
    heldout : tuple of (color, shape) pairs never drawn in training images.
    heldout_fraction : float in [0, 1], fraction of test images with one held-out object.
    """
    image_size: int = 32
    max_objects: int = 2
    noise: float = 0.0
    heldout: tuple = DEFAULT_HELDOUT
    heldout_fraction: float = 0.2

    def __post_init__(self):
        check_int("image_size", self.image_size, MIN_IMAGE_SIZE)
        check_int("max_objects", self.max_objects, 1, MAX_OBJECTS)
        check_float("noise", self.noise, 0.0, 0.5)
        check_float("heldout_fraction", self.heldout_fraction, 0.0, 1.0)
        if not isinstance(self.heldout, (tuple, list)):
            raise TypeError(f"heldout must be a tuple of (color, shape) pairs, got "
                            f"{type(self.heldout).__name__}")
        pairs = []
        for pair in self.heldout:
            if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                    or pair[0] not in COLORS or pair[1] not in SHAPES):
                raise ValueError(f"heldout must hold (color, shape) pairs with a color in "
                                 f"{list(COLORS)} and a shape in {list(SHAPES)}, got {pair!r}")
            pairs.append((pair[0], pair[1]))
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"heldout must not repeat a pair, got {pairs}")
        object.__setattr__(self, "heldout", tuple(pairs))
        for color in COLORS:
            if all((color, shape) in pairs for shape in SHAPES):
                raise ValueError(f"heldout must leave every color at least one seen pair, "
                                 f"got all pairs with color {color!r} held out")
        for shape in SHAPES:
            if all((color, shape) in pairs for color in COLORS):
                raise ValueError(f"heldout must leave every shape at least one seen pair, "
                                 f"got all pairs with shape {shape!r} held out")

    @property
    def extents(self):
        """(small, large) object box sides in pixels."""
        R = self.image_size
        return max(4, round(R / 4)), round(7 * R / 16)

    @property
    def max_tokens(self):
        """T for the tokenizer: the longest caption's words + <bos> + <eos>."""
        return max_caption_words(self.max_objects) + 2

    def pair_ids(self):
        """(seen, held) int arrays of pair ids ``color * len(SHAPES) + shape``."""
        held = np.array([COLORS.index(c) * len(SHAPES) + SHAPES.index(s)
                         for c, s in self.heldout], dtype=np.int64)    # (number held,)
        seen = np.setdiff1d(np.arange(len(COLORS) * len(SHAPES)), held)  # (number seen,)
        return seen, held

    def sample(self, n, rng, *, split="train"):
        """Draw ``n`` images with captions and records.

        ``split="train"`` never draws a held-out pair; ``split="test"`` gives exactly
        ``round(heldout_fraction * n)`` images one held-out object (all objects of the
        other images are seen pairs).  Returns an :class:`ImageCaptionDataset` with
        ``records`` and ``heldout`` (B,) set.
        """
        n = check_int("n", n, 1)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        n_held = round(self.heldout_fraction * n) if split == "test" and self.heldout else 0
        records = _sample_records(self, n, n_held, rng)
        images = _render(records, self.image_size)                     # (B, R, R, 3)
        if self.noise > 0:
            images += np.float32(self.noise) * rng.standard_normal(images.shape,
                                                                   dtype=np.float32)
            np.clip(images, 0.0, 1.0, out=images)
        captions = [caption_of(records.scene(i)) for i in range(n)]
        held = np.isin(records.color * len(SHAPES) + records.shape,
                       self.pair_ids()[1]) & (records.extent > 0)      # (B, M)
        return ImageCaptionDataset(images, captions, records=records,
                                   heldout=held.any(axis=1))           # (B,)

    def splits(self, seed=0, n_train=4096, n_test=512):
        """Train and test splits from two independent streams of ``seed``."""
        seed = check_int("seed", seed, 0)
        train_ss, test_ss = np.random.SeedSequence(seed).spawn(2)
        return Splits(self.sample(n_train, np.random.default_rng(train_ss), split="train"),
                      self.sample(n_test, np.random.default_rng(test_ss), split="test"))


def make_splits(seed=0, n_train=4096, n_test=512, **world_options):
    """``World(**world_options).splits(seed, n_train, n_test)``: the usual entry point."""
    return World(**world_options).splits(seed, n_train, n_test)


def _sample_records(world, n, n_held, rng):
    """Draw attributes and positions of n images; the first step of :meth:`World.sample`."""
    R, M = world.image_size, world.max_objects
    small, large = world.extents
    n_objects = rng.integers(1, M + 1, size=n)                         # (B,)
    relation = np.where(n_objects > 1, rng.integers(0, 2, size=n), -1)  # (B,)
    exists = np.arange(M) < n_objects[:, None]                         # (B, M)

    # (color, shape) pairs: seen pairs everywhere, then one held-out object in n_held images
    seen, held = world.pair_ids()
    pair = seen[rng.integers(len(seen), size=(n, M))]                  # (B, M)
    if n_held:
        rows = rng.permutation(n)[:n_held]                             # (n_held,)
        slots = rng.integers(n_objects[rows])                          # (n_held,)
        pair[rows, slots] = held[rng.integers(len(held), size=n_held)]
    color, shape = np.divmod(pair, len(SHAPES))                        # (B, M) each

    size = np.full((n, M), -1)                                         # (B, M)
    top = np.full((n, M), -1)                                          # (B, M)
    left = np.full((n, M), -1)                                         # (B, M)
    for k in range(1, M + 1):      # images with k objects: positions depend on k
        rows = np.flatnonzero(n_objects == k)                          # (Bk,)
        # sizes: uniform over the size tuples whose boxes fit along one axis
        fits = [t for t in product((0, 1), repeat=k)
                if sum((small, large)[s] for s in t) + (k - 1) * GAP <= R]
        size_k = np.array(fits)[rng.integers(len(fits), size=len(rows))]  # (Bk, k)
        ext = np.where(size_k == 1, large, small)                      # (Bk, k)
        if k == 1:
            top_k = rng.integers(0, R - ext + 1)                       # (Bk, 1)
            left_k = rng.integers(0, R - ext + 1)                      # (Bk, 1)
        else:
            along, across = _layout(ext, R, small, rng)                # (Bk, k) each
            row = relation[rows, None] == 0                            # (Bk, 1)
            top_k = np.where(row, across, along)                       # (Bk, k)
            left_k = np.where(row, along, across)                      # (Bk, k)
        size[rows, :k], top[rows, :k], left[rows, :k] = size_k, top_k, left_k
    extent = np.where(exists, np.where(size == 1, large, small), 0)    # (B, M)
    color, shape = np.where(exists, color, -1), np.where(exists, shape, -1)
    return Records(n_objects, relation, size, color, shape, top, left, extent)


def _layout(ext, R, small, rng):
    """Box corners of k >= 2 objects per image along and across the layout axis.

    Along: boxes in order with >= GAP pixels between them; the free pixels are split at
    random into the k + 1 gaps.  Across: corners at ``c + u - ext // 2`` for one center
    ``c`` per image and a jitter ``|u| <= J = small // 2 - 1`` per object, so any two
    boxes' across-ranges overlap (|u1 - u2| <= 2J < the smaller half-sizes' sum).
    """
    Bk, k = ext.shape
    slack = R - ext.sum(1) - (k - 1) * GAP                             # (Bk,) >= 0
    w = rng.random((Bk, k + 1))                                        # (Bk, k+1)
    free = np.floor(w / w.sum(1, keepdims=True) * slack[:, None]).astype(np.int64)
    step = np.concatenate([np.zeros((Bk, 1), np.int64), ext[:, :-1] + GAP], axis=1)
    along = np.cumsum(free[:, :k] + step, axis=1)                      # (Bk, k)
    J = small // 2 - 1
    widest = ext.max(1)                                                # (Bk,)
    center = rng.integers(J + widest // 2, R - J - (widest - widest // 2) + 1)  # (Bk,)
    jitter = rng.integers(-J, J + 1, size=(Bk, k))                     # (Bk, k)
    across = center[:, None] + jitter - ext // 2                       # (Bk, k)
    return along, across


def shape_mask(shape, p, q):
    """Is the point (p, q) inside ``shape``?  Box coordinates: p runs left to right and
    q top to bottom, both from -1 to 1 across the object's box; arrays broadcast."""
    if shape == "circle":
        return p * p + q * q <= 1.0
    if shape == "square":
        return (np.abs(p) <= 1.0) & (np.abs(q) <= 1.0)
    if shape == "triangle":                        # apex at the top, base on the bottom edge
        return np.abs(p) <= (q + 1.0) / 2.0
    if shape == "cross":                           # a plus sign, bars a third of the box wide
        return (np.abs(p) <= 1.0 / 3.0) | (np.abs(q) <= 1.0 / 3.0)
    raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")


def _render(records, R):
    """Paint every object of ``records`` on black (B, R, R, 3) float32 images.

    Each object is drawn in a local (L, L) window at its box corner (L = largest box):
    pixel (i, j) of the window has box coordinates p = (j + 0.5) / (s / 2) - 1 and
    q = (i + 0.5) / (s / 2) - 1 for a box of side s, is inside the box when p, q < 1, and
    is painted when it is inside the object's shape.  Boxes never overlap.
    """
    B, M = records.extent.shape
    images = np.zeros((B, R, R, 3), dtype=np.float32)                  # (B, R, R, 3)
    L = int(records.extent.max())
    ij = np.arange(L) + 0.5                                            # (L,)
    for m in range(M):                                                 # object slots
        b = np.flatnonzero(records.extent[:, m] > 0)                   # (Bm,)
        half = records.extent[b, m][:, None, None] / 2.0               # (Bm, 1, 1)
        q = ij[None, :, None] / half - 1.0                             # (Bm, L, 1)
        p = ij[None, None, :] / half - 1.0                             # (Bm, 1, L)
        masks = np.stack([shape_mask(s, p, q) for s in SHAPES])        # (4, Bm, L, L)
        mask = masks[records.shape[b, m], np.arange(len(b))]           # (Bm, L, L)
        mask &= (p < 1.0) & (q < 1.0)
        nb, i, j = np.nonzero(mask)                                    # (painted,) each
        rows = b[nb]                                                   # (painted,)
        images[rows, records.top[rows, m] + i, records.left[rows, m] + j] = \
            PALETTE[records.color[rows, m]]                            # (painted, 3)
    return images
