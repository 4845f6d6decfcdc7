"""Checkpoints: one ``.npz`` file, written atomically and verified completely on load.

Format (version 1, described in docs/training.md)
-------------------------------------------------
An uncompressed zip of ``.npy`` members (what ``numpy.savez`` writes), readable with
``numpy.load(path, allow_pickle=False)``:

* ``__manifest__`` -- a uint8 array holding UTF-8 JSON::

      {"format": "minivlmoe-checkpoint", "version": 1, "step": 1200,
       "config": {...}, "rng_state": {...}, "extra": ...,
       "trees": {"params": [leaf records], "opt_state": [leaf records]},
       "arrays": {name: {"shape": [...], "dtype": "<f4", "sha256": "..."}, ...}}

  A leaf record gives the leaf's key path (a list, so keys may contain dots) and
  its kind: ``dense`` (one array), ``csr`` (three arrays ``data``, ``indices``,
  ``indptr`` plus ``shape`` and the canonical-format flag), ``value`` (a JSON
  scalar such as the optimizer's step count) or ``dict`` (an empty dict).
* one member per array, named ``params/<dotted path>`` or
  ``opt_state/<dotted path>``, with ``:data``, ``:indices``, ``:indptr`` appended
  for the three arrays of a sparse weight.

The zip entries carry a fixed timestamp, so the same state always gives the same bytes.

Writing
-------
:func:`save` writes with :func:`minivlmoe.atomic.atomic_write` (which the run folder's
config.json and metrics.jsonl rewrites share): a temporary file ``.<name>.<12 hex>.tmp`` in the
destination's folder, flushed and ``fsync``ed, then ``os.replace``d onto the
destination (atomic on POSIX and Windows), and the folder ``fsync``ed where the
platform allows.  A crash at any moment leaves either the old checkpoint or the new
one, never a mixture; a failed write removes its temporary file, and the temporary
files a killed write leaves are removed by the next write to the same path
(:func:`minivlmoe.atomic.remove_stale_temps`, which touches nothing else).

Reading
-------
:func:`load` refuses, with a one-line :class:`CheckpointError` naming the file and
the problem, a file that is missing, empty, not a zip, truncated or corrupted; a
missing manifest or an unknown format version; a negative step; a missing or an
extra array; an array whose shape, dtype or SHA-256 differs from the manifest; a
pickled object array; an invalid sparse pattern; and a config that differs from
``expected_config``.  A path that is a directory or holds a NUL byte is a
CheckpointError too; a ``path`` that is not a path at all is a TypeError.  What the
numbers mean (finite, in range) is checked for a run's checkpoint by
:func:`minivlmoe.run_checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import zipfile
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from ._checks import error_line
from .atomic import atomic_write

FORMAT = "minivlmoe-checkpoint"
VERSION = 1
MANIFEST = "__manifest__"
TREES = ("params", "opt_state")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamp: identical state, identical bytes


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and the problem."""


class Checkpoint(NamedTuple):
    """What :func:`load` returns.

    Fields
    ------
    params : nested dict of ndarray / csr_array leaves, as saved.
    opt_state : nested dict (e.g. from :func:`minivlmoe.optim.init_state`), as saved.
    step : int, the training step saved with the checkpoint.
    config : dict, the run's configuration (after a JSON round trip: tuples become lists).
    rng_state : dict, e.g. ``Generator.bit_generator.state``; see
        :func:`minivlmoe.rng_state.restore_rng`.
    extra : any JSON value given to :func:`save` (None by default).
    """

    params: dict
    opt_state: dict
    step: int
    config: dict
    rng_state: dict
    extra: Any


# ----------------------------------------------------------------------------- saving

