"""Auxiliary router losses: Switch load balancing, V-MoE importance, ST-MoE z-loss and
LIMoE's local and global entropy losses.

Each loss is a scalar function of the router's outputs for N tokens and E experts,
added (times a small coefficient chosen by the caller) to the task loss so that the
router spreads tokens over the experts (load balance, importance, global entropy),
keeps its logits small (z-loss) or makes confident choices (local entropy).

Math (derived step by step in docs/moe/aux_losses.md)
-----------------------------------------------------
``probs`` (N, E) are router probabilities (usually a softmax over experts, but every
loss below is defined, and differentiated, for any non-negative array), ``logits``
(N, E) the router logits, ``assign`` (N, E) the 0/1 indicator of each token's top-k
experts *before* capacity dropping (:func:`top_k_indicator` of ``router.top_k``)::

    load_balance   = E * sum_e f_e P_e,   f_e = sum_n assign[n, e] / (N k),
                                          P_e = mean_n probs[n, e]          (Switch)
    importance     = var(imp) / mean(imp)^2,   imp_e = sum_n probs[n, e]     (V-MoE)
    z_loss         = mean_n (logsumexp_e logits[n, e])^2                     (ST-MoE)
    entropy_local  = mean_n H(probs[n]),   H(p) = -sum_e p_e log p_e         (LIMoE)
    entropy_global = max(0, tau - H(mean_n probs[n])),  tau = log(min_experts) (LIMoE)

Normalizations (libraries disagree, so they are stated and tested):

* load_balance divides the assignment counts by N*k, so ``f`` sums to 1 and the loss
  is exactly 1 at perfectly uniform routing for every k (and E at total collapse onto
  one expert with one-hot probs).  Dividing by N only (as some libraries do) gives k
  at uniform routing.  ``f`` is a count: it has no gradient and backward treats it as
  a constant, which is correct, not an approximation.
* importance uses the population variance (divide by E), i.e. the squared
  coefficient of variation CV^2 = (std / mean)^2 with ``std`` computed with ddof=0.
* z_loss and entropy_local average over tokens (not sum).

Every loss returns 0.0 and backward returns an all-zero (0, E) gradient when N = 0 (a
modality absent from the batch): no NaN from a mean over zero tokens.

0 log 0
-------
The entropies use ``log(max(p, tiny))`` with ``tiny = numpy.finfo(dtype).tiny`` (the
smallest normal float).  At an exact zero, ``p log(max(p, tiny)) = 0 * finite = 0``, so
the forward value is the exact limit 0 log 0 = 0, and the gradient ``-(log p + 1)``,
whose true value at p = 0 is +inf, is replaced by the finite ``-(log tiny + 1)``
(about 707 in float64, 86 in float32).  Chained through a softmax, this entry is
multiplied by p = 0 and contributes nothing; for every p >= tiny the gradient is exact.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..ops import softmax
from .._checks import check_array, check_cache, check_float, check_grad, check_int

AUX_LOSSES = ("load_balance", "importance", "z_loss", "entropy_local", "entropy_global")


# ----------------------------------------------------------------------------------------
# validation


def _check_router_array(name, a):
    """An (N, E) float array with E >= 1 (N may be 0). Returns (N, E)."""
    check_array(name, a, ndim=2, axes="(N, E)")
    if a.shape[1] < 1:
        raise ValueError(f"{name} must have at least one expert column (N, E >= 1), "
                         f"got shape {a.shape}")
    return a.shape


def _check_probs(name, probs):
    """Router probabilities: finite, non-negative, shape (N, E) with E >= 1."""
    shape = _check_router_array(name, probs)
    if probs.size and probs.min() < 0:
        raise ValueError(f"{name} must be non-negative (router probabilities), "
                         f"got minimum {float(probs.min())!r}")
    return shape


def _safe_log(p):
    """``log(max(p, tiny))``: equal to log p for p >= tiny, finite at p = 0 (module docstring)."""
    return np.log(np.maximum(p, np.finfo(p.dtype).tiny))


# ----------------------------------------------------------------------------------------
# Switch Transformer load balancing


def top_k_indicator(experts, num_experts, dtype=np.float64):
    """The ``assign`` of :func:`load_balance_forward`: 0/1 (N, E) with a 1 at each
    token's chosen experts.

    Parameters
    ----------
    experts : (N, K) int, distinct experts per row (the router's choice, ``router.top_k``).
    num_experts : int E >= 1.
    dtype : the dtype of the indicator (that of ``probs``).
    """
    check_array("experts", experts, ndim=2, axes="(N, K)", dtype_kind="i")
    num_experts = check_int("num_experts", num_experts, 1)
    if experts.size and not (0 <= experts.min() and experts.max() < num_experts):
        raise ValueError(f"experts must be in [0, num_experts={num_experts}), got values "
                         f"in [{experts.min()}, {experts.max()}]")
    n = experts.shape[0]
    assign = np.zeros((n, num_experts), dtype=dtype)             # (N, E)
    assign[np.arange(n)[:, None], experts] = 1                   # (N, K) entries set
    return assign


class LoadBalanceCache(NamedTuple):
    """``f`` (E,): fraction of the N*k top-k assignments that went to each expert, in
    the dtype of ``probs`` (a count, constant for the gradient); ``num_tokens``: N."""

    f: np.ndarray
    num_tokens: int


def load_balance_forward(probs, assign, k=1):
    """Switch Transformer load-balancing loss ``E * sum_e f_e P_e``.

    Parameters
    ----------
    probs : (N, E) float, router probabilities (the gradient flows into them).
    assign : (N, E) bool, integer or float array of 0/1: the indicator of each token's
        top-k experts before capacity dropping; every row holds exactly ``k`` ones.
    k : int in [1, E], experts per token.

    Returns
    -------
    loss : float, 1.0 at perfectly uniform routing for every k; 0.0 when N = 0.
    cache : LoadBalanceCache (fields ``f``, ``num_tokens``).
    """
    n_tokens, n_experts = _check_probs("probs", probs)
    check_array("assign", assign, ndim=2, axes="(N, E)", dtype_kind=None)
    if assign.dtype.kind not in "biuf":
        raise TypeError(f"assign must have a bool, integer or float dtype, got {assign.dtype}")
    if assign.shape != probs.shape:
        raise ValueError(f"assign must have the shape of probs {probs.shape} (N, E), "
                         f"got {assign.shape}")
    k = check_int("k", k, 1, n_experts)
    if not np.all((assign == 0) | (assign == 1)):
        raise ValueError("assign must contain only 0 and 1 (top-k indicator), "
                         f"got values {np.unique(assign)[:6].tolist()}")
    row_sums = assign.sum(axis=1, dtype=np.float64)              # (N,) choices per token
    if n_tokens and not np.all(row_sums == k):
        raise ValueError(f"assign must have exactly k={k} ones per row (top-k indicator), "
                         f"got row sums in [{row_sums.min()}, {row_sums.max()}]")
    if n_tokens == 0:
        return 0.0, LoadBalanceCache(f=np.zeros(n_experts, dtype=probs.dtype), num_tokens=0)
    counts = assign.sum(axis=0, dtype=np.float64)                # (E,) tokens per expert
    f = (counts / (n_tokens * k)).astype(probs.dtype)            # (E,) sums to 1
    P = probs.mean(axis=0)                                       # (E,)
    loss = n_experts * float(f @ P)
    return loss, LoadBalanceCache(f=f, num_tokens=n_tokens)


def load_balance_backward(dloss, cache):
    """``dprobs[n, e] = dloss * E * f_e / N``; returns dprobs (N, E)."""
    check_cache(cache, LoadBalanceCache)
    check_grad("dloss", dloss, ())
    f, n_tokens = cache
    n_experts = f.shape[0]
    # loss = E * sum_e f_e P_e            ->  dP_e = dloss * E * f_e
    dP = float(dloss) * n_experts * f                            # (E,)
    # P_e = (1/N) sum_n probs[n, e]       ->  dprobs[n, e] = dP_e / N  (N = 0: (0, E))
    dprobs = np.repeat((dP / max(n_tokens, 1))[None, :], n_tokens, axis=0)  # (N, E)
    return dprobs.astype(f.dtype, copy=False)


# ----------------------------------------------------------------------------------------
# V-MoE importance loss


class ImportanceCache(NamedTuple):
    """``imp`` (E,): importance ``sum_n probs[n, e]``; ``num_tokens``: N (the
    gradient is the same for every token, so ``probs`` itself is not kept)."""

    imp: np.ndarray
    num_tokens: int


def importance_forward(probs):
    """V-MoE importance loss: the squared coefficient of variation of ``imp``.

    Parameters
    ----------
    probs : (N, E) float, router probabilities; for N >= 1 their sum must be > 0.

    Returns
    -------
    loss : float, ``var(imp) / mean(imp)^2`` with the population variance
        (ddof=0); 0 when every expert has the same importance, E - 1 when one
        expert takes all of it; 0.0 when N = 0.
    cache : ImportanceCache (fields ``imp``, ``num_tokens``).
    """
    n_tokens, n_experts = _check_probs("probs", probs)
    imp = probs.sum(axis=0)                                      # (E,)
    if n_tokens == 0:
        return 0.0, ImportanceCache(imp=imp, num_tokens=0)
    mean = float(imp.mean())
    if not mean > 0:
        raise ValueError("probs must have a positive sum (the importance loss divides by "
                         f"the mean importance), got sum {float(probs.sum())!r}")
    var = float(np.mean((imp - mean) ** 2))
    return var / mean**2, ImportanceCache(imp=imp, num_tokens=n_tokens)


def importance_backward(dloss, cache):
    """``dprobs[n, e] = dloss * 2 (imp_e - m - v / m) / (E m^2)`` for every n;
    returns dprobs (N, E).  Derivation: docs/moe/aux_losses.md."""
    check_cache(cache, ImportanceCache)
    check_grad("dloss", dloss, ())
    imp, n_tokens = cache
    n_experts = imp.shape[0]
    if n_tokens == 0:
        return np.zeros((0, n_experts), dtype=imp.dtype)
    mean = float(imp.mean())
    var = float(np.mean((imp - mean) ** 2))
    # loss = v / m^2, v = mean_e (imp_e - m)^2, m = mean_e imp_e  (fused, see the docs)
    dimp = float(dloss) * 2.0 * (imp - mean - var / mean) / (n_experts * mean**2)  # (E,)
    # imp_e = sum_n probs[n, e]           ->  dprobs[n, e] = dimp_e
    dprobs = np.repeat(dimp[None, :], n_tokens, axis=0)          # (N, E)
    return dprobs.astype(imp.dtype, copy=False)


# ----------------------------------------------------------------------------------------
# ST-MoE router z-loss


class ZLossCache(NamedTuple):
    """``softmax`` (N, E): softmax of the logits (d logsumexp / d logits);
    ``lse`` (N,): logsumexp of each row."""

    softmax: np.ndarray
    lse: np.ndarray


def z_loss_forward(logits):
    """ST-MoE router z-loss ``mean_n (logsumexp_e logits[n, e])^2``.

    Parameters
    ----------
    logits : (N, E) float, router logits (before any noise or softmax).

    Returns
    -------
    loss : float, (log E)^2 at zero logits; 0.0 when N = 0.  Not shift invariant:
        adding c to every logit adds c to each logsumexp.
    cache : ZLossCache (fields ``softmax``, ``lse``).
    """
    n_tokens, _ = _check_router_array("logits", logits)
    lse = softmax.logsumexp(logits, axis=1)                      # (N,)
    probs, _ = softmax.forward(logits, axis=1)                   # (N, E) d lse / d logits
    loss = float(np.mean(lse * lse)) if n_tokens else 0.0
    return loss, ZLossCache(softmax=probs, lse=lse)


def z_loss_backward(dloss, cache):
    """``dlogits[n, e] = dloss * 2 lse_n softmax[n, e] / N``; returns dlogits (N, E)."""
    check_cache(cache, ZLossCache)
    check_grad("dloss", dloss, ())
    probs, lse = cache
    n_tokens = lse.shape[0]                                      # N = 0: empty arrays below
    # loss = (1/N) sum_n lse_n^2          ->  dlse_n = dloss * 2 lse_n / N
    dlse = float(dloss) * 2.0 * lse / n_tokens                   # (N,)
    # lse_n = logsumexp_e logits[n, e]    ->  dlogits[n, e] = dlse_n * softmax[n, e]
    dlogits = dlse[:, None] * probs                              # (N, E)
    return dlogits.astype(probs.dtype, copy=False)


# ----------------------------------------------------------------------------------------
# LIMoE local entropy


class EntropyLocalCache(NamedTuple):
    """``log_probs`` (N, E): ``log(max(probs, tiny))``, the only thing the gradient
    ``-(log p + 1) / N`` needs."""

    log_probs: np.ndarray


def entropy_local_forward(probs):
    """LIMoE local entropy loss ``mean_n H(probs[n])`` (minimized: confident routing).

    Parameters
    ----------
    probs : (N, E) float, router probabilities; exact zeros are allowed.

    Returns
    -------
    loss : float, log E for uniform rows, 0 for one-hot rows; 0.0 when N = 0.
    cache : EntropyLocalCache (field ``log_probs``).
    """
    n_tokens, _ = _check_probs("probs", probs)
    log_probs = _safe_log(probs)                                 # (N, E)
    h = -(probs * log_probs).sum(axis=1)                         # (N,) entropy per token
    loss = float(h.mean()) if n_tokens else 0.0
    return loss, EntropyLocalCache(log_probs=log_probs)


def entropy_local_backward(dloss, cache):
    """``dprobs[n, e] = -dloss (log p[n, e] + 1) / N``; returns dprobs (N, E)."""
    check_cache(cache, EntropyLocalCache)
    check_grad("dloss", dloss, ())
    log_probs = cache.log_probs
    n_tokens = log_probs.shape[0]
    if n_tokens == 0:
        return np.zeros_like(log_probs)
    # loss = (1/N) sum_n h_n              ->  dh_n = dloss / N
    dh = float(dloss) / n_tokens
    # h_n = -sum_e p log p                ->  dp = -dh (log p + 1)
    dprobs = -dh * (log_probs + 1.0)                             # (N, E)
    return dprobs.astype(log_probs.dtype, copy=False)


# ----------------------------------------------------------------------------------------
# LIMoE global entropy (thresholded)


def global_threshold(min_experts, num_experts=None):
    """``tau = log(min_experts)``: the hinge of :func:`entropy_global_forward` is
    inactive once the mean routing distribution is at least as spread as a uniform
    distribution over ``min_experts`` experts.

    Parameters
    ----------
    min_experts : int >= 1 (and <= ``num_experts`` when that is given).
    num_experts : int >= 1 or None, E, to validate ``min_experts`` against.
    """
    if num_experts is not None:
        num_experts = check_int("num_experts", num_experts, 1)
    min_experts = check_int("min_experts", min_experts, 1, num_experts)
    return float(np.log(min_experts))


class EntropyGlobalCache(NamedTuple):
    """``log_mean`` (E,): ``log(max(pbar, tiny))`` of the mean distribution ``pbar``;
    ``active``: whether the hinge was active (tau - H > 0); ``num_tokens``: N."""

    log_mean: np.ndarray
    active: bool
    num_tokens: int


def entropy_global_forward(probs, tau):
    """LIMoE global entropy loss ``max(0, tau - H(mean_n probs[n]))``.

    Parameters
    ----------
    probs : (N, E) float, router probabilities; exact zeros are allowed.
    tau : float in [0, log E], usually ``global_threshold(min_experts)``.

    Returns
    -------
    loss : float, ``tau - H(pbar)`` when positive, else 0.0 (also 0.0 when N = 0).
    cache : EntropyGlobalCache (fields ``log_mean``, ``active``, ``num_tokens``).
    """
    n_tokens, n_experts = _check_probs("probs", probs)
    tau = check_float("tau", tau)
    log_e = float(np.log(n_experts))
    if not 0.0 <= tau <= log_e * (1 + 1e-12):
        raise ValueError(f"tau must be in [0, log E = {log_e:.6g}] (E={n_experts}), got {tau}")
    if n_tokens == 0:
        return 0.0, EntropyGlobalCache(log_mean=np.zeros(n_experts, dtype=probs.dtype),
                                       active=False, num_tokens=0)
    pbar = probs.mean(axis=0)                                    # (E,)
    log_mean = _safe_log(pbar)                                   # (E,)
    entropy = -float(pbar @ log_mean)
    gap = tau - entropy
    active = bool(gap > 0)                                       # at the kink: inactive
    return (gap if active else 0.0), EntropyGlobalCache(log_mean=log_mean, active=active,
                                                        num_tokens=n_tokens)


def entropy_global_backward(dloss, cache):
    """``dprobs[n, e] = dloss (log pbar_e + 1) / N`` when the hinge is active, else 0;
    returns dprobs (N, E)."""
    check_cache(cache, EntropyGlobalCache)
    check_grad("dloss", dloss, ())
    log_mean, active, n_tokens = cache
    n_experts = log_mean.shape[0]
    if not active:
        return np.zeros((n_tokens, n_experts), dtype=log_mean.dtype)
    # loss = tau - H                      ->  dH = -dloss
    dH = -float(dloss)
    # H = -sum_e pbar_e log pbar_e        ->  dpbar_e = -dH (log pbar_e + 1)
    dpbar = -dH * (log_mean + 1.0)                               # (E,)
    # pbar_e = (1/N) sum_n probs[n, e]    ->  dprobs[n, e] = dpbar_e / N
    dprobs = np.repeat((dpbar / n_tokens)[None, :], n_tokens, axis=0)  # (N, E)
    return dprobs.astype(log_mean.dtype, copy=False)
