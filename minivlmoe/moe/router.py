"""The softmax router of a Mixture-of-Experts layer: logits, top-k choice, gates.

Math
----
For tokens ``x`` (N, D) and a router ``{W (E, D), b (E,)}`` (a sparse linear layer)::

    logits = x W^T + b (+ noise)                      (N, E)
    p      = softmax(logits)  over the E experts      (N, E)
    top    = the K experts with the largest logits    (N, K)  best first
    g[n, j] = p[n, top[n, j]]                          raw      (Switch, V-MoE)
    g[n, j] = p[n, top[n, j]] / sum_i p[n, top[n, i]]  renormalized (GShard top-2,
                                                       Mixtral; equal to a softmax
                                                       over the K chosen logits)

``top`` breaks ties deterministically: among equal logits the lowest expert index
wins (a stable sort of ``-logits``).  Choosing on logits or on ``p`` is the same,
because softmax is monotone.

Noise: V-MoE adds ``std * N(0, 1)`` to the logits in training (std = 1/E).  This
module takes the noise as an array (``noise``), so it stays pure; the caller draws it
from an explicit ``numpy.random.Generator`` (:func:`sample_noise`) and passes nothing
at evaluation, which is therefore deterministic.

Backward (derived in docs/moe/router.md), for upstream ``dg`` (N, K) and the optional
extra upstreams ``dp`` (N, E) (auxiliary losses on ``p``) and ``dlogits`` (N, E)
(the z-loss)::

    renormalized:  dpick[n, j] = (dg[n, j] - sum_i dg[n, i] g[n, i]) / s[n],
                   s[n] = sum_i p[n, top[n, i]]
    raw:           dpick = dg
    dp[n, top[n, j]] += dpick[n, j]        (scatter; unchosen experts get 0 here)
    dlogits += p * (dp - sum_e p dp)       (softmax backward)
    dx, dW, db = sparse_linear.backward(dlogits)

The renormalizer ``s`` depends on the chosen probabilities, so it must be
differentiated (the ``sum_i dg g`` term); treating it as a constant gives a wrong
router gradient.  With renormalized gates ``sum_j pick_j dpick_j = 0``, so unchosen
experts get no logit gradient from the gates (raw gates give them
``-p[n, e] sum_j g dg``), and with K = 1 no logit gets any (g = 1).  The choice ``top``
is piecewise constant and has no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..ops import softmax, sparse_linear
from .._checks import (check_array, check_bool, check_cache, check_csr, check_float, check_grad,
                       check_int, check_params, check_same_dtype, shorten)


def init(rng, d, num_experts, density=1.0, dtype=np.float32):
    """Router params ``{"W": csr_array (E, D), "b": zeros (E,)}`` (a sparse linear layer)."""
    check_int("d", d, 1)
    check_int("num_experts", num_experts, 1)
    return sparse_linear.init(rng, d, num_experts, density, dtype)


def check_k(k, num_experts):
    """Validate the number of experts per token: an int in [1, num_experts]."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__} {shorten(repr(k))}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
    return int(k)


def top_k(logits, k):
    """Indices (N, K) of the ``k`` largest logits per row, best first.

    Ties go to the lowest expert index: a *stable* sort of ``-logits`` keeps equal
    values in index order (``argmax`` also returns the first maximum).
    """
    if k == 1:
        return np.argmax(logits, axis=1)[:, None]                # (N, 1)
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]     # (N, K)


def margin(logits, k):
    """Per-token gap between the k-th and (k+1)-th largest logit, (N,); ``inf`` if k = E.

    Routing is piecewise constant in the logits: a perturbation smaller than half this
    gap cannot change the chosen set, so finite differences are valid there.
    """
    n, e = logits.shape
    if k >= e:
        return np.full(n, np.inf)
    ordered = -np.sort(-logits, axis=1)                          # (N, E) descending
    return ordered[:, k - 1] - ordered[:, k]                     # (N,)


