"""GELU activation, tanh form (GPT-2, BERT's original code, PyTorch ``approximate="tanh"``).

Math
----
    u(x) = c (x + a x³),   c = sqrt(2/π),   a = 0.044715
    gelu(x) = ½ x (1 + tanh u)
    gelu'(x) = ½ (1 + tanh u) + ½ x (1 - tanh² u) c (1 + 3 a x²)

This approximates the exact ``x Φ(x)`` (Φ the standard normal CDF) to within 1e-3.  We
use the tanh form because it is what GPT-2 trained with and because it is faster:
forward + backward take about half the time of the erf form with ``scipy.special.erf``
(``benchmarks/gelu.py``; numbers in docs/ops/gelu.md).

Inside ``u`` the input is clipped to [-10, 10]: beyond that ``tanh u`` is exactly ±1
in float32 and float64, so the clip changes no result, and it keeps ``x³`` finite.
Derivation: docs/ops/gelu.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._checks import check_array, check_cache, check_grad

C = float(np.sqrt(2.0 / np.pi))  # a Python float: a NumPy float64 scalar would promote float32 arrays
A = 0.044715
_CLIP = 10.0


class Cache(NamedTuple):
    """``xc``: the input clipped to [-10, 10]; ``q = ½ (1 + tanh u(x))``, so that
    ``gelu(x) = q x``; both of the input's shape (and memory order)."""

    xc: np.ndarray
    q: np.ndarray


def _memory_order(x):
    """Flatten Fortran-ordered arrays (e.g. the transposed views that sparse_linear
    returns) in their own order, so no copy is made and the layout is kept."""
    return "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"


def forward(x):
    """``gelu(x)``, element-wise; ``x`` any shape, float32 or float64. Returns (out, cache)."""
    check_array("x", x)
    order = _memory_order(x)
    x1 = x.reshape(-1, order=order)                              # (x.size,) a flat view (ops in place)
    xc = np.clip(x1, -_CLIP, _CLIP)                              # (x.size,) exact clip (docstring)
    q = xc * xc                                                  # (x.size,) x²
    q *= A * C                                                   #       c a x²
    q += C                                                       #       c (1 + a x²)
    q *= xc                                                      #       u = c (x + a x³)
    np.tanh(q, out=q)                                            # (x.size,) tanh u (in place)
    q *= 0.5
    q += 0.5                                                     #       q = ½ (1 + tanh u)
    y = q * x1                                                   # (x.size,) gelu(x) = q x
    shape = x.shape
    return (y.reshape(shape, order=order),                       # (...) back to x's layout
            Cache(xc=xc.reshape(shape, order=order), q=q.reshape(shape, order=order)))


def backward(dout, cache):
    """``dx = dout * gelu'(x)``; same shape as ``x``.

    With ``q = ½ (1 + t)``, ``t = tanh u``: ``1 - t² = 4 q (1 - q)``, so
    ``gelu'(x) = q + ½ x (1 - t²) u'(x) = q + q (1 - q) x (2c + 6ca x²)``.
    """
    check_cache(cache, Cache)
    check_grad("dout", dout, cache.q.shape, cache.q.dtype)
    order = _memory_order(cache.q)
    xc = cache.xc.reshape(-1, order=order)                       # (x.size,) flat, as in forward
    q = cache.q.reshape(-1, order=order)                         # (x.size,)
    slope = xc * xc                                              # (x.size,) x²
    slope *= 6.0 * A * C                                         #       6ca x²
    slope += 2.0 * C                                             #       2c + 6ca x²  (= 2 u'(x))
    slope *= xc                                                  #       x (2c + 6ca x²)
    qq = np.subtract(1.0, q)                                     # (x.size,) 1 - q
    qq *= q                                                      #       q (1 - q)  (= (1 - t²) / 4)
    slope *= qq                                                  #       q (1 - q) x 2u'(x)
    slope += q                                                   #       + q  ->  gelu'(x)
    return np.asarray(dout) * slope.reshape(cache.q.shape, order=order)  # (...)