def json_default(value):
    """The ``default`` of ``json.dumps``: NumPy scalars and small arrays (e.g. an MT19937
    key) into the JSON manifest (and rng_state's comparison of generator states)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _to_json(name, value):
    """Return ``value`` after a JSON round trip, or raise TypeError naming ``name``."""
    try:
        return json.loads(json.dumps(value, default=json_default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON-serializable (dicts with str keys, lists, "
                        f"finite numbers, strings, bools, None): {e}") from None


def _sha256(array):
    return hashlib.sha256(np.asarray(array, order="C").tobytes()).hexdigest()


def _collect(tree_name, tree, arrays):
    """Leaf records of ``tree``; adds its arrays to ``arrays`` (name -> array)."""
    if not isinstance(tree, dict):
        raise TypeError(f"{tree_name} must be a dict, got {type(tree).__name__}")
    records = []

    def add(name, array):
        if name in arrays:
            raise ValueError(f"{tree_name}: two leaves map to the array name {name!r}; "
                             "rename a key")
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a bool, integer or float array, got dtype "
                            f"{array.dtype} (object arrays would need pickle)")
        arrays[name] = np.asarray(array, order="C")
        return name

    def walk(node, path):
        if isinstance(node, dict) and node:
            for key, child in node.items():
                if not isinstance(key, str):
                    raise TypeError(f"{tree_name} keys must be str, got {key!r} at {path}")
                walk(child, path + [key])
            return
        name = f"{tree_name}/{'.'.join(path)}"
        if isinstance(node, dict):
            records.append({"path": path, "kind": "dict"})
        elif isinstance(node, sp.csr_array):
            records.append({"path": path, "kind": "csr", "shape": list(node.shape),
                            "canonical": bool(node.has_canonical_format),
                            "arrays": {part: add(f"{name}:{part}", getattr(node, part))
                                       for part in ("data", "indices", "indptr")}})
        elif isinstance(node, np.ndarray):
            records.append({"path": path, "kind": "dense", "array": add(name, node)})
        elif node is None or (isinstance(node, (bool, numbers.Real, str))
                              and not isinstance(node, np.generic)):
            records.append({"path": path, "kind": "value", "value": _to_json(name, node)})
        else:
            raise TypeError(f"{name} must be an ndarray, a csr_array, a dict or a JSON "
                            f"scalar, got {type(node).__name__}")

    walk(tree, [])
    return records


def _write_npz(file, arrays):
    """Write ``arrays`` as an uncompressed ``.npz`` (the layout of ``numpy.savez``)."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def save(path, *, params, opt_state, step, config, rng_state, extra=None):
    """Write a checkpoint to ``path`` (exactly that name) atomically.

    Parameters
    ----------
    path : str or os.PathLike; its folder must exist.
    params : nested dict of ndarray / csr_array leaves.
    opt_state : nested dict of arrays and JSON scalars (e.g. ``optim.init_state``).
    step : int >= 0.
    config : dict, JSON-serializable; compared on load with ``expected_config``.
    rng_state : dict, JSON-serializable, e.g. ``{"train": rng.bit_generator.state}``
        or one generator's state (see :func:`minivlmoe.rng_state.restore_rng`).
    extra : any JSON-serializable value (e.g. the last metrics).

    Every argument is checked before the file is touched.  The file is written by
    :func:`atomic_write`, which first removes the temporary files of earlier saves to
    ``path`` that were killed.  Errors while writing propagate after the temporary file
    is removed; an OSError of a write to the file (e.g. a full disk) is raised as one
    OSError with the same errno naming ``path``.
    """
    path = os.fspath(path)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    for name, value in (("config", config), ("rng_state", rng_state)):
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    arrays = {}
    trees = {name: _collect(name, tree, arrays)
             for name, tree in (("params", params), ("opt_state", opt_state))}
    manifest = {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "config": _to_json("config", config),
        "rng_state": _to_json("rng_state", rng_state),
        "extra": _to_json("extra", extra),
        "trees": trees,
        "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.str, "sha256": _sha256(a)}
                   for name, a in arrays.items()},
    }
    text = json.dumps(manifest, allow_nan=False).encode("utf-8")
    members = {MANIFEST: np.frombuffer(text, dtype=np.uint8), **arrays}

    atomic_write(path, lambda f: _write_npz(f, members))


# ----------------------------------------------------------------------------- loading

