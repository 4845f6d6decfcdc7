"""Your own data set: one ``.npz`` file of images and captions, split into train and test.

The file format (docs/your_data.md)
-----------------------------------
One ``.npz`` (``numpy.savez``), read with ``allow_pickle=False``, or a folder (below)::

    images    (B, R, R, 3) uint8 in [0, 255], or float32/float64 in [0, 1]
    captions  (B,) str, a fixed-width unicode array (``np.array(captions, dtype=str)``,
              dtype ``<U..``; an object array needs pickle and is refused)
    split     optional (B,) str, each "train" or "test"
    labels    optional (B,) int, class labels kept for your own analysis (training and
              the metrics do not use them)

Without ``split``, a seeded split puts ``round(test_fraction * B)`` pairs in the test
split (``test_fraction`` default :data:`DEFAULT_TEST_FRACTION`; the seed is the run's
``data_seed``).

A folder of PNG/JPEG files is read too when Pillow is installed (an optional extra,
``pip install -e '.[images]'``; never needed otherwise): ``FOLDER/captions.tsv`` has one
line per image, ``file name <TAB> caption`` with an optional third column ``train`` or
``test`` (blank lines and lines starting with ``#`` are skipped); the images are
converted to RGB and must all have one square size.

A run records where its data came from (:attr:`UserData.source`: the file's absolute
path, its sha256 and the test fraction, in config.json and in every checkpoint);
:func:`open_source` reads the file again and refuses it when it is missing or its
checksum differs.  Every problem with a file raises :class:`DataError` (a ValueError)
with one line naming the problem, the array and the file.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import numpy as np

from ._checks import check_float, check_int, error_line
from .data import ImageCaptionDataset
from .tokenizer import tokenize

DEFAULT_TEST_FRACTION = 0.2
SOURCE_KINDS = ("npz", "folder")
CAPTIONS_TSV = "captions.tsv"
ARRAYS = ("images", "captions", "split", "labels")


class DataError(ValueError):
    """A data file that cannot be used: one line, ``<problem> (<file>)``."""


class Splits(NamedTuple):
    """The train and test :class:`ImageCaptionDataset` of a data set."""

    train: ImageCaptionDataset
    test: ImageCaptionDataset


def sha256_of(path):
    """The hex sha256 of a file's bytes; of a folder, of its captions.tsv and then each
    image file it names (name and bytes, in the file's order)."""
    h = hashlib.sha256()
    files = [path] if not os.path.isdir(path) else [os.path.join(path, CAPTIONS_TSV)] + [
        os.path.join(path, name) for name, _, _ in _read_tsv(path)]
    for name in files:
        if len(files) > 1:
            h.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class UserData:
    """A data set read from an ``.npz`` file (module docstring), checked on load.

    Parameters
    ----------
    path : str, the ``.npz`` file.
    test_fraction : float in (0, 1) or None; the share of test pairs of the seeded split
        (None: :data:`DEFAULT_TEST_FRACTION`).  Must be None when the file has ``split``.

    Attributes
    ----------
    images (B, R, R, 3), captions (list of B str), split (B,) bool (True = test) or None,
    labels (B,) int or None, source (dict: kind, path, sha256, test_fraction).
    """

    def __init__(self, path, test_fraction=None):
        path = os.fspath(path)
        self.path = os.path.abspath(path)
        arrays = _read_folder(path) if os.path.isdir(path) else _read_npz(path)
        self.images, self.captions = arrays["images"], arrays["captions"]
        self.split, self.labels = arrays.get("split"), arrays.get("labels")
        if test_fraction is not None:
            if self.split is not None:
                raise DataError(f"the file has a split array, so a test fraction does not "
                                f"apply, got test_fraction={test_fraction} ({path})")
            test_fraction = check_float("test_fraction", test_fraction, 0.0, 1.0,
                                        low_open=True, high_open=True)
        elif self.split is None:
            test_fraction = DEFAULT_TEST_FRACTION
        self.test_fraction = test_fraction
        if self.split is None:
            n_test = round(test_fraction * len(self.captions))
        else:
            n_test = int(self.split.sum())
        if n_test < 2:
            raise DataError(f"the test split must hold at least 2 pairs, got {n_test} of "
                            f"{len(self.captions)} ({path})")
        if len(self.captions) - n_test < 2:
            raise DataError(f"the train split must hold at least 2 pairs, got "
                            f"{len(self.captions) - n_test} of {len(self.captions)} ({path})")
        kind = "folder" if os.path.isdir(path) else "npz"
        self.source = {"kind": kind, "path": self.path, "sha256": sha256_of(path),
                       "test_fraction": test_fraction}

    def __len__(self):
        return len(self.captions)

    @property
    def image_size(self):
        """R, the image side in pixels."""
        return self.images.shape[1]

    def test_mask(self, data_seed):
        """(B,) bool, True for the test pairs: the file's split, or the seeded split."""
        if self.split is not None:
            return self.split
        data_seed = check_int("data_seed", data_seed, 0)
        n_test = round(self.test_fraction * len(self))
        test = np.zeros(len(self), bool)                               # (B,)
        test[np.random.default_rng(data_seed).permutation(len(self))[:n_test]] = True
        return test

    def splits(self, data_seed):
        """:class:`Splits` (train, test), each in the file's order."""
        test = self.test_mask(data_seed)                               # (B,)
        return Splits(*(ImageCaptionDataset(self.images[mask],
                                            [c for c, m in zip(self.captions, mask) if m])
                        for mask in (~test, test)))


def resolve(data, data_seed):
    """``(splits, source, name)`` of a data argument of ``train.train``.

    ``data`` is a :class:`UserData` (split by ``data_seed``; source: its file) or a pair
    ``(train, test)`` of :class:`ImageCaptionDataset` (source ``{"kind": "memory",
    "sha256"}``, a digest of the arrays and captions: such a run resumes from Python
    with the same datasets, but the CLI cannot rebuild it).
    """
    if isinstance(data, UserData):
        return data.splits(data_seed), data.source, data.path
    if (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(d, ImageCaptionDataset) for d in data)):
        train, test = data
        if train.image_size != test.image_size or len(test) < 2:
            raise ValueError(f"data must be (train, test) datasets of one image size with "
                             f"at least 2 test pairs, got sizes {train.image_size} and "
                             f"{test.image_size}, {len(test)} test pairs")
        h = hashlib.sha256()
        for d in (train, test):
            h.update(f"{d.images.dtype.str}{d.images.shape}".encode())
            h.update(np.ascontiguousarray(d.images).tobytes())
            h.update("\n".join(d.captions).encode() + b"\0")
        return Splits(train, test), {"kind": "memory", "sha256": h.hexdigest()}, \
            "the given datasets"
    raise TypeError(f"data must be None, a minivlmoe.userdata.UserData or a (train, test) "
                    f"pair of ImageCaptionDataset, got {type(data).__name__}")