def sample_noise(rng, shape, std, dtype):
    """Router noise ``std * N(0, 1)`` of ``shape`` (N, E), drawn from ``rng`` only."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    std = check_float("noise_std", std, 0.0)
    return (std * rng.standard_normal(shape)).astype(dtype)      # (N, E)


class Routing(NamedTuple):
    """The router's decisions for N tokens.

    Fields
    ------
    logits : (N, E) router logits, including noise when it was given.
    probs : (N, E) softmax of ``logits`` over the experts.
    experts : (N, K) int, the chosen experts, best first (before capacity).
    gates : (N, K) combine weights of the chosen experts (before capacity).
    """

    logits: np.ndarray
    probs: np.ndarray
    experts: np.ndarray
    gates: np.ndarray


class Cache(NamedTuple):
    """``linear``: the sparse_linear cache (input ``x``, weight ``W``); ``softmax``:
    the softmax cache (``p``); ``experts`` (N, K) the choice; ``gates`` (N, K) and
    ``total`` (N, 1) the renormalizer ``s`` (None when raw), for the quotient rule."""

    linear: sparse_linear.Cache
    softmax: softmax.Cache
    experts: np.ndarray
    gates: np.ndarray
    total: np.ndarray | None


def forward(x, params, k, renormalize=True, noise=None):
    """Route N tokens to K of E experts.

    Parameters
    ----------
    x : (N, D) float array.
    params : {"W": csr_array (E, D), "b": (E,)}, same dtype as ``x``.
    k : int in [1, E], experts per token.
    renormalize : bool, gates renormalized over the K chosen experts (GShard top-2,
        Mixtral) or raw softmax probabilities (Switch, V-MoE).  The op takes any
        combination; the layer's config decides (``MoEConfig(renormalize="auto")``:
        raw for k = 1, renormalized for k >= 2).  With k = 1 and True every gate is 1
        and the backward sends the router no gradient through the gates.
    noise : (N, E) array of x's dtype added to the logits (training only), or None.

    Returns
    -------
    routing : Routing(logits, probs, experts, gates)
    cache : Cache
    """
    check_array("x", x, ndim=2, axes="(N, D)")
    renormalize = check_bool("renormalize", renormalize)
    check_params("params", params, ("W", "b"))
    check_csr("params['W']", params["W"])
    num_experts = params["W"].shape[0]
    k = check_k(k, num_experts)
    logits, lin_cache = sparse_linear.forward(x, params)         # (N, E) transposed view
    logits = np.ascontiguousarray(logits)                        # (N, E)
    if noise is not None:
        check_array("noise", noise, ndim=2, axes="(N, E)")
        if noise.shape != logits.shape:
            raise ValueError(f"noise must have shape {logits.shape} (N, E), got {noise.shape}")
        check_same_dtype("noise", noise, "x", x)
        logits = logits + noise                                  # (N, E)
    probs, sm_cache = softmax.forward(logits, axis=-1)           # (N, E)
    experts = top_k(logits, k)                                   # (N, K)
    picked = np.take_along_axis(probs, experts, axis=1)          # (N, K)
    if renormalize:
        total = picked.sum(axis=1, keepdims=True)                # (N, 1) >= 1/E > 0
        gates = picked / total                                   # (N, K)
    else:
        total = None
        gates = picked                                           # (N, K)
    routing = Routing(logits=logits, probs=probs, experts=experts, gates=gates)
    return routing, Cache(linear=lin_cache, softmax=sm_cache, experts=experts, gates=gates,
                          total=total)


def backward(dgates, cache, dprobs=None, dlogits=None):
    """Gradient of ``sum(gates * dgates) + sum(probs * dprobs) + sum(logits * dlogits)``.

    Parameters
    ----------
    dgates : (N, K) upstream gradient of the gates.
    cache : Cache from :func:`forward`.
    dprobs : (N, E) or None, extra upstream gradient of ``probs`` (auxiliary losses).
    dlogits : (N, E) or None, extra upstream gradient of ``logits`` (z-loss).

    Returns
    -------
    dx : (N, D)
    dparams : {"W": csr_array with W's pattern, "b": (E,)}
    """
    check_cache(cache, Cache)
    check_grad("dgates", dgates, cache.gates.shape, cache.gates.dtype)
    lin_cache, sm_cache, experts, gates, total = cache
    probs = sm_cache.p
    n = probs.shape[0]
    # g = pick / s with s = sum_j pick_j   (quotient rule; s is NOT a constant)
    if total is not None:
        dot = np.sum(dgates * gates, axis=1, keepdims=True)      # (N, 1)
        dpicked = (dgates - dot) / total                         # (N, K)
    else:
        dpicked = dgates                                         # (N, K)
    # pick[n, j] = p[n, top[n, j]]  ->  scatter into the chosen columns
    dp = np.zeros_like(probs) if dprobs is None else np.array(dprobs, dtype=probs.dtype)  # (N, E)
    dp[np.arange(n)[:, None], experts] += dpicked                # (N, E) columns distinct per row
    # p = softmax(logits)
    dlog = softmax.backward(dp, sm_cache)                        # (N, E)
    if dlogits is not None:
        dlog = dlog + dlogits                                    # (N, E)
    # logits = x W^T + b (+ noise, a constant)
    dx, dparams = sparse_linear.backward(dlog, lin_cache)        # (N, D)
    return dx, dparams