def _read_member(npz, name, fail):
    """Read one array; any failure to decode the bytes means a corrupted file.

    The zip and .npy decoders can raise many exception types on damaged bytes
    (BadZipFile on a CRC mismatch, ValueError on a bad header or a pickled
    array, EOFError, NotImplementedError for an unknown compression, ...), so
    the catch is deliberately broad at this boundary.
    """
    try:
        array = npz[name]
    except Exception as e:  # noqa: BLE001 - see docstring
        if isinstance(e, ValueError) and "allow_pickle" in str(e):
            fail(f"array {name!r} holds pickled Python objects; refused "
                 "(checkpoints are loaded with allow_pickle=False)")
        fail(f"array {name!r} cannot be read, the file is corrupted ({error_line(e)})")
    if not isinstance(array, np.ndarray):   # numpy returns raw bytes without the .npy magic
        fail(f"member {name!r} is not a .npy array, the file is corrupted")
    return array


def _read_manifest(npz, fail):
    if MANIFEST not in npz.files:
        fail(f"no {MANIFEST!r} array; not a minivlmoe checkpoint")
    raw = _read_member(npz, MANIFEST, fail)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        fail(f"{MANIFEST!r} must be a 1-d uint8 array, got {raw.dtype} {raw.shape}")
    try:
        manifest = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"the manifest is not valid JSON ({error_line(e)})")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fail(f"the manifest does not declare format {FORMAT!r}")
    version = manifest.get("version")
    if version != VERSION:
        fail(f"unknown format version {version!r} (this minivlmoe reads version {VERSION})")
    expected = {"step": int, "config": dict, "rng_state": dict, "trees": dict, "arrays": dict}
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            fail(f"malformed manifest: {key!r} must be a {kind.__name__}")
    if manifest["step"] < 0:
        fail(f"malformed manifest: 'step' must be >= 0 (as save requires), "
             f"got {manifest['step']}")
    return manifest


def _verified_arrays(npz, manifest, fail):
    listed = manifest["arrays"]
    present = set(npz.files) - {MANIFEST}
    missing = [n for n in listed if n not in present]
    extra = sorted(present - set(listed))
    if missing:
        fail(f"missing array(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        fail(f"unexpected array(s) not in the manifest {extra[:5]}"
             f"{' ...' if len(extra) > 5 else ''}")
    arrays = {}
    for name, meta in listed.items():
        array = _read_member(npz, name, fail)
        try:
            shape, dtype, digest = tuple(meta["shape"]), meta["dtype"], meta["sha256"]
        except (KeyError, TypeError):
            fail(f"malformed manifest entry for array {name!r}")
        if array.dtype.str != dtype:
            fail(f"array {name!r} has dtype {array.dtype.str}, the manifest says {dtype}")
        if array.shape != shape:
            fail(f"array {name!r} has shape {array.shape}, the manifest says {shape}")
        if _sha256(array) != digest:
            fail(f"array {name!r} fails its sha256 checksum (corrupted bytes)")
        arrays[name] = np.asarray(array, order="C")
    return arrays


def _csr(record, arrays, fail):
    """Rebuild a csr_array with the stored arrays themselves (dtypes and bytes kept)."""
    names = record["arrays"]
    data, indices, indptr = (arrays[names[p]] for p in ("data", "indices", "indptr"))
    where = names["data"].rsplit(":", 1)[0]
    shape = tuple(record["shape"])
    try:
        if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
            raise ValueError("indices and indptr must be integer arrays")
        W = sp.csr_array((data, indices, indptr), shape=shape)
        W.data, W.indices, W.indptr = data, indices, indptr
        W.check_format(full_check=True)
    except (ValueError, TypeError) as e:
        fail(f"sparse weight {where!r} is not a valid CSR array ({error_line(e)})")
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr))      # (nnz,) row of each entry
    same_row = rows[1:] == rows[:-1]                             # (nnz-1,)
    canonical = not np.any(same_row & (indices[1:] <= indices[:-1]))
    if record["canonical"] and not canonical:
        fail(f"sparse weight {where!r} is recorded as canonical but its indices are not "
             "sorted and unique")
    W.has_canonical_format = bool(record["canonical"])
    return W