def open_source(source, path=None):
    """The :class:`UserData` of a run's recorded ``source`` (``UserData.source``).

    ``path`` reads the data from another place (the file moved); its sha256 must still
    match, and the returned ``source`` keeps the recorded path, so the run's config is
    unchanged.  A missing file or a different checksum raises :class:`DataError`.
    """
    if isinstance(source, dict) and source.get("kind") == "memory":
        raise DataError("the run was trained on datasets passed to train.train in Python, "
                        "not on a file, so its data cannot be read again here; evaluate it "
                        "with minivlmoe.evaluate.evaluate and the same datasets")
    if not isinstance(source, dict) or source.get("kind") not in SOURCE_KINDS or \
            set(source) != {"kind", "path", "sha256", "test_fraction"}:
        raise DataError(f"the run's data source must be a dict with kind 'npz' or 'folder', "
                        f"path, sha256 and test_fraction, got {str(source)[:200]}")
    where = os.fspath(path) if path is not None else source["path"]
    if not (os.path.isdir if source["kind"] == "folder" else os.path.isfile)(where):
        raise DataError(f"the run's data file is missing; put it back or pass --data FILE "
                        f"with the same content ({where})")
    digest = sha256_of(where)
    if digest != source["sha256"]:
        raise DataError(f"the data file changed since the run was trained (sha256 "
                        f"{source['sha256'][:12]}... recorded, {digest[:12]}... now) ({where})")
    data = UserData(where, test_fraction=source["test_fraction"])   # None: the file's split
    data.source = dict(source)
    return data


# ----------------------------------------------------------------------------- reading

