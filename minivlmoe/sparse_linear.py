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
Every output row stores exactly ``k = max(1, round(density * Din))`` entries in random
columns, so every output unit has the same fan-in ``k``; values are drawn from
N(0, 1/k) (LeCun-normal over the *stored* fan-in).  The gradient of ``W`` is a
``csr_array`` with byte-identical ``indices`` and ``indptr``, and optimizers update
only ``W.data``, so the pattern can never drift.

Kernels (measured in benchmarks/sparse_linear.py, explained in docs/ops/sparse_linear.md)
------------------------------------------------------------------------------------------
scipy's CSR kernels need the dense operand's contraction axis to be rows of a
C-contiguous array, i.e. *feature-major* activations ``xT`` (Din, N).  Token-major
``x @ W.T`` makes scipy copy ``x`` into that layout with a naive strided transpose,
which for wide arrays costs more than the product, so this layer does the layout
change itself with a cache-blocked transpose (:func:`feature_major`) and then
computes ``yT = W @ xT`` and ``dxT = W^T @ dyT``.  The layer returns ``y = yT.T`` (a
transposed view), so a following sparse layer, or the backward of the preceding one,
gets a feature-major array for free.

* stored density < ``DENSE_ABOVE`` (0.1): sparse products for ``y`` and ``dx``;
  otherwise ``W`` is expanded with ``toarray()`` and dense BLAS does the work (CSR
  kernels lose to BLAS above roughly 5-10% density).
* weight gradient, density < ``GATHER_BELOW`` (0.02): gather the stored columns of
  ``xT`` and the matching rows of ``dyT`` and reduce over tokens, O(nnz·N); otherwise
  the dense ``dyT @ xT^T`` (one BLAS GEMM) followed by a gather at the pattern.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ._checks import check_array, check_csr, check_float, check_int, check_same_dtype

DENSE_ABOVE = 0.1
GATHER_BELOW = 0.02
_TILE = 64  # tokens per tile of the blocked transpose


def init(rng, d_in, d_out, density=1.0, dtype=np.float32):
    """Create ``{"W": csr_array (Dout, Din), "b": zeros (Dout,)}``.

    Parameters
    ----------
    rng : numpy.random.Generator
    d_in, d_out : int >= 1, input and output widths.
    density : float in (0, 1], fraction of stored entries per row.
    dtype : numpy.float32 or numpy.float64.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    d_in = check_int("d_in", d_in, 1)
    d_out = check_int("d_out", d_out, 1)
    density = check_float("density", density, 0.0, 1.0, low_open=True)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    k = max(1, int(round(density * d_in)))                       # stored entries per row
    scores = rng.random((d_out, d_in))                           # (Dout, Din)
    cols = np.sort(np.argsort(scores, axis=1)[:, :k], axis=1)    # (Dout, k) distinct, sorted
    values = rng.standard_normal(d_out * k) / np.sqrt(k)         # (Dout*k,)
    indptr = np.arange(0, d_out * k + 1, k, dtype=np.int32)      # (Dout+1,)
    W = sp.csr_array((values.astype(dtype), cols.reshape(-1).astype(np.int32), indptr),
                     shape=(d_out, d_in))
    W.has_canonical_format = True
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


class Cache(NamedTuple):
    """What backward needs: ``xT`` (Din, N) feature-major input, the weight ``W``
    (Dout, Din), the dense copy ``Wd`` (or None on the sparse path) and the input's
    leading shape (to restore ``dx``'s shape)."""

    xT: np.ndarray
    W: sp.csr_array
    Wd: np.ndarray | None
    lead: tuple


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
    W, b = params["W"], params["b"]
    check_csr("params['W']", W)
    d_out, d_in = W.shape
    check_array("x", x)
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x must have shape (..., Din={d_in}), got {x.shape}")
    check_same_dtype("x", x, "params['W']", W)
    check_array("params['b']", b, ndim=1, axes="(Dout,)")
    if b.shape != (d_out,):
        raise ValueError(f"params['b'] must have shape ({d_out},), got {b.shape}")
    check_same_dtype("params['b']", b, "params['W']", W)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)                                     # (N, Din)  '... i -> (...) i'
    xT = feature_major(x2)                                       # (Din, N)
    if stored_density(W) < DENSE_ABOVE:
        Wd = None
        yT = W @ xT                                              # (Dout, N) CSR kernel
    else:
        Wd = W.toarray()                                         # (Dout, Din)
        yT = Wd @ xT                                             # (Dout, N) BLAS
    yT += b[:, None]                                             # (Dout, N)
    y = yT.T.reshape(*lead, d_out)                               # (..., Dout) view
    return y, Cache(xT, W, Wd, lead)


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
    xT, W, Wd, lead = cache
    d_out, d_in = W.shape
    dy2 = np.asarray(dy).reshape(-1, d_out)                      # (N, Dout)
    dyT = feature_major(dy2)                                     # (Dout, N)
    # y = W x + b  (feature-major)  ->  dx = W^T dy
    if Wd is None:
        dxT = W.T @ dyT                                          # (Din, N) CSC kernel
    else:
        dxT = Wd.T @ dyT                                         # (Din, N) BLAS
    dx = dxT.T.reshape(*lead, d_in)                              # (..., Din) view
    # dW[o, i] = sum_n dy[n, o] x[n, i] on the stored (o, i) only
    rows = np.repeat(np.arange(d_out), np.diff(W.indptr))        # (nnz,) row of each entry
    if stored_density(W) < GATHER_BELOW:
        dW_data = np.einsum("zn,zn->z", xT[W.indices], dyT[rows])  # (nnz,)
    else:
        dW_data = (dyT @ xT.T)[rows, W.indices]                  # (Dout, Din) -> (nnz,)
    dW = sp.csr_array((dW_data.astype(W.dtype, copy=False), W.indices, W.indptr),
                      shape=W.shape)
    dW.has_canonical_format = True
    db = dyT.sum(axis=1)                                         # (Dout,)
    return dx, {"W": dW, "b": db}


def gradcheck_cases(rng):
    """Small float64 cases for ``python -m minivlmoe gradcheck``: one per kernel path."""
    from .gradcheck import GradcheckCase

    cases = []
    for density, d_in, d_out in ((1.0, 5, 4), (0.3, 40, 6), (0.01, 120, 3)):
        params = init(rng, d_in, d_out, density, dtype=np.float64)
        params["b"] = rng.standard_normal(d_out)
        x = rng.standard_normal((2, 3, d_in))
        cases.append(GradcheckCase(
            f"sparse_linear(density={density})",
            {"x": x, "params": params},
            lambda a: forward(a["x"], a["params"]),
            lambda dout, cache: dict(zip(("x", "params"), backward(dout, cache))),
        ))
    return cases
