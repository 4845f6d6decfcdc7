"""Layer normalization over the last axis, with a learned scale and shift.

Math
----
For one row ``x`` (D,) and parameters ``gamma``, ``beta`` (D,)::

    mu   = (1/D) sum_i x_i
    var  = (1/D) sum_i (x_i - mu)^2           biased variance (divide by D, not D-1)
    rstd = 1 / sqrt(var + eps)                eps inside the square root
    xhat = (x - mu) * rstd                    mean 0, variance var / (var + eps) ~ 1
    y    = gamma * xhat + beta

Backward (derived in docs/ops/layernorm.md; the fused form of llm.c)::

    dbeta  = sum over rows of dy
    dgamma = sum over rows of dy * xhat
    dxhat  = dy * gamma
    dx     = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

where the means run over the D features of each row.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .sums import column_sum, row_mean
from .._checks import (check_array, check_cache, check_dtype, check_float, check_grad, check_int,
                       check_params, check_same_dtype)


def init(d, dtype=np.float32):
    """Return ``{"gamma": ones (D,), "beta": zeros (D,)}`` (the identity affine map)."""
    d = check_int("d", d, 1)
    dtype = check_dtype("dtype", dtype)
    return {"gamma": np.ones(d, dtype=dtype), "beta": np.zeros(d, dtype=dtype)}


class Cache(NamedTuple):
    """What backward needs.

    Fields
    ------
    xhat : (..., D) the normalized input; needed for dgamma and for dx.
    rstd : (..., 1) the reciprocal standard deviation 1 / sqrt(var + eps) of each row.
    gamma : (D,) the scale (a reference to the parameter, not a copy).
    """

    xhat: np.ndarray
    rstd: np.ndarray
    gamma: np.ndarray


def forward(x, params, eps=1e-5):
    """Normalize each row of ``x`` over its last axis, then scale and shift.

    Parameters
    ----------
    x : (..., D) float32/float64, finite.
    params : {"gamma": (D,), "beta": (D,)}, same dtype as ``x``.
    eps : float > 0, added to the variance inside the square root.

    Returns
    -------
    y : (..., D), dtype of ``x``.
    cache : Cache(xhat, rstd, gamma)
    """
    check_array("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {x.shape}")
    d = x.shape[-1]
    check_params("params", params, ("gamma", "beta"))
    gamma, beta = params["gamma"], params["beta"]
    for name, p in (("params['gamma']", gamma), ("params['beta']", beta)):
        check_array(name, p)
        if p.shape != (d,):
            raise ValueError(f"{name} must have shape (D,) = ({d},), got {p.shape}")
        check_same_dtype(name, p, "x", x)
    eps = check_float("eps", eps, 0.0, None, low_open=True)
    mu = row_mean(x)                                             # (..., 1)
    xhat = x - mu                                                # (..., D) x - mu, for now
    var = row_mean(xhat * xhat)                                  # (..., 1) biased
    var += eps
    rstd = 1.0 / np.sqrt(var)                                    # (..., 1)
    xhat *= rstd                                                 # (..., D) in place: xhat
    y = xhat * gamma                                             # (..., D)
    y += beta                                                    # (..., D) in place
    return y, Cache(xhat=xhat, rstd=rstd, gamma=gamma)


def backward(dy, cache):
    """Gradients of layer norm (fused form).

    Parameters
    ----------
    dy : (..., D) upstream gradient.
    cache : Cache from :func:`forward`.

    Returns
    -------
    dx : (..., D)
    dparams : {"gamma": (D,), "beta": (D,)}
    """
    check_cache(cache, Cache)
    check_grad("dy", dy, cache.xhat.shape, cache.xhat.dtype)
    xhat, rstd, gamma = cache
    # y = xhat * gamma + beta
    dbeta = column_sum(dy)                                       # (D,)
    dgamma = column_sum(dy * xhat)                               # (D,)
    dxhat = dy * gamma                                           # (..., D)
    # xhat = (x - mu) * rstd, with mu and rstd themselves functions of x (fused)
    mean_dxhat = row_mean(dxhat)                                 # (..., 1)
    mean_dxhat_xhat = row_mean(dxhat * xhat)                     # (..., 1)
    dx = xhat * mean_dxhat_xhat                                  # (..., D)
    np.subtract(dxhat, dx, out=dx)                               # (..., D) dxhat - xhat m2
    dx -= mean_dxhat                                             #          - m1
    dx *= rstd                                                   #          times rstd
    dtype = xhat.dtype
    return dx.astype(dtype, copy=False), {"gamma": dgamma.astype(dtype, copy=False),
                                          "beta": dbeta.astype(dtype, copy=False)}
