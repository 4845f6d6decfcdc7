"""Sparse linear layer: ``y = x W^T + b`` with ``W`` a ``scipy.sparse.csr_array``.

Math
----
For tokens ``x`` (N, Din), a weight ``W`` (Dout, Din) whose sparsity pattern is fixed
at initialization, and a dense bias ``b`` (Dout,)::

    y[n, o] = sum_{i in cols(o)} W[o, i] x[n, i] + b[o]

Backward (derived in docs/ops/sparse_linear.md), for an upstream ``dy`` (N, Dout)::

    dx = dy W                          (N, Din)
    dW[o, i] = sum_n dy[n, o] x[n, i]  only for (o, i) stored in W
    db = sum_n dy[n, :]                (Dout,)

The pattern
-----------
Every output row stores exactly ``Z = max(1, round(density * Din))`` entries, so every
output unit has the same fan-in ``Z``; values are drawn from N(0, 1/Z) (LeCun-normal
over the *stored* fan-in).  Output rows come in groups of ``r`` consecutive rows
(``r = gcd(Dout, group)``, default ``group = 16``) that share one random set of
columns: a row-block structure like that of block-sparse kernels.  ``group=1`` gives
an unstructured pattern.  The gradient of ``W`` is a ``csr_array`` with byte-identical
``indices`` and ``indptr``, and optimizers update only ``W.data``, so the pattern can
never drift.

Kernels (measured by benchmarks/sparse_linear.py; docs/ops/sparse_linear.md explains)
----------------------------------------------------------------------------------
:func:`kernel` picks one of three paths from the pattern alone.

* compact: when the rows together use only Du <= min(COMPACT_COLUMNS, Din / 2) input
  columns (a row-grouped pattern at low density: G groups of Z columns), the product
  runs on those columns only, ``y = x[:, cols] Wc^T + b`` with ``Wc`` (Dout, Du) the
  dense restriction of ``W``; backward ``dx[:, cols] = dy Wc`` (0 on the other columns)
  and ``dWc = dy^T x[:, cols]``, gathered at the pattern.  A BLAS product with K = Du
  on token-major activations, no layout change (a feature-major input keeps the CSR
  kernels below).
* stored density >= ``DENSE_ABOVE`` (0.075): ``W`` is expanded with ``toarray()`` and
  dense BLAS does all three products on token-major activations; the weight gradient
  is the dense ``dy^T x`` gathered at the pattern.  (CSR kernels lose to BLAS above
  roughly 5-10% density.)  At density 1 the canonical ``W.data`` already *is* ``W`` in
  row-major order, so neither the expansion nor the gather is needed.
* below it, activations are made *feature-major* (``xT`` (Din, N), C-contiguous):
  scipy's CSR kernels need the contraction axis as rows of a C-contiguous array, and
  when handed a token-major ``x`` they copy it with a naive strided transpose that costs
  more than the product.  :func:`feature_major` does that copy cache-blocked instead
  (or not at all when the array already is a transposed view — the layer returns
  ``y = yT.T``, so chained sparse layers pass feature-major arrays for free).

  - grouped pattern (``r > 1``): each row group is a small dense block
    ``W_g`` (r, Z) on columns ``cols_g``, so ``yT_g = W_g @ xT[cols_g]`` and
    ``dW_g = dyT_g @ xT[cols_g]^T`` are batched matmuls over the G = Dout/r groups
    after one gather of ``xT`` rows (G·Z·N values, r times fewer than one per stored
    entry); for Z < 4 the forward uses the CSR kernel instead (NumPy's batched matmul
    is slow for such thin blocks); ``dxT = W^T @ dyT`` is scipy's CSC kernel.
  - ungrouped pattern: ``yT = W @ xT`` (CSR), ``dxT = W^T @ dyT`` (CSC), and the weight
    gradient by a per-entry gather (density < ``GATHER_BELOW``) or the dense GEMM
    followed by a gather at the pattern.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from .sums import column_sum
from ..tree import csr_on_pattern, with_values
from .._checks import (check_array, check_cache, check_csr, check_dtype, check_float, check_grad,
                       check_int, check_params, check_rng, check_same_dtype)

DENSE_ABOVE = 0.075
COMPACT_BELOW = 0.5   # the compact path needs at most this fraction of the columns used
COMPACT_COLUMNS = 32  # ... and at most this many used columns (gather and scatter stay cheap)
GATHER_BELOW = 0.02
_TILE = 64  # tokens per tile of the blocked transpose
_MIN_BLOCK_Z = 4  # grouped forward uses batched matmul only for blocks this wide


def init(rng, d_in, d_out, density=1.0, dtype=np.float32, group=16):
    """Create ``{"W": csr_array (Dout, Din), "b": zeros (Dout,)}``.

    Parameters
    ----------
    rng : numpy.random.Generator
    d_in, d_out : int >= 1, input and output widths.
    density : float in (0, 1], fraction of stored entries per row.
    dtype : numpy.float32 or numpy.float64.
    group : int >= 1; consecutive output rows in groups of ``gcd(d_out, group)`` share
        their column set (1 = unstructured).
    """
    check_rng("rng", rng)
    d_in = check_int("d_in", d_in, 1)
    d_out = check_int("d_out", d_out, 1)
    density = check_float("density", density, 0.0, 1.0, low_open=True)
    group = check_int("group", group, 1)
    dtype = check_dtype("dtype", dtype)
    z = max(1, int(round(density * d_in)))                       # stored entries per row
    r = math.gcd(d_out, group)                                   # rows per group
    scores = rng.random((d_out // r, d_in))                      # (G, Din)
    cols = np.sort(np.argsort(scores, axis=1)[:, :z], axis=1)    # (G, Z) distinct, sorted
    cols = np.repeat(cols, r, axis=0)                            # (Dout, Z) shared per group
    values = rng.standard_normal(d_out * z) / np.sqrt(z)         # (Dout*Z,)
    indptr = np.arange(0, d_out * z + 1, z, dtype=np.int32)      # (Dout+1,)
    W = csr_on_pattern(values.astype(dtype), cols.reshape(-1).astype(np.int32), indptr,
                       (d_out, d_in))
    return {"W": W, "b": np.zeros(d_out, dtype=dtype)}


def feature_major(a):
    """Return ``a.T`` (D, N) as a C-contiguous array, for ``a`` of shape (N, D).

    No copy when ``a.T`` is already C-contiguous (``a`` is itself a transposed view).
    Otherwise a cache-blocked copy in tiles of 64 tokens: NumPy's one-shot strided
    transpose of a (4096, 512) float32 array is ~10x slower because every column read
    touches a new cache line.  The loop runs over tiles, not tokens.
    """
    at = a.T                                                     # (D, N) view
    if at.flags.c_contiguous:
        return at
    out = np.empty(at.shape, dtype=a.dtype)                      # (D, N)
    for start in range(0, a.shape[0], _TILE):
        out[:, start:start + _TILE] = a[start:start + _TILE].T  # (D, tile)
    return out


def stored_density(W):
    """Fraction of entries of ``W`` that are stored: nnz / (Dout * Din)."""
    return W.nnz / max(1, W.shape[0] * W.shape[1])


def row_groups(W):
    """``(r, Z)`` if every row stores Z entries and consecutive groups of r > 1 rows
    share their columns (the pattern :func:`init` makes); otherwise None.  O(nnz)."""
    d_out = W.shape[0]
    counts = np.diff(W.indptr)                                   # (Dout,)
    z = int(counts[0]) if d_out else 0
    if z == 0 or np.any(counts != z):
        return None
    idx = W.indices.reshape(d_out, z)                            # (Dout, Z)
    differs = np.any(idx[1:] != idx[0], axis=1)                  # (Dout-1,)
    r = int(np.argmax(differs)) + 1 if differs.any() else d_out
    if r == 1 or d_out % r:
        return None
    blocks = idx.reshape(d_out // r, r, z)                       # (G, r, Z)
    if np.any(blocks != blocks[:, :1]):
        return None
    return r, z


def check_layer(name, params):
    """Validate a layer's ``{"W", "b"}`` (canonical CSR, finite values, a (Dout,) bias of
    W's dtype); returns ``(W, b)``.  ``name`` names the params in the errors."""
    check_params(name, params, ("W", "b"))
    W, b = params["W"], params["b"]
    check_csr(f"{name}['W']", W)
    check_array(f"{name}['W'].data", W.data)                    # dtype and finite, O(nnz)
    check_array(f"{name}['b']", b, ndim=1, axes="(Dout,)")
    if b.shape != (W.shape[0],):
        raise ValueError(f"{name}['b'] must have shape ({W.shape[0]},), got {b.shape}")
    check_same_dtype(f"{name}['b']", b, f"{name}['W']", W)
    return W, b


