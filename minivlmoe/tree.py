"""Parameter and gradient trees, and sparse weights on a fixed pattern.

Parameters are nested dicts whose leaves are ``numpy.ndarray`` or
``scipy.sparse.csr_array``; gradients have exactly the same keys, and a sparse
weight's gradient has exactly the weight's pattern (``indices``/``indptr``).  These
helpers are the one place that walks such trees and the one place that builds a CSR
array on a pattern that is already canonical (sorted, duplicate-free column indices in
every row), so the pattern can never drift by accident.  The optimizer, the MoE layer,
the experts, the model, the checkpoints and the gradient checker all import them.
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.sparse as sp


def csr_on_pattern(data, indices, indptr, shape):
    """A ``csr_array`` built directly from its three arrays, marked canonical.

    Parameters
    ----------
    data : (nnz,) values.
    indices : (nnz,) int column indices, sorted and unique within each row (the caller
        guarantees it; nothing is sorted or copied).
    indptr : (rows + 1,) int row pointers.
    shape : (rows, cols).
    """
    a = sp.csr_array((data, indices, indptr), shape=shape)
    a.has_canonical_format = True
    return a


def with_values(pattern, data):
    """A ``csr_array`` with ``pattern``'s indices and indptr (shared) and values ``data`` (nnz,).

    Built as a shallow copy of ``pattern`` with its ``data`` replaced: the pattern is
    already a valid canonical CSR, so scipy's constructor checks (about 20 us per call,
    a gradient per weight per step) would find nothing; only the length is checked.
    """
    if not isinstance(data, np.ndarray) or data.shape != (pattern.nnz,):
        raise ValueError(f"data must be an ndarray of shape (nnz,) = ({pattern.nnz},), "
                         f"got {getattr(data, 'shape', type(data).__name__)}")
    out = copy.copy(pattern)             # a new csr_array sharing indices and indptr
    out.data = data                      # (nnz,) its own values; pattern.data untouched
    return out


def flatten(tree, prefix=""):
    """Flatten a nested dict into ``{"a.b.c": leaf}`` (insertion order kept)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(value, path))
    return flat


def unflatten(flat):
    """Inverse of :func:`flatten`: ``{"a.b.c": leaf}`` back to nested dicts."""
    tree = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def tree_map(fn, tree):
    """Apply ``fn`` to every leaf of a nested dict, keeping the structure."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def zeros_like(tree):
    """Zero gradients with the structure of ``tree``; a sparse leaf's zero keeps its
    pattern (shares ``indices``/``indptr``)."""
    def zero(leaf):
        if isinstance(leaf, sp.csr_array):
            return with_values(leaf, np.zeros_like(leaf.data))
        return np.zeros_like(leaf)
    return tree_map(zero, tree)


def add(a, b):
    """Leaf-wise sum of two trees with the same structure (sparse leaves: same pattern)."""
    if isinstance(a, dict):
        return {k: add(a[k], b[k]) for k in a}
    if isinstance(a, sp.csr_array):
        return with_values(a, a.data + b.data)
    return a + b
