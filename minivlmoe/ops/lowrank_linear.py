"""Low-rank (factored) linear layer: ``y = (x A^T) B^T + b``, two sparse_linear products.

A weight ``W`` (Dout, Din) is replaced by two factors of rank ``r``: ``A`` (r, Din) and
``B`` (Dout, r), each a dense-pattern ``scipy.sparse.csr_array``, so ``W ~ B A`` stores
``r (Din + Dout)`` numbers instead of ``Din Dout`` and costs ``2 r (Din + Dout)`` FLOPs
per token instead of ``2 Din Dout``.  The bias stays on the second product.

Math
----
For tokens ``x`` (N, Din)::

    h = x A^T                (N, r)      first product (sparse_linear with a zero bias)
    y = h B^T + b            (N, Dout)   second product

Backward (derived in docs/ops/lowrank_linear.md), for an upstream ``dy`` (N, Dout)::

    dh = dy B                (N, r)      the second product's input gradient
    dB = dy^T h              (Dout, r)
    db = sum_n dy[n, :]      (Dout,)
    dx = dh A                (N, Din)    the first product's input gradient
    dA = dh^T x              (r, Din)

Both products are :mod:`minivlmoe.ops.sparse_linear` calls (forward and backward), so
the kernels, the dtype rules and the pattern-preserving gradients are that module's.

Factoring a weight
------------------
:func:`from_dense` takes the truncated SVD ``W = U S V^T`` (singular values in
decreasing order) and splits the singular values evenly between the factors::

    A = sqrt(S_r) V_r^T      (r, Din)
    B = U_r sqrt(S_r)        (Dout, r)

so that ``B A = U_r S_r V_r^T``, the best rank-r approximation of ``W`` in the spectral
and Frobenius norms (Eckart-Young), and the two factors are *balanced*:
``A A^T = B^T B = S_r``.  Balanced factors have equal norms per singular direction, so
neither factor dominates the other's gradient (``dA = B^T (dy^T x)``, ``dB = (dy^T x)
A^T``), weight decay on ``||A||^2 + ||B||^2`` is at its minimum for the product
(it equals the nuclear norm ``2 sum S_r`` exactly at balance) and AdamW's per-entry
steps move both factors at comparable relative rates.  :func:`factor_tree` does this at
given dotted paths of a parameter tree (the model's ``ModelConfig.lowrank``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from . import sparse_linear
from ..tree import csr_on_pattern
from .._checks import check_cache, check_csr, check_int, check_params

KEYS = ("A", "B", "b")  # a factored layer's params; an unfactored one has ("W", "b")


def dense_csr(values):
    """A ``csr_array`` storing every entry of the 2-D array ``values`` (rows, cols)."""
    rows, cols = values.shape
    indices = np.tile(np.arange(cols, dtype=np.int32), rows)     # (rows*cols,)
    indptr = np.arange(0, rows * cols + 1, cols, dtype=np.int32)  # (rows+1,)
    return csr_on_pattern(np.ascontiguousarray(values).reshape(-1), indices, indptr,
                          (rows, cols))


def singular_values(W):
    """The singular values of ``W`` (csr_array or ndarray), decreasing, in float64."""
    dense = W.toarray() if isinstance(W, sp.csr_array) else np.asarray(W)
    return np.linalg.svd(dense.astype(np.float64), compute_uv=False)


def from_dense(params, rank):
    """Factor ``{"W": (Dout, Din), "b"}`` into ``{"A": (r, Din), "B": (Dout, r), "b"}``.

    Parameters
    ----------
    params : sparse_linear params {"W": csr_array (Dout, Din), "b": (Dout,)}.
    rank : int in [1, min(Din, Dout)].

    Returns
    -------
    {"A": csr_array (r, Din), "B": csr_array (Dout, r), "b": a copy of params["b"]}, in
    W's dtype; ``B A`` is the rank-r truncated SVD of W (module docstring: the split).
    """
    check_params("params", params, ("W", "b"))
    W = check_csr("params['W']", params["W"])
    d_out, d_in = W.shape
    rank = check_int("rank", rank, 1, min(d_in, d_out))
    U, S, Vt = np.linalg.svd(W.toarray().astype(np.float64), full_matrices=False)
    root = np.sqrt(S[:rank])                                     # (r,)
    A = root[:, None] * Vt[:rank]                                # (r, Din)  sqrt(S) V^T
    B = U[:, :rank] * root[None, :]                              # (Dout, r) U sqrt(S)
    dtype = W.dtype
    return {"A": dense_csr(A.astype(dtype)), "B": dense_csr(B.astype(dtype)),
            "b": np.array(params["b"], dtype=dtype)}


def factor_tree(params, ranks):
    """A copy of the tree ``params`` with the layers at the dotted paths of ``ranks``
    factored (:func:`from_dense`); other leaves are shared, not copied.

    Parameters
    ----------
    params : nested dict of parameters.
    ranks : {dotted path of a {"W", "b"} layer (e.g. "blocks.0.attn.q"): rank}.
    """
    out = dict(params)
    for path, rank in ranks.items():
        node, parents = out, path.split(".")
        *heads, last = parents
        for key in heads:
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"lowrank path {path!r} is not in the parameters (no {key!r})")
            node[key] = dict(node[key])                          # copy on the way down
            node = node[key]
        layer = node.get(last) if isinstance(node, dict) else None
        if not isinstance(layer, dict) or "W" not in layer:
            got = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            raise ValueError(f"lowrank path {path!r} must name a linear layer with params "
                             f"{{'W', 'b'}}, got {got}")
        d_out, d_in = layer["W"].shape
        try:
            node[last] = from_dense(layer, rank)
        except (TypeError, ValueError) as e:
            raise type(e)(f"lowrank rank of {path!r} (W {d_out}x{d_in}): {e}") from None
    return out


class Cache(NamedTuple):
    """``first``: the sparse_linear cache of ``h = x A^T`` (input ``x``); ``second``: that
    of ``y = h B^T + b`` (input ``h``); ``lead``: the input's leading shape."""

    first: sparse_linear.Cache
    second: sparse_linear.Cache
    lead: tuple