def used_columns(W):
    """The sorted input columns that at least one row of ``W`` stores: (Du,)."""
    return np.unique(W.indices)                                  # (Du,)


def kernel(W):
    """Which path the layer takes (module docstring): ``("dense", None)``,
    ``("compact", cols)`` with the used columns (Du,), or ``("csr", None)``."""
    d_out, d_in = W.shape
    if W.nnz == d_out * d_in:
        return "dense", None
    cols = used_columns(W)                                       # (Du,)
    if cols.size <= min(COMPACT_COLUMNS, COMPACT_BELOW * d_in):
        return "compact", cols
    if stored_density(W) >= DENSE_ABOVE:
        return "dense", None
    return "csr", None


def dense_weight(W):
    """``W`` as a dense (Dout, Din) array when the layer takes the dense path, else None.

    Full pattern (canonical): ``W.data`` *is* ``W`` in row-major order, so this is a
    view, no copy.  Otherwise, on the dense path, the expanded ``W.toarray()``.
    """
    return _expanded(W) if kernel(W)[0] == "dense" else None     # (Dout, Din) or None


def _expanded(W):
    """``W`` dense, for a weight :func:`kernel` already sent down the dense path: the
    view of ``W.data`` for the full pattern, else ``W.toarray()`` (Dout, Din)."""
    d_out, d_in = W.shape
    if W.nnz == d_out * d_in:
        return W.data.reshape(d_out, d_in)                       # (Dout, Din) a view
    return W.toarray()                                           # (Dout, Din)


