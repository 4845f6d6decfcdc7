"""Cross-entropy over a vocabulary, with an ignore index for padding.

Math
----
For logits ``z`` (..., V) flattened to (N, V), integer targets ``t`` (N,) and the set
``K = {n : t_n != ignore_index}`` of kept positions with ``count = |K|``::

    lse_n  = log sum_v exp(z[n, v])                 (stable: softmax.logsumexp)
    nll_n  = lse_n - z[n, t_n]                      = -log softmax(z[n])[t_n]
    loss   = (1 / count) sum_{n in K} nll_n         (0.0 when count == 0)

Backward (derived in docs/ops/cross_entropy.md), fused softmax + cross-entropy::

    dz[n] = dloss * (softmax(z[n]) - onehot(t_n)) / count    for n in K
    dz[n] = 0                                                  for n not in K

The mean is over kept positions only, so padding changes neither the loss nor the
scale of the gradient.  If every position is ignored, the loss is 0.0 and every
gradient entry is 0 (no 0/0).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._checks import check_array, check_cache, check_grad, check_int
from .softmax import logsumexp


class Cache(NamedTuple):
    """What the fused backward needs.

    Fields
    ------
    probs : (N, V) softmax of the logits (the fused gradient is ``probs - onehot``).
    targets : (N,) int targets with ignored positions replaced by 0 (safe to index).
    keep : (N,) bool, True where the target is not ``ignore_index``.
    count : int, number of kept positions (the divisor of the mean).
    shape : tuple, the logits' shape (..., V), to restore ``dlogits``.
    """

    probs: np.ndarray
    targets: np.ndarray
    keep: np.ndarray
    count: int
    shape: tuple


def forward(logits, targets, ignore_index=-100):
    """Mean cross-entropy of ``targets`` under ``softmax(logits)``.

    Parameters
    ----------
    logits : (..., V) float32/float64, finite.
    targets : (...) integer array, each in [0, V) or equal to ``ignore_index``.
    ignore_index : int, target value that marks a position to skip (padding).

    Returns
    -------
    loss : float, mean over non-ignored positions (0.0 if there are none).
    cache : Cache
    """
    check_array("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {logits.shape}")
    check_array("targets", targets, dtype_kind="i")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {logits.shape[:-1]} (the logits' leading "
                         f"axes), got {targets.shape}")
    ignore_index = check_int("ignore_index", ignore_index)
    n_vocab = logits.shape[-1]
    keep = targets != ignore_index                               # (...)
    bad = keep & ((targets < 0) | (targets >= n_vocab))          # (...)
    if bad.any():
        where = tuple(int(i) for i in np.unravel_index(np.flatnonzero(bad)[0], bad.shape))
        raise ValueError(f"targets must be in [0, V={n_vocab}) or equal ignore_index="
                         f"{ignore_index}, got {int(targets[where])} at index {where}")
    z = logits.reshape(-1, n_vocab)                              # (N, V)  '... v -> (...) v'
    keep = keep.reshape(-1)                                      # (N,)
    t = np.where(keep, targets.reshape(-1), 0)                   # (N,) ignored -> 0
    rows = np.arange(z.shape[0])                                 # (N,)
    lse = logsumexp(z, axis=-1)                                  # (N,)
    nll = lse - z[rows, t]                                       # (N,)
    count = int(keep.sum())
    loss = float(np.sum(nll[keep], dtype=np.float64)) / count if count else 0.0
    probs = np.exp(z - lse[:, None])                             # (N, V) softmax, rows sum to 1
    return loss, Cache(probs=probs, targets=t, keep=keep, count=count, shape=logits.shape)


def backward(dloss, cache):
    """Fused softmax + cross-entropy backward.

    Parameters
    ----------
    dloss : float, upstream gradient of the scalar loss (1.0 when it is the final loss).
    cache : Cache from :func:`forward`.

    Returns
    -------
    dlogits : shape and dtype of ``logits``; exactly 0 on ignored positions.
    """
    check_cache(cache, Cache)
    check_grad("dloss", dloss, ())
    probs, t, keep, count, shape = cache
    rows = np.arange(probs.shape[0])                             # (N,)
    # loss = sum_{n in K} nll_n / count  ->  dnll_n = dloss / count on kept rows, else 0
    dnll = np.where(keep, float(dloss) / max(count, 1), 0.0)     # (N,)
    dnll = dnll.astype(probs.dtype, copy=False)                  # (N,)
    # nll_n = lse_n - z[n, t_n]  ->  dz = dnll * (softmax(z) - onehot(t))
    dz = probs * dnll[:, None]                                   # (N, V)
    dz[rows, t] -= dnll                                          # (N, V) only kept rows move
    return dz.reshape(shape)                                     # (..., V)
