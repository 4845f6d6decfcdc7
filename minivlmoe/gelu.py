"""GELU activation, the exact (erf) form used by BERT and ViT.

Math
----
    gelu(x) = x Φ(x),   Φ(x) = (1 + erf(x / sqrt(2))) / 2      (standard normal CDF)
    gelu'(x) = Φ(x) + x φ(x),   φ(x) = exp(-x² / 2) / sqrt(2π)

(GPT-2 uses the tanh approximation ``0.5 x (1 + tanh(sqrt(2/π)(x + 0.044715 x³)))``,
which differs by < 1e-3; we use the exact form.)  Derivation: docs/ops/gelu.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import erf

from ._checks import check_array


class Cache(NamedTuple):
    """``x`` (any shape): the input, needed for Φ(x) and φ(x)."""

    x: np.ndarray


def forward(x):
    """``gelu(x)``, element-wise; ``x`` any shape, float32 or float64. Returns (out, cache)."""
    check_array("x", x)
    cdf = 0.5 * (1.0 + erf(x * (1.0 / np.sqrt(2.0))))           # (...) Φ(x)
    return (x * cdf).astype(x.dtype, copy=False), Cache(x)


def backward(dout, cache):
    """``dx = dout * (Φ(x) + x φ(x))``; same shape as ``x``."""
    x = cache.x
    cdf = 0.5 * (1.0 + erf(x * (1.0 / np.sqrt(2.0))))           # (...) Φ(x)
    pdf = np.exp(-0.5 * x * x) * (1.0 / np.sqrt(2.0 * np.pi))   # (...) φ(x)
    return (dout * (cdf + x * pdf)).astype(x.dtype, copy=False)


def gradcheck_cases(rng):
    """One small float64 case for the CLI report."""
    from .gradcheck import GradcheckCase

    return [GradcheckCase("gelu", {"x": 2.0 * rng.standard_normal((3, 7))},
                          lambda a: forward(a["x"]),
                          lambda dout, cache: {"x": backward(dout, cache)})]