def _positions(W, cols):
    """``(rows, pos)`` (nnz,) each: the row of every stored entry and its column's index
    in ``cols``, so that ``Wc[rows, pos] = W.data`` is ``W`` on the used columns."""
    rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))   # (nnz,)
    return rows, np.searchsorted(cols, W.indices)                # (nnz,), (nnz,)


def compact_weight(W, cols):
    """``W`` restricted to its used columns ``cols`` (Du,), dense: (Dout, Du)."""
    rows, pos = _positions(W, cols)                              # (nnz,) each
    Wc = np.zeros((W.shape[0], cols.size), dtype=W.dtype)        # (Dout, Du)
    Wc[rows, pos] = W.data
    return Wc


def pattern_values(W, dWd):
    """The entries of a dense (Dout, Din) gradient ``dWd`` at ``W``'s stored pattern,
    in ``W.data``'s order: (nnz,).  A reshape for the full pattern, a gather otherwise."""
    d_out, d_in = W.shape
    if W.nnz == d_out * d_in:
        return dWd.reshape(-1)                                   # (nnz,) full pattern: row-major
    rows = np.repeat(np.arange(d_out), np.diff(W.indptr))        # (nnz,) row of each entry
    return dWd[rows, W.indices]                                  # (Dout, Din) -> (nnz,) gather


class Cache(NamedTuple):
    """What backward needs.

    saved : the input, as ``x2`` (N, Din) on the dense path, ``xg`` (G, Z, N) gathered
        feature-major rows on the grouped path, or ``xT`` (Din, N) otherwise.
        On the compact path ``xc`` (N, Du): the used columns of the input.
    W : the weight (Dout, Din).   Wd : its dense copy (dense path), ``Wc`` (Dout, Du) on
        the compact path, or None.
    groups : ``(r, Z)`` on the grouped path, else None.   lead : the input's leading shape.
    cols : (Du,) the used columns on the compact path, else None.
    """

    saved: np.ndarray
    W: sp.csr_array
    Wd: np.ndarray | None
    groups: tuple | None
    lead: tuple
    cols: np.ndarray | None = None


