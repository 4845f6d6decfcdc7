"""What an image of the built-in world shows, and the caption that says it.

The vocabulary
--------------
An object is a **size** (small, large), a **color** (red, green, blue, yellow, magenta,
cyan) and a **shape** (circle, square, triangle, cross); an image holds one to
:data:`MAX_OBJECTS` (3) of them, in a **row** ("left of") or a **column** ("above").

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
:class:`Scene` is what one caption says; :class:`Records` is the ground truth of B
generated images (what they show and where), from which :meth:`Records.scene` reads
each image's scene.  The images themselves are drawn in :mod:`minivlmoe.world`.

Axis letters (see minivlmoe/__init__.py): B images, O object slots (``max_objects``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import check_int

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "large")
RELATIONS = ("left of", "above")        # index 0: a row layout, index 1: a column layout
MAX_OBJECTS = 3


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
            return Scene(objects=tuple(objects), relation=relation)
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
    size, color, shape : (B, O) int, indices into SIZES, COLORS, SHAPES; -1 = empty slot.
    top, left : (B, O) int, pixel row and column of each object's box corner; -1 = empty.
    extent : (B, O) int, side of each object's square box in pixels; 0 = empty.
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
        return Scene(objects=objects, relation=RELATIONS[self.relation[i]] if n > 1 else None)

    def subset(self, idx):
        """Records of the images ``idx`` (an index array or slice)."""
        return Records(*(field[idx] for field in self))
