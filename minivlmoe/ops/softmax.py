"""Numerically stable softmax along one axis, and the log-sum-exp helper.

Math
----
For a vector ``x`` along ``axis``::

    p_j = exp(x_j - m) / sum_k exp(x_k - m),      m = max_k x_k

Subtracting the maximum changes nothing mathematically (the factor ``exp(-m)``
cancels) but keeps every exponent <= 0, so ``exp`` never overflows and the largest
term is exactly 1, so the sum never underflows to 0.

Backward (derived in docs/ops/softmax.md), for an upstream ``dp``::

    dx_j = p_j (dp_j - sum_k p_k dp_k)

Masked entries
--------------
``x`` may contain ``-inf`` (a masked entry, e.g. a padded key): its probability is
exactly 0.  A slice whose entries are *all* ``-inf`` has no distribution; its
probabilities are all 0 (not NaN) and so is its gradient.  NaN and ``+inf`` are
rejected.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._checks import check_array, check_int


def _check_logits(name, x, axis):
    """Validate ``x`` (finite or -inf entries) and return ``axis`` as a non-negative int."""
    check_array(name, x, finite=False)
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError(f"{name} must be finite or -inf (masked), got NaN or +inf value(s)")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got shape {x.shape}")
    axis = check_int("axis", axis, -x.ndim, x.ndim - 1)
    axis %= x.ndim
    if x.shape[axis] < 1:
        raise ValueError(f"{name} must have at least 1 entry along axis={axis}, "
                         f"got shape {x.shape}")
    return axis


def _shifted_exp(x, axis):
    """``exp(x - m)`` with ``m`` the max along ``axis`` (0 for an all -inf slice)."""
    m = np.max(x, axis=axis, keepdims=True)                     # (..., 1, ...)
    m = np.where(np.isneginf(m), 0.0, m).astype(x.dtype)         # (..., 1, ...) all-masked -> 0
    return np.exp(x - m), m                                      # (...) every exponent <= 0


def logsumexp(x, axis=-1, keepdims=False):
    """``log(sum(exp(x), axis))`` computed stably as ``m + log(sum(exp(x - m)))``.

    Parameters
    ----------
    x : float array, finite or -inf entries.
    axis : int, the axis to reduce.
    keepdims : bool, keep the reduced axis with size 1.

    Returns
    -------
    lse : array of ``x``'s dtype with ``axis`` removed (or kept with size 1);
        ``-inf`` for an all ``-inf`` slice.  Its gradient is ``softmax(x, axis)``.
    """
    axis = _check_logits("x", x, axis)
    e, m = _shifted_exp(x, axis)                                 # (...), (..., 1, ...)
    s = e.sum(axis=axis, keepdims=True)                          # (..., 1, ...) in [1, n], or 0
    with np.errstate(divide="ignore"):                           # log(0) = -inf: all masked
        lse = m + np.log(s)                                      # (..., 1, ...)
    return lse if keepdims else np.squeeze(lse, axis=axis)


class Cache(NamedTuple):
    """``p``: the probabilities (shape of ``x``), the only thing backward needs;
    ``axis``: the (non-negative) axis the softmax ran along."""

    p: np.ndarray
    axis: int


def forward(x, axis=-1):
    """Softmax of ``x`` along ``axis``.

    Parameters
    ----------
    x : float32/float64 array (any shape, at least 1-D); ``-inf`` marks a masked entry.
    axis : int, the axis holding the distribution (e.g. the keys of attention).

    Returns
    -------
    p : same shape and dtype as ``x``; non-negative, sums to 1 along ``axis`` (0 for an
        all-masked slice).
    cache : Cache(p, axis)
    """
    axis = _check_logits("x", x, axis)
    e, _ = _shifted_exp(x, axis)                                 # (...)
    s = e.sum(axis=axis, keepdims=True)                          # (..., 1, ...)
    p = e / np.where(s > 0, s, 1.0).astype(x.dtype)             # (...) all-masked -> 0
    return p, Cache(p, axis)


def backward(dp, cache):
    """``dx = p * (dp - sum(p * dp, axis))``, same shape and dtype as ``x``.

    Staged: ``p = e / s``, ``e = exp(x - m)``; the shift ``m`` gets no gradient because
    the output does not depend on it (its two contributions cancel exactly).
    """
    p, axis = cache
    dot = np.sum(p * dp, axis=axis, keepdims=True)               # (..., 1, ...)
    dx = p * (dp - dot)                                          # (...)
    return dx.astype(p.dtype, copy=False)