def forward(x, params):
    """``y = x W^T + b``.

    Parameters
    ----------
    x : (..., Din) float array (any number of leading axes, flattened to N tokens).
    params : {"W": csr_array (Dout, Din), "b": (Dout,)}, same dtype as ``x``.

    Returns
    -------
    y : (..., Dout), dtype of ``x``.
    cache : Cache
    """
    W, b = check_layer("params", params)
    d_out, d_in = W.shape
    check_array("x", x)
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x must have shape (..., Din={d_in}), got {x.shape}")
    check_same_dtype("x", x, "params['W']", W)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)                                     # (N, Din)  '... i -> (...) i'
    groups, used_cols = None, None
    path, used = kernel(W)
    if path == "compact" and x2.T.flags.c_contiguous:   # a feature-major input (a chain of
        path = "csr"                                    # sparse layers): the CSR kernels
    Wd = _expanded(W) if path == "dense" else None               # (Dout, Din) or None
    if Wd is not None:
        y = x2 @ Wd.T                                            # (N, Dout) BLAS, any layout
        y += b                                                   # (N, Dout) in place
        saved = x2
    elif path == "compact":
        used_cols = used                                         # (Du,)
        Wd = compact_weight(W, used_cols)                        # (Dout, Du)
        saved = np.take(x2, used_cols, axis=1)                   # (N, Du) gather (3x faster than x2[:, cols])
        y = saved @ Wd.T                                         # (N, Dout) BLAS, K = Du
        y += b                                                   # (N, Dout) in place
    else:
        xT = feature_major(x2)                                   # (Din, N)
        groups = row_groups(W)
        if groups is not None:
            r, z = groups
            cols = W.indices.reshape(-1, r, z)[:, 0]             # (G, Z) each group's columns
            saved = xT[cols]                                     # (G, Z, N) gather
            if z >= _MIN_BLOCK_Z:
                Wg = W.data.reshape(-1, r, z)                    # (G, r, Z) dense blocks
                yT = np.matmul(Wg, saved).reshape(d_out, -1)     # (G, r, N) -> (Dout, N)
            else:  # batched matmul with Z < 4 is slower than the CSR kernel
                yT = W @ xT                                      # (Dout, N) CSR kernel
        else:
            saved = xT
            yT = W @ xT                                          # (Dout, N) CSR kernel
        yT += b[:, None]                                         # (Dout, N)
        y = yT.T                                                 # (N, Dout) view
    cache = Cache(saved=saved, W=W, Wd=Wd, groups=groups, lead=lead, cols=used_cols)
    return y.reshape(*lead, d_out), cache                        # (..., Dout)


def backward(dy, cache):
    """Gradients of ``y = x W^T + b``.

    Parameters
    ----------
    dy : (..., Dout) upstream gradient.
    cache : Cache from :func:`forward`.

    Returns
    -------
    dx : (..., Din)
    dparams : {"W": csr_array with W's pattern, "b": (Dout,)}
    """
    check_cache(cache, Cache)
    check_grad("dy", dy, cache.lead + (cache.W.shape[0],), cache.W.dtype)
    saved, W, Wd, groups, lead, cols = cache
    d_out, d_in = W.shape
    dy2 = np.asarray(dy).reshape(-1, d_out)                      # (N, Dout)
    if cols is not None:
        xc, Wc = saved, Wd                                       # (N, Du), (Dout, Du)
        # y = xc Wc^T + b  ->  dxc = dy Wc,  dWc = dy^T xc,  db = sum_n dy
        dx = np.zeros((dy2.shape[0], d_in), dtype=dy2.dtype)     # (N, Din) unused columns: 0
        dx[:, cols] = dy2 @ Wc                                   # (N, Du) scattered back
        db = column_sum(dy2)                                     # (Dout,)
        rows, pos = _positions(W, cols)                          # (nnz,) each
        dW_data = (dy2.T @ xc)[rows, pos]                        # (Dout, Du) -> (nnz,) at the pattern
    elif Wd is not None:
        x2 = saved                                               # (N, Din)
        # y = x Wd^T + b  ->  dx = dy Wd,  dWd = dy^T x,  db = sum_n dy
        dx = dy2 @ Wd                                            # (N, Din) BLAS
        db = column_sum(dy2)                                     # (Dout,)
        dWd = dy2.T @ x2                                         # (Dout, Din)
        dW_data = pattern_values(W, dWd)                         # (nnz,)
    else:
        dyT = feature_major(dy2)                                 # (Dout, N)
        # yT = W xT + b  ->  dxT = W^T dyT,  db = sum_n dyT
        dxT = W.T @ dyT                                          # (Din, N) CSC kernel
        dx = dxT.T                                               # (N, Din) view
        db = dyT.sum(axis=1)                                     # (Dout,)
        if groups is not None:
            r, z = groups
            xg = saved                                           # (G, Z, N)
            dyg = dyT.reshape(-1, r, dyT.shape[1])               # (G, r, N)
            # yT_g = W_g xg  ->  dW_g = dyT_g xg^T
            dW_data = np.matmul(dyg, xg.transpose(0, 2, 1)).reshape(-1)  # (G, r, Z) -> (nnz,)
        else:
            xT = saved                                           # (Din, N)
            rows = np.repeat(np.arange(d_out), np.diff(W.indptr))  # (nnz,)
            if stored_density(W) < GATHER_BELOW:
                dW_data = np.einsum("zn,zn->z", xT[W.indices], dyT[rows])  # (nnz,)
            else:
                dW_data = (dyT @ xT.T)[rows, W.indices]          # (Dout, Din) -> (nnz,)
    dx = dx.reshape(*lead, d_in)                                 # (..., Din)
    dW = with_values(W, dW_data.astype(W.dtype, copy=False))
    return dx, {"W": dW, "b": db}
