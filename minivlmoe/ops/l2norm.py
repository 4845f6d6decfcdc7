"""L2 normalization of each row: ``y = x / max(||x||, eps)``.

Math
----
For one row ``x`` (D,)::

    r = ||x||_2 = sqrt(sum_i x_i^2)
    q = max(r, eps)                  the eps convention of torch.nn.functional.normalize
    y = x / q

``eps`` only matters for rows whose norm is at most ``eps`` (1e-12 by default, so in
practice only an all-zero row): there ``y = x / eps``, so a zero row maps to a zero
row instead of 0/0.  Every other row gets exactly unit norm.

Backward (derived in docs/ops/l2norm.md)::

    normalized rows (r > eps):   dx = (dy - y * sum_i(y_i dy_i)) / r
    clamped rows    (r <= eps):  dx = dy / eps                  (y is linear in x there)

On a normalized row the gradient is the component of ``dy`` orthogonal to ``y``,
divided by the norm: moving ``x`` along itself does not change ``y``.

The norm is computed as ``sqrt(sum(x^2))`` without rescaling, so rows with entries
beyond ~1e19 (float32) or ~1e154 (float64) would overflow; embeddings never get near.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._checks import check_array, check_cache, check_float, check_grad


class Cache(NamedTuple):
    """What backward needs.

    Fields
    ------
    y : (..., D) the output; on normalized rows the projection needs it.
    q : (..., 1) the divisor ``max(||x||, eps)`` of each row.
    normalized : (..., 1) bool, True where ``||x|| > eps`` (False: the clamped branch).
    """

    y: np.ndarray
    q: np.ndarray
    normalized: np.ndarray


def forward(x, eps=1e-12):
    """Divide each row of ``x`` (last axis) by ``max(||x||_2, eps)``.

    Parameters
    ----------
    x : (..., D) float32/float64, finite.
    eps : float > 0, lower bound on the divisor.

    Returns
    -------
    y : (..., D), dtype of ``x``; rows of unit L2 norm where ``||x|| > eps``.
    cache : Cache(y, q, normalized)
    """
    check_array("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {x.shape}")
    eps = check_float("eps", eps, 0.0, None, low_open=True)
    r = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))           # (..., 1)
    normalized = r > eps                                         # (..., 1)
    q = np.where(normalized, r, eps).astype(x.dtype, copy=False)  # (..., 1)
    y = x / q                                                    # (..., D)
    return y, Cache(y=y, q=q, normalized=normalized)


def backward(dy, cache):
    """``dx = (dy - y <y, dy>) / ||x||`` on normalized rows, ``dy / eps`` on clamped rows.

    Returns
    -------
    dx : (..., D), dtype of ``x``.
    """
    check_cache(cache, Cache)
    check_grad("dy", dy, cache.y.shape, cache.y.dtype)
    y, q, normalized = cache
    # y = x / q  ->  dx = dy / q, dq = -sum(dy * x) / q^2 = -sum(dy * y) / q
    dot = np.sum(dy * y, axis=-1, keepdims=True)                 # (..., 1)  <y, dy>
    # q = r on normalized rows, r = ||x||  ->  dx += dq * x / r = -dot * y / q
    dot = np.where(normalized, dot, 0.0)                         # (..., 1) q = eps: no dq path
    dx = (dy - y * dot) / q                                      # (..., D)
    return dx.astype(y.dtype, copy=False)