def check(name, params):
    """Require factored params ``{"A": (r, Din), "B": (Dout, r), "b"}``; return (Dout, Din)."""
    check_params(name, params, KEYS)
    A = check_csr(f"{name}['A']", params["A"])
    B = check_csr(f"{name}['B']", params["B"])
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"{name}['B'] must have shape (Dout, r={A.shape[0]}) (the rank of "
                         f"{name}['A']), got {B.shape}")
    return B.shape[0], A.shape[1]


def forward(x, params):
    """``y = (x A^T) B^T + b``.

    Parameters
    ----------
    x : (..., Din) float array.
    params : {"A": csr_array (r, Din), "B": csr_array (Dout, r), "b": (Dout,)}, same
        dtype as ``x``.

    Returns
    -------
    y : (..., Dout), dtype of ``x``.
    cache : Cache
    """
    check("params", params)
    A, B, b = params["A"], params["B"], params["b"]
    zero = np.zeros(A.shape[0], dtype=A.dtype)                   # (r,) no bias inside
    h, first = sparse_linear.forward(x, {"W": A, "b": zero})     # (..., r)
    y, second = sparse_linear.forward(h, {"W": B, "b": b})       # (..., Dout)
    return y, Cache(first=first, second=second, lead=first.lead)


def backward(dy, cache):
    """Gradients of :func:`forward`.

    Parameters
    ----------
    dy : (..., Dout) upstream gradient.
    cache : Cache

    Returns
    -------
    dx : (..., Din)
    dparams : {"A": csr_array with A's pattern, "B": csr_array with B's pattern, "b": (Dout,)}
    """
    check_cache(cache, Cache)
    # y = h B^T + b  ->  dh = dy B,  dB = dy^T h,  db = sum_n dy
    dh, dsecond = sparse_linear.backward(dy, cache.second)      # (..., r)
    # h = x A^T (+ 0)  ->  dx = dh A,  dA = dh^T x  (the zero bias's gradient is dropped)
    dx, dfirst = sparse_linear.backward(dh, cache.first)        # (..., Din)
    return dx, {"A": dfirst["W"], "B": dsecond["W"], "b": dsecond["b"]}