def _read_tsv(folder):
    """The rows (file name, caption, split or None) of FOLDER/captions.tsv."""
    path = os.path.join(folder, CAPTIONS_TSV)
    if not os.path.isfile(path):
        raise DataError(f"a data folder must hold {CAPTIONS_TSV} (lines: file name, tab, "
                        f"caption[, tab, train|test]) ({folder})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) not in (2, 3) or not parts[0]:
                raise DataError(f"line {n} of {CAPTIONS_TSV} must be 'file<TAB>caption' "
                                f"[<TAB>train|test], got {line[:200]!r} ({folder})")
            rows.append((parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    return rows


def _read_folder(folder):
    """The arrays of a folder of images and captions.tsv, read with Pillow, then checked
    as an .npz's would be."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"reading a folder of images needs Pillow, which is not installed "
                        f"(pip install pillow, or pip install -e '.[images]' in the "
                        f"checkout); or save the arrays as an .npz ({folder})") from None
    rows = _read_tsv(folder)
    if not rows:
        raise DataError(f"{CAPTIONS_TSV} names no image ({folder})")
    images = []
    for name, _, _ in rows:
        try:
            with Image.open(os.path.join(folder, name)) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))  # (R, R, 3)
        except OSError as e:
            raise DataError(f"image {name!r} cannot be read ({error_line(e)}) "
                            f"({folder})") from None
        if images[-1].shape != images[0].shape:
            raise DataError(f"every image must have the size of {rows[0][0]!r} "
                            f"{images[0].shape[:2]}, got {images[-1].shape[:2]} for "
                            f"{name!r} ({folder})")
    arrays = {"images": np.stack(images), "captions": np.array([c for _, c, _ in rows])}
    splits = [s for _, _, s in rows]
    if any(s is not None for s in splits):
        arrays["split"] = np.array([s or "" for s in splits])
    return _check_arrays(arrays, folder)


def _read_npz(path):
    """The checked arrays of an ``.npz`` data file (module docstring)."""
    def fail(problem):
        raise DataError(f"{problem} ({path})") from None

    if not os.path.isfile(path):
        fail("no such data file")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        fail(f"not a readable .npz file ({error_line(e)})")
    if not isinstance(z, np.lib.npyio.NpzFile):
        fail("not an .npz archive (a single .npy array?); save it with numpy.savez")
    with z:
        unknown = sorted(set(z.files) - set(ARRAYS))
        if unknown:
            fail(f"unknown array(s) {unknown}: expected images, captions and optionally "
                 f"split, labels")
        for name in ("images", "captions"):
            if name not in z.files:
                fail(f"the array {name!r} is missing (arrays found: {sorted(z.files)})")
        arrays = {}
        for name in z.files:
            try:
                arrays[name] = z[name]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    fail(f"the array {name!r} is an object array, which needs pickle and is "
                         f"refused; save strings as a fixed-width str array "
                         f"(numpy.array(captions, dtype=str))")
                fail(f"the array {name!r} cannot be read ({str(e)[:200]})")
    return _check_arrays(arrays, path)


def _check_arrays(arrays, path):
    """The checked arrays of a data set (module docstring); DataError names ``path``."""
    def fail(problem):
        raise DataError(f"{problem} ({path})") from None

    images = arrays["images"]
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        fail(f"the array 'images' must have shape (B, R, R, 3) (square RGB), got "
             f"{images.shape}")
    if images.dtype not in (np.uint8, np.float32, np.float64):
        fail(f"the array 'images' must have dtype uint8 (0..255) or float32/float64 "
             f"(0..1), got {images.dtype}")
    if images.dtype.kind == "f":
        bad = int(images.size - np.count_nonzero(np.isfinite(images)))
        if bad:
            fail(f"the array 'images' must be finite, got {bad} NaN or inf pixel value(s)")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            fail(f"the array 'images' (float) must hold values in [0, 1], got values in "
                 f"[{lo:g}, {hi:g}]")
    B = images.shape[0]
    captions = arrays["captions"]
    if captions.dtype.kind != "U":
        fail(f"the array 'captions' must be a str array (dtype <U..), got dtype "
             f"{captions.dtype}")
    if captions.shape != (B,):
        fail(f"the array 'captions' must have shape ({B},), one caption per image, got "
             f"{captions.shape}")
    captions = captions.tolist()
    for i, caption in enumerate(captions):
        if not tokenize(caption):
            fail(f"captions[{i}] must hold at least one word, got {caption[:200]!r}")
    out = {"images": images, "captions": captions}
    if "split" in arrays:
        split = arrays["split"]
        if split.dtype.kind != "U" or split.shape != (B,):
            fail(f"the array 'split' must be a ({B},) str array of 'train'/'test', got "
                 f"shape {split.shape} dtype {split.dtype}")
        unknown = sorted(set(split.tolist()) - {"train", "test"})
        if unknown:
            fail(f"the array 'split' must hold only 'train' and 'test', got "
                 f"{str(unknown)[:200]}")
        out["split"] = split == "test"                                 # (B,) bool
    if "labels" in arrays:
        labels = arrays["labels"]
        if labels.dtype.kind not in "iu" or labels.shape != (B,):
            fail(f"the array 'labels' must be a ({B},) integer array, got shape "
                 f"{labels.shape} dtype {labels.dtype}")
        out["labels"] = labels
    return out
