"""The dataset type: images paired with captions, the built-in world's or your own.

``ImageCaptionDataset(images, captions)`` validates and holds any (B, R, R, 3) images with
B captions; the built-in world (:mod:`minivlmoe.world`) returns the same type, with
``records`` (:class:`minivlmoe.scenes.Records`) and ``heldout`` set.
:func:`minibatch_indices` is the one shuffler: one permutation per pass, cut into
batches (``ImageCaptionDataset.batches`` and the training loop's
:class:`minivlmoe.train.BatchStream` both draw through it).

Axis letters (see minivlmoe/__init__.py): B images, R image side, Ch = 3 channels.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_array, check_bool, check_dtype, check_int, check_rng, shorten
from .scenes import Records

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
        dtype = check_dtype("dtype", dtype)
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
                            f"{shorten(repr(caption))}")
        if not caption.strip():
            raise ValueError(f"{name}[{i}] must be a non-empty caption, got "
                             f"{shorten(repr(caption))}")
    return list(captions)


def minibatch_indices(n, batch_size, rng, *, drop_last=False):
    """One shuffled pass over ``range(n)`` in batches; deterministic given ``rng``'s state.

    Yields (b,) int64 index arrays, b = batch_size (the last may be shorter unless
    ``drop_last``).  Every index appears exactly once per pass (at most once if dropped).
    """
    n = check_int("n", n, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    check_rng("rng", rng)
    drop_last = check_bool("drop_last", drop_last)
    order = rng.permutation(n)                                         # (n,)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]                          # (b,)


def to_uint8(images):
    """(B, R, R, 3) float images in [0, 1] -> uint8 in [0, 255] (rounded)."""
    images = _check_images("images", images)
    return np.rint(images * 255).astype(np.uint8)                      # (B, R, R, 3)
