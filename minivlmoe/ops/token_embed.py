"""Token embedding: look up each id's vector and add a learned position vector.

Math
----
For integer ids ``ids`` (B, T) in [0, V), a token table ``tok`` (V, D) and a position
table ``pos`` (Tmax, D) with T <= Tmax::

    x[b, t] = tok[ids[b, t]] + pos[t]                     # (B, T, D)

Both tables are dense arrays, not sparse weights: an embedding is a *gather* (row
``ids[b, t]`` of ``tok``), not a matrix product.  Written as a product it would be
``onehot(ids) @ tok``, whose one-hot factor has a single 1 per row, so the gather is
the same thing without the multiplications.

Backward (derived in docs/ops/token_embed.md), for ``dx`` (B, T, D)::

    dtok[v] = sum over all (b, t) with ids[b, t] == v of dx[b, t]     # scatter-add
    dpos[t] = sum_b dx[b, t]  for t < T,   0 for T <= t < Tmax

The scatter-add must *accumulate* when an id occurs more than once: ``dtok[ids] += dx``
would keep only one of the repeated rows (fancy-index assignment is buffered).  We sort
the rows by id and sum each run of equal ids with ``np.add.reduceat`` (one pass; the
unbuffered ``np.add.at`` computes the same sums, one row at a time: about 4x slower,
``benchmarks/primitives.py``).  The ids are
integers: they get no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._checks import (check_array, check_cache, check_dtype, check_grad, check_int, check_params,
                       check_same_dtype)


def init(rng, vocab, max_len, d, dtype=np.float32):
    """Create ``{"tok": (V, D), "pos": (Tmax, D)}``, both drawn from N(0, 0.02²) (as GPT-2)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    vocab = check_int("vocab", vocab, 1)
    max_len = check_int("max_len", max_len, 1)
    d = check_int("d", d, 1)
    dtype = check_dtype("dtype", dtype)
    tok = (0.02 * rng.standard_normal((vocab, d))).astype(dtype)      # (V, D)
    pos = (0.02 * rng.standard_normal((max_len, d))).astype(dtype)    # (Tmax, D)
    return {"tok": tok, "pos": pos}


class Cache(NamedTuple):
    """What backward needs.

    Fields
    ------
    ids : (B, T) int, the looked-up ids (where to scatter the gradient).
    vocab : int V and max_len : int Tmax, the table sizes (the gradients' shapes).
    """

    ids: np.ndarray
    vocab: int
    max_len: int


def forward(ids, params):
    """``x[b, t] = tok[ids[b, t]] + pos[t]``.

    Parameters
    ----------
    ids : (B, T) integer array, values in [0, V), T <= Tmax.
    params : {"tok": (V, D), "pos": (Tmax, D)}, float32 or float64, same dtype.

    Returns
    -------
    x : (B, T, D), dtype of the tables.
    cache : Cache (fields ``ids``, ``vocab``, ``max_len``).
    """
    check_params("params", params, ("tok", "pos"))
    tok, pos = params["tok"], params["pos"]
    check_array("params['tok']", tok, ndim=2, axes="(V, D)")
    check_array("params['pos']", pos, ndim=2, axes="(Tmax, D)")
    check_same_dtype("params['pos']", pos, "params['tok']", tok)
    V, D = tok.shape
    Tmax = pos.shape[0]
    if pos.shape[1] != D:
        raise ValueError(f"params['pos'] must have shape (Tmax, D={D}), got {pos.shape}")
    check_array("ids", ids, ndim=2, axes="(B, T)", dtype_kind="i")
    T = ids.shape[1]
    if T > Tmax:
        raise ValueError(f"ids must have at most max_len={Tmax} positions (B, T<=Tmax), "
                         f"got T={T}")
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"ids must be in [0, V={V}), got values in "
                         f"[{ids.min()}, {ids.max()}]")
    x = tok[ids] + pos[:T]                                        # (B, T, D) gather + broadcast
    return x, Cache(ids=ids, vocab=V, max_len=Tmax)


def backward(dx, cache):
    """Gradients of :func:`forward` with respect to the tables.

    Parameters
    ----------
    dx : (B, T, D) upstream gradient.
    cache : Cache from :func:`forward`.

    Returns
    -------
    dparams : {"tok": (V, D), "pos": (Tmax, D)}; rows of ids that never occur, and
        positions t >= T, get zero gradient.
    """
    check_cache(cache, Cache)
    check_grad("dx", dx, cache.ids.shape + (None,))
    ids, V, Tmax = cache
    B, T, D = dx.shape
    # x = ... + pos[:T]  (broadcast over B)  ->  sum over B into the first T rows
    dpos = np.zeros((Tmax, D), dtype=dx.dtype)                    # (Tmax, D)
    dpos[:T] = dx.sum(axis=0)                                     # (T, D)
    # x = tok[ids] + ...  (gather)  ->  scatter-add, accumulating repeated ids
    dtok = np.zeros((V, D), dtype=dx.dtype)                       # (V, D)
    flat = ids.reshape(-1)                                        # (B*T,)
    order = np.argsort(flat, kind="stable")                       # (B*T,) rows by id
    sorted_ids = flat[order]                                      # (B*T,)
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # first row of each id
    dtok[sorted_ids[starts]] = np.add.reduceat(
        dx.reshape(B * T, D)[order], starts, axis=0)              # (ids present, D) run sums
    return {"tok": dtok, "pos": dpos}