def _build_tree(records, arrays, fail):
    tree = {}
    for record in records:
        path, kind = record["path"], record["kind"]
        if kind == "dense":
            leaf = arrays[record["array"]]
        elif kind == "csr":
            leaf = _csr(record, arrays, fail)
        elif kind == "value":
            leaf = record["value"]
        elif kind == "dict":
            leaf = {}
        else:
            fail(f"malformed manifest: unknown leaf kind {kind!r}")
        if not path:
            return leaf
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _config_diff(saved, expected, prefix=""):
    """Dotted keys whose JSON values differ (types too: 1, 1.0 and true all differ)."""
    diffs = []
    for key in dict.fromkeys([*saved, *expected]):
        where = f"{prefix}{key}"
        if key not in saved:
            diffs.append(f"{where} (missing from the checkpoint)")
        elif key not in expected:
            diffs.append(f"{where} (not in expected_config)")
        elif isinstance(saved[key], dict) and isinstance(expected[key], dict):
            diffs += _config_diff(saved[key], expected[key], where + ".")
        else:
            a, b = json.dumps(saved[key]), json.dumps(expected[key])
            if a != b:
                diffs.append(f"{where} (saved {a[:40]}, expected {b[:40]})")
    return diffs


def _checked_path(path):
    """``os.fspath(path)``, or TypeError naming ``path`` when it is not a path at all."""
    try:
        return os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str, bytes or os.PathLike naming a checkpoint "
                        f"file, got {type(path).__name__} {path!r:.200}") from None


def _shown_path(path):
    """The path as printed in error messages: as is, or repr() if it holds control bytes."""
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)[:200]


def load(path, expected_config=None):
    """Read and verify a checkpoint written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike.
    expected_config : dict or None; when given, the saved config must equal it (after
        a JSON round trip), or the error lists the differing keys.

    Returns
    -------
    Checkpoint(params, opt_state, step, config, rng_state, extra)

    Raises
    ------
    CheckpointError (a ValueError) with a one-line message naming the file and the problem
    (a directory or a path holding a NUL byte included).  TypeError if ``path`` is not a
    str, bytes or os.PathLike.

    This checks the file, not what its numbers mean: a run's checkpoint is also checked
    against its config (finite values, ranges, training state) by
    :func:`minivlmoe.run_checkpoint.load_checkpoint`.
    """
    path = _checked_path(path)
    if expected_config is not None:
        if not isinstance(expected_config, dict):
            raise TypeError(f"expected_config must be a dict or None, "
                            f"got {type(expected_config).__name__}")
        expected_config = _to_json("expected_config", expected_config)
    shown = _shown_path(path)

    def fail(problem):
        raise CheckpointError(f"checkpoint {shown}: {problem}") from None

    if "\0" in os.fsdecode(path):
        fail("cannot be read (the path contains a NUL byte)")
    if os.path.isdir(path):
        fail("cannot be read: it is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        fail(f"cannot be read ({e.strerror or error_line(e)})")
    if not head:
        fail("the file is empty")
    if head != b"PK\x03\x04":
        fail("not an .npz archive (no zip signature)")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - the zip reader's errors on damaged bytes vary
        fail(f"truncated or corrupted zip archive ({error_line(e)})")
    with npz:
        manifest = _read_manifest(npz, fail)
        arrays = _verified_arrays(npz, manifest, fail)
    trees = {}
    for name in TREES:
        records = manifest["trees"].get(name)
        if not isinstance(records, list):
            fail(f"malformed manifest: no record list for {name!r}")
        try:
            trees[name] = _build_tree(records, arrays, fail)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            fail(f"malformed manifest: bad leaf record in {name!r} ({error_line(e)})")
    if expected_config is not None:
        diffs = _config_diff(manifest["config"], expected_config)
        if diffs:
            fail("config does not match expected_config; differing keys: " + "; ".join(diffs))
    return Checkpoint(params=trees["params"], opt_state=trees["opt_state"],
                      step=manifest["step"], config=manifest["config"],
                      rng_state=manifest["rng_state"], extra=manifest.get("extra"))
