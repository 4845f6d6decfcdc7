"""Two-layer feed-forward network: sparse linear -> GELU -> sparse linear.

This is the transformer MLP block, used as the dense baseline layer and as every
expert of the Mixture-of-Experts layer (minivlmoe/moe/experts.py).

Math
----
For tokens ``x`` (N, D), ``fc1 = {W1 (F, D), b1 (F,)}`` and ``fc2 = {W2 (D, F), b2 (D,)}``::

    a = x W1^T + b1          (N, F)   pre-activation
    h = gelu(a)              (N, F)
    y = h W2^T + b2          (N, D)

Backward (the chain rule applied to the three ops in reverse)::

    dh, dfc2 = sparse_linear.backward(dy)      dh = dy W2
    da       = gelu.backward(dh)               da = dh * gelu'(a)
    dx, dfc1 = sparse_linear.backward(da)      dx = da W1

Layout: ``sparse_linear`` returns transposed (feature-major) views, so ``a``, ``h``
and ``y`` are views whose ``.T`` is C-contiguous; the next sparse layer reads them
without a copy (see the kernel notes in minivlmoe/ops/sparse_linear.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import gelu, linear, sparse_linear
from .._checks import check_cache, check_int, check_params


def init(rng, d, hidden, density=1.0, dtype=np.float32):
    """Create ``{"fc1": sparse_linear params (F, D), "fc2": sparse_linear params (D, F)}``.

    Parameters
    ----------
    rng : numpy.random.Generator
    d : int >= 1, model width D.
    hidden : int >= 1, hidden width F.
    density : float in (0, 1], stored fraction of each weight row.
    dtype : numpy.float32 or numpy.float64.
    """
    check_int("d", d, 1)
    check_int("hidden", hidden, 1)
    return {"fc1": sparse_linear.init(rng, d, hidden, density, dtype),
            "fc2": sparse_linear.init(rng, hidden, d, density, dtype)}


class Cache(NamedTuple):
    """``fc1``, ``fc2``: the two sparse_linear caches (inputs ``x`` and ``h``);
    ``act``: the GELU cache (the pre-activation ``a``)."""

    fc1: sparse_linear.Cache
    act: gelu.Cache
    fc2: sparse_linear.Cache


def forward(x, params):
    """``y = gelu(x W1^T + b1) W2^T + b2``.

    Parameters
    ----------
    x : (..., D) float array.
    params : {"fc1": {"W": (F, D), "b": (F,)}, "fc2": {"W": (D, F), "b": (D,)}}.

    Returns
    -------
    y : (..., D), dtype of ``x``.
    cache : Cache
    """
    check_params("params", params, ("fc1", "fc2"))
    a, c1 = linear.forward(x, params["fc1"])                    # (..., F)
    h, ca = gelu.forward(a)                                      # (..., F)
    y, c2 = linear.forward(h, params["fc2"])                    # (..., D)
    return y, Cache(fc1=c1, act=ca, fc2=c2)


def backward(dy, cache):
    """Gradients of :func:`forward`.

    Parameters
    ----------
    dy : (..., D) upstream gradient.
    cache : Cache

    Returns
    -------
    dx : (..., D)
    dparams : {"fc1": {"W", "b"}, "fc2": {"W", "b"}}, keyed like the params.
    """
    check_cache(cache, Cache)
    dh, dfc2 = linear.backward(dy, cache.fc2)                   # (..., F)
    da = gelu.backward(dh, cache.act)                            # (..., F)
    dx, dfc1 = linear.backward(da, cache.fc1)                   # (..., D)
    return dx, {"fc1": dfc1, "fc2": dfc2}
