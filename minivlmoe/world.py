"""The built-in image-caption world: drawing images, their captions and the held-out split.

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
Each image's caption follows the grammar of :mod:`minivlmoe.scenes`.

The split
---------
:meth:`World.splits` draws a train and a test split from independent streams of one seed.
A few (color, shape) pairs are **held out** (default :data:`DEFAULT_HELDOUT`: each shape
once, with four different colors, so every color and every shape is still seen in
training): no training image contains them.  In the test split a fraction
``heldout_fraction`` of the images (exactly ``round(heldout_fraction * n_test)``) each
contain one held-out object, the rest contain only seen pairs; ``dataset.heldout`` marks
them, so compositional generalization can be measured separately.  The generator returns
:class:`minivlmoe.data.ImageCaptionDataset` objects with ``records`` and ``heldout`` set.

Axis letters (see minivlmoe/__init__.py): B images, R image side, Ch = 3 channels, and
O object slots (``max_objects``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import product
from typing import NamedTuple

import numpy as np

from ._checks import check_array, check_float, check_int, check_rng, shorten
from .data import ImageCaptionDataset
from .scenes import (COLORS, MAX_OBJECTS, SHAPES, Records, caption_of,
                     max_caption_words)

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
MIN_IMAGE_SIZE = 16
GAP = 1    # minimum number of black pixels between two objects' boxes along the layout axis


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
                                 f"{list(COLORS)} and a shape in {list(SHAPES)}, got "
                                 f"{shorten(repr(pair))}")
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
                         for c, s in self.heldout], dtype=np.int64)    # held-out pair ids
        seen = np.setdiff1d(np.arange(len(COLORS) * len(SHAPES)), held)  # seen pair ids
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
            raise ValueError(f"split must be 'train' or 'test', got {shorten(repr(split))}")
        check_rng("rng", rng)
        n_held = round(self.heldout_fraction * n) if split == "test" and self.heldout else 0
        records = _sample_records(self, n, n_held, rng)
        images = _render(records, self.image_size)                     # (B, R, R, 3)
        if self.noise > 0:
            images += np.float32(self.noise) * rng.standard_normal(images.shape,
                                                                   dtype=np.float32)
            np.clip(images, 0.0, 1.0, out=images)
        captions = [caption_of(records.scene(i)) for i in range(n)]
        held = np.isin(records.color * len(SHAPES) + records.shape,
                       self.pair_ids()[1]) & (records.extent > 0)      # (B, O)
        return ImageCaptionDataset(images, captions, records=records,
                                   heldout=held.any(axis=1))           # (B,)

    def splits(self, seed=0, n_train=4096, n_test=512):
        """Train and test splits from two independent streams of ``seed``."""
        seed = check_int("seed", seed, 0)
        check_int("n_train", n_train, 1)
        check_int("n_test", n_test, 1)
        train_ss, test_ss = np.random.SeedSequence(seed).spawn(2)
        train = self.sample(n_train, np.random.default_rng(train_ss), split="train")
        test = self.sample(n_test, np.random.default_rng(test_ss), split="test")
        return Splits(train=train, test=test)


def make_splits(seed=0, n_train=4096, n_test=512, **world_options):
    """``World(**world_options).splits(seed, n_train, n_test)``: the usual entry point."""
    known = [f.name for f in fields(World)]
    unknown = sorted(set(world_options) - set(known))
    if unknown:
        raise TypeError(f"world_options must be World fields {known}, got unknown {unknown}")
    return World(**world_options).splits(seed, n_train, n_test)


def _sample_records(world, n, n_held, rng):
    """Draw attributes and positions of n images; the first step of :meth:`World.sample`."""
    R, n_slots = world.image_size, world.max_objects
    small, large = world.extents
    n_objects = rng.integers(1, n_slots + 1, size=n)                   # (B,)
    relation = np.where(n_objects > 1, rng.integers(0, 2, size=n), -1)  # (B,)
    exists = np.arange(n_slots) < n_objects[:, None]                   # (B, O)

    # (color, shape) pairs: seen pairs everywhere, then one held-out object in n_held images
    seen, held = world.pair_ids()
    pair = seen[rng.integers(len(seen), size=(n, n_slots))]            # (B, O)
    if n_held:
        rows = rng.permutation(n)[:n_held]                             # (Bh,)
        slots = rng.integers(n_objects[rows])                          # (Bh,)
        pair[rows, slots] = held[rng.integers(len(held), size=n_held)]
    color, shape = np.divmod(pair, len(SHAPES))                        # (B, O) each

    size = np.full((n, n_slots), -1)                                   # (B, O)
    top = np.full((n, n_slots), -1)                                    # (B, O)
    left = np.full((n, n_slots), -1)                                   # (B, O)
    for o in range(1, n_slots + 1):    # the Bo images with o objects: positions depend on o
        rows = np.flatnonzero(n_objects == o)                          # (Bo,)
        # sizes: uniform over the size tuples whose boxes fit along one axis
        fits = [t for t in product((0, 1), repeat=o)
                if sum((small, large)[s] for s in t) + (o - 1) * GAP <= R]
        size_o = np.array(fits)[rng.integers(len(fits), size=len(rows))]  # (Bo, o)
        ext = np.where(size_o == 1, large, small)                      # (Bo, o)
        if o == 1:
            top_o = rng.integers(0, R - ext + 1)                       # (Bo, 1)
            left_o = rng.integers(0, R - ext + 1)                      # (Bo, 1)
        else:
            along, across = _layout(ext, R, small, rng)                # (Bo, o) each
            row = relation[rows, None] == 0                            # (Bo, 1)
            top_o = np.where(row, across, along)                       # (Bo, o)
            left_o = np.where(row, along, across)                      # (Bo, o)
        size[rows, :o], top[rows, :o], left[rows, :o] = size_o, top_o, left_o
    extent = np.where(exists, np.where(size == 1, large, small), 0)    # (B, O)
    color, shape = np.where(exists, color, -1), np.where(exists, shape, -1)
    return Records(n_objects, relation, size, color, shape, top, left, extent)


def _layout(ext, R, small, rng):
    """Box corners of o >= 2 objects per image along and across the layout axis.

    Along: boxes in order with >= GAP pixels between them; the free pixels are split at
    random into the o + 1 gaps.  Across: corners at ``c + u - ext // 2`` for one center
    ``c`` per image and a jitter ``|u| <= J = small // 2 - 1`` per object, so any two
    boxes' across-ranges overlap (|u1 - u2| <= 2J < the smaller half-sizes' sum).
    """
    Bo, o = ext.shape
    slack = R - ext.sum(1) - (o - 1) * GAP                             # (Bo,) >= 0
    w = rng.random((Bo, o + 1))                                        # (Bo, o+1)
    free = np.floor(w / w.sum(1, keepdims=True) * slack[:, None]).astype(np.int64)
    step = np.concatenate([np.zeros((Bo, 1), np.int64), ext[:, :-1] + GAP], axis=1)
    along = np.cumsum(free[:, :o] + step, axis=1)                      # (Bo, o)
    J = small // 2 - 1
    widest = ext.max(1)                                                # (Bo,)
    center = rng.integers(J + widest // 2, R - J - (widest - widest // 2) + 1)  # (Bo,)
    jitter = rng.integers(-J, J + 1, size=(Bo, o))                     # (Bo, o)
    across = center[:, None] + jitter - ext // 2                       # (Bo, o)
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
    B, n_slots = records.extent.shape
    images = np.zeros((B, R, R, 3), dtype=np.float32)                  # (B, R, R, 3)
    L = int(records.extent.max())
    ij = np.arange(L) + 0.5                                            # (L,)
    for m in range(n_slots):                                           # object slots
        b = np.flatnonzero(records.extent[:, m] > 0)                   # (Bm,)
        half = records.extent[b, m][:, None, None] / 2.0               # (Bm, 1, 1)
        q = ij[None, :, None] / half - 1.0                             # (Bm, L, 1)
        p = ij[None, None, :] / half - 1.0                             # (Bm, 1, L)
        masks = np.stack([shape_mask(s, p, q) for s in SHAPES])        # (4, Bm, L, L)
        mask = masks[records.shape[b, m], np.arange(len(b))]           # (Bm, L, L)
        mask &= (p < 1.0) & (q < 1.0)
        nb, i, j = np.nonzero(mask)                                    # (Px,) each
        rows = b[nb]                                                   # (Px,)
        images[rows, records.top[rows, m] + i, records.left[rows, m] + j] = \
            PALETTE[records.color[rows, m]]                            # (Px, 3)
    return images


def to_ascii(image):
    """One (R, R, 3) image as R lines of text: a color's initial (R G B Y M C) per object
    pixel, '.' for background; a quick look without matplotlib."""
    check_array("image", image, ndim=3, axes="(R, R, 3)", dtype_kind="f")
    palette = np.concatenate([np.zeros((1, 3), np.float32), PALETTE])  # (7, 3)
    dist = ((image[:, :, None, :] - palette) ** 2).sum(-1)            # (R, R, 7)
    letters = np.array(list(".RGBYMC"))[dist.argmin(-1)]              # (R, R)
    return "\n".join("".join(row) for row in letters)
