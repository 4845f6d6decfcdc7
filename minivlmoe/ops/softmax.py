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
probabilities are all 0 (not NaN) and so is its gradient, with no floating-point warning
(it is shifted by 0, not by ``-inf``, and its zero sum is replaced by 1).  Attention relies
on this for queries with no allowed key.  NaN and ``+inf`` are rejected.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .sums import row_sum
from .._checks import check_array, check_bool, check_cache, check_grad, check_int


def _check_logits(name, x, axis):
    """Validate ``x``'s type, dtype and shape; return ``axis`` as a non-negative int.

    NaN and ``+inf`` are rejected later, on the slice maxima (:func:`_shifted_exp`): a
    slice holds one iff its maximum is NaN or ``+inf``, and the maxima are one pass
    over ``x`` that the softmax needs anyway.
    """
    check_array(name, x, finite=False)
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got shape {x.shape}")
    axis = check_int("axis", axis, -x.ndim, x.ndim - 1)
    axis %= x.ndim
    if x.shape[axis] < 1:
        raise ValueError(f"{name} must have at least 1 entry along axis={axis}, "
                         f"got shape {x.shape}")
    return axis


def _reject_nan_or_posinf(name):
    """The one error for logits holding NaN or +inf (found on a maximum)."""
    raise ValueError(f"{name} must be finite or -inf (masked), got NaN or +inf value(s)")


def _shifted_exp(name, x, axis):
    """``e = exp(x - m)`` (a new array) and ``m``, the max along ``axis`` (0 for an all
    -inf slice).  Raises if ``x`` holds NaN or ``+inf``."""
    m = np.max(x, axis=axis, keepdims=True)                      # (..., 1, ...) NaN/+inf propagate
    if not np.isfinite(m).all():
        if np.isnan(m).any() or np.isposinf(m).any():
            _reject_nan_or_posinf(name)
        m[np.isneginf(m)] = 0.0                                  # (..., 1, ...) all-masked -> 0
    e = np.subtract(x, m)                                        # (...) every exponent <= 0
    np.exp(e, out=e)                                             # (...) in place, exp(-inf) = 0
    return e, m


def _sum(a, axis):
    """``a.sum(axis, keepdims=True)``; over the last axis as a product with ones
    (minivlmoe/ops/sums.py says why)."""
    if axis == a.ndim - 1:
        return row_sum(a)                                        # (..., 1)
    return a.sum(axis=axis, keepdims=True)                       # (..., 1, ...)


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
    keepdims = check_bool("keepdims", keepdims)
    e, m = _shifted_exp("x", x, axis)                            # (...), (..., 1, ...)
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
    x : float32/float64 array (any shape, at least 1-D); ``-inf`` marks a masked entry
        (its probability is exactly 0).  A slice of only ``-inf`` gives all-zero
        probabilities (no NaN, no warning) and a zero gradient.  NaN and ``+inf`` are
        rejected.
    axis : int, the axis holding the distribution (e.g. the keys of attention).

    Returns
    -------
    p : same shape and dtype as ``x``; non-negative, sums to 1 along ``axis`` (0 for an
        all-masked slice).
    cache : Cache(p, axis)
    """
    axis = _check_logits("x", x, axis)
    if axis == x.ndim - 1 and x.size and _unshifted_is_safe(x):
        p, s = _exp_rows_unshifted(x)                            # (...), (..., 1) rows redone if small
    else:
        p, _ = _shifted_exp("x", x, axis)                        # (...) e, normalized below
        s = _sum(p, axis)                                        # (..., 1, ...) in [1, n], or 0
    s[s == 0] = 1.0                                              # (..., 1, ...) all-masked: 0 / 1
    p /= s                                                       # (...) in place: p = e / s
    return p, Cache(p=p, axis=axis)


# Without the shift: exp(x) cannot overflow while every x is below EXP_LIMIT, and a row
# whose sum is at least ROW_SUM_SAFE has an entry far above the subnormal range, so its
# ratios are as accurate as the shifted ones (float32: exp(80) = 5.5e34 < 3.4e38, and
# 1e-30 is 2^24 times the smallest normal 1.2e-38; float64 likewise).
EXP_LIMIT = {np.dtype(np.float32): 80.0, np.dtype(np.float64): 700.0}
ROW_SUM_SAFE = {np.dtype(np.float32): 1e-30, np.dtype(np.float64): 1e-290}


def _unshifted_is_safe(x):
    """True when no entry of ``x`` reaches EXP_LIMIT (one max over the whole array;
    NaN or +inf in it are rejected here, as :func:`_shifted_exp` rejects them)."""
    top = float(np.max(x))
    if np.isnan(top) or top == np.inf:
        _reject_nan_or_posinf("x")
    return top < EXP_LIMIT[x.dtype]


def _exp_rows_unshifted(x):
    """``(e, s)`` over the last axis with ``e = exp(x)`` where that is safe: the row max
    (a reduction over each short row, the slowest step of the shifted form) is computed
    only for the rows whose sum falls below ROW_SUM_SAFE (all far below 0, or all
    masked), which are redone with the shift.  Same probabilities to rounding."""
    e = np.exp(x)                                                # (...) every entry < e^EXP_LIMIT
    s = row_sum(e)                                               # (..., 1)
    small = s[..., 0] < ROW_SUM_SAFE[x.dtype]                    # (...) rows to redo
    if small.any():
        redo, _ = _shifted_exp("x", x[small], -1)                # (R, n) shifted
        e[small] = redo
        s[small] = row_sum(redo)                                 # (R, 1) in [1, n], or 0
    return e, s


def backward(dp, cache):
    """``dx = p * (dp - sum(p * dp, axis))``, same shape and dtype as ``x``.

    Staged: ``p = e / s``, ``e = exp(x - m)``; the shift ``m`` gets no gradient because
    the output does not depend on it (its two contributions cancel exactly).  Where
    ``p = 0`` (masked entries, all-masked slices) ``dx`` is exactly 0.
    """
    check_cache(cache, Cache)
    check_grad("dp", dp, cache.p.shape, cache.p.dtype)
    p, axis = cache
    dx = p * dp                                                  # (...)
    dot = _sum(dx, axis)                                         # (..., 1, ...) sum p dp
    np.subtract(dp, dot, out=dx)                                 # (...) in place: dp - dot
    dx *= p                                                      # (...) p (dp - dot)
    return dx.astype(p.dtype, copy=False)
