"""Symmetric image-text contrastive loss (InfoNCE, as in CLIP and LIMoE).

Math
----
For a batch of B image embeddings ``img`` (B, D), B caption embeddings ``txt`` (B, D)
(usually already L2-normalized by the caller: this op does not normalize) and a
learnable log logit scale ``log_logit_scale`` (a 0-d array; CLIP's ``logit_scale``)::

    s      = exp(log_logit_scale)               the logit scale = 1 / temperature
    sim    = img @ txt.T                        (B, B) cosine similarities if normalized
    logits = s * sim                            (B, B) row i: image i against every caption

Each row is a classification of image i over the B captions, each column one of
caption j over the B images.  The targets are distributions over those candidates:
with a (B, B) bool matrix ``positives`` whose diagonal is True (image i and caption
i are a pair),::

    Qr[i, j] = positives[i, j] / sum_j' positives[i, j']     rows sum to 1
    Qc[i, j] = positives[i, j] / sum_i' positives[i', j]     columns sum to 1

    loss_i2t = (1/B) sum_i ( logsumexp_j logits[i, j] - sum_j Qr[i, j] logits[i, j] )
    loss_t2i = (1/B) sum_j ( logsumexp_i logits[i, j] - sum_i Qc[i, j] logits[i, j] )
    loss     = (loss_i2t + loss_t2i) / 2

``positives=None`` means the identity (one positive per row and column: classic
InfoNCE).  When a batch holds duplicate captions, the classic loss treats the copy
``k`` of caption ``i`` as a negative of image ``i``: it pulls ``txt[i]`` toward
``img[i]`` and pushes ``txt[k]`` away.  Marking every equal pair as positive (see
:func:`duplicate_positives`) makes the target uniform over the copies, so the copies
are treated alike.  (When the copies have exactly equal embeddings the two losses are
equal, and so are the summed gradients of the copies; only the split between the
copies differs, which matters once they are embedded differently, e.g. with dropout.)

Backward (derived in docs/ops/contrastive.md), with ``Pr`` / ``Pc`` the row / column
softmax of ``logits``::

    dlogits  = dloss / (2B) * ((Pr - Qr) + (Pc - Qc))        (B, B)
    dsim     = s * dlogits
    dimg     = dsim @ txt,   dtxt = dsim.T @ img
    dlog_logit_scale = s * sum(dlogits * sim)                 (chain through s = exp)

No clamp is applied to ``log_logit_scale`` inside the op (CLIP clamps the logit scale
at 100 in its optimizer step); clamping is the trainer's choice.  Initialize it with
:data:`LOG_LOGIT_SCALE_INIT`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._checks import check_array, check_cache, check_grad, check_same_dtype
from .softmax import logsumexp

LOG_LOGIT_SCALE_INIT = float(np.log(1.0 / 0.07))  # CLIP's initial temperature 0.07: s = 14.29


def duplicate_positives(keys):
    """Mark pairs with equal keys: ``positives[i, j] = keys[i] == keys[j]``.

    Parameters
    ----------
    keys : 1-D array-like of length B (caption ids, hashes, strings, ...).

    Returns
    -------
    positives : (B, B) bool, symmetric, with a True diagonal.
    """
    keys = np.asarray(keys)
    if keys.ndim != 1:
        raise ValueError(f"keys must have 1 dimension (B,), got shape {keys.shape}")
    positives = keys[:, None] == keys[None, :]                   # (B, B)
    if not np.all(np.diagonal(positives)):
        raise ValueError("keys must each equal themselves (no NaN), got a key that does not")
    return positives


class Cache(NamedTuple):
    """What backward needs.

    Fields
    ------
    img, txt : (B, D) the inputs (references, not copies).
    sim : (B, B) ``img @ txt.T``; the gradient of ``log_logit_scale`` needs it.
    logit_scale : () ``exp(log_logit_scale)``, the inverse temperature.
    dlogits_unit : (B, B) ``((Pr - Qr) + (Pc - Qc)) / (2B)``, the gradient of the loss
        with respect to the logits for ``dloss = 1``; everything else is a product.
    """

    img: np.ndarray
    txt: np.ndarray
    sim: np.ndarray
    logit_scale: np.ndarray
    dlogits_unit: np.ndarray


def _check_inputs(img, txt, log_logit_scale, positives):
    check_array("img", img, ndim=2, axes="(B, D)")
    check_array("txt", txt, ndim=2, axes="(B, D)")
    if txt.shape != img.shape:
        raise ValueError(f"txt must have the shape of img (B, D) = {img.shape}, got {txt.shape}")
    if img.shape[0] < 1:
        raise ValueError(f"img must hold at least one pair (B >= 1), got shape {img.shape}")
    check_same_dtype("txt", txt, "img", img)
    if isinstance(log_logit_scale, np.floating):                 # e.g. the result of ls - 1.0
        log_logit_scale = np.asarray(log_logit_scale)
    check_array("log_logit_scale", log_logit_scale, ndim=0, axes="()")
    check_same_dtype("log_logit_scale", log_logit_scale, "img", img)
    limit = float(np.log(np.finfo(img.dtype).max))
    if log_logit_scale > limit:
        raise ValueError(f"log_logit_scale must be at most log(max {img.dtype}) = {limit:.2f} "
                         f"so that exp(log_logit_scale) is finite, got {float(log_logit_scale)}")
    n = img.shape[0]
    if positives is None:
        return log_logit_scale, np.eye(n, dtype=bool)            # (B, B)
    check_array("positives", positives, ndim=2, axes="(B, B)", dtype_kind="b")
    if positives.shape != (n, n):
        raise ValueError(f"positives must have shape (B, B) = ({n}, {n}), got {positives.shape}")
    if not np.all(np.diagonal(positives)):
        missing = int(np.flatnonzero(~np.diagonal(positives))[0])
        raise ValueError(f"positives must have a True diagonal (pair i is its own positive), "
                         f"got False at ({missing}, {missing})")
    return log_logit_scale, positives


def forward(img, txt, log_logit_scale, positives=None):
    """Symmetric InfoNCE loss of paired image and caption embeddings.

    Parameters
    ----------
    img : (B, D) float32/float64 image embeddings (normalized by the caller).
    txt : (B, D) caption embeddings, same dtype.
    log_logit_scale : () array (or NumPy float scalar), same dtype; the logits are
        scaled by ``exp(log_logit_scale)``, the inverse temperature.
    positives : (B, B) bool with a True diagonal, or None for the identity.

    Returns
    -------
    loss : float, ``(loss_i2t + loss_t2i) / 2``.
    cache : Cache
    """
    log_logit_scale, positives = _check_inputs(img, txt, log_logit_scale, positives)
    n = img.shape[0]
    dtype = img.dtype
    pos = positives.astype(dtype)                                # (B, B) 0/1
    q_row = pos / pos.sum(axis=1, keepdims=True)                 # (B, B) rows sum to 1
    q_col = pos / pos.sum(axis=0, keepdims=True)                 # (B, B) columns sum to 1
    scale = np.exp(log_logit_scale)                              # ()
    sim = img @ txt.T                                            # (B, B)
    logits = scale * sim                                         # (B, B)
    lse_row = logsumexp(logits, axis=1, keepdims=True)           # (B, 1) image -> text
    lse_col = logsumexp(logits, axis=0, keepdims=True)           # (1, B) text -> image
    ce_row = lse_row[:, 0] - np.sum(q_row * logits, axis=1)      # (B,) CE of image i
    ce_col = lse_col[0, :] - np.sum(q_col * logits, axis=0)      # (B,) CE of caption j
    loss = 0.5 * (float(ce_row.sum()) + float(ce_col.sum())) / n  # () a Python float
    p_row = np.exp(logits - lse_row)                             # (B, B) row softmax
    p_col = np.exp(logits - lse_col)                             # (B, B) column softmax
    dlogits_unit = ((p_row - q_row) + (p_col - q_col)) / (2 * n)  # (B, B)
    return loss, Cache(img=img, txt=txt, sim=sim, logit_scale=scale,
                       dlogits_unit=dlogits_unit)


def backward(dloss, cache):
    """Gradients of the symmetric InfoNCE loss.

    Parameters
    ----------
    dloss : float, upstream gradient of the scalar loss.
    cache : Cache from :func:`forward`.

    Returns
    -------
    dimg : (B, D)
    dtxt : (B, D)
    dlog_logit_scale : () array
    """
    check_cache(cache, Cache)
    check_grad("dloss", dloss, ())
    img, txt, sim, scale, dlogits_unit = cache
    dtype = img.dtype
    dlogits = float(dloss) * dlogits_unit                        # (B, B)
    # logits = scale * sim
    dsim = scale * dlogits                                       # (B, B)
    dscale = np.sum(dlogits * sim)                               # ()
    # sim = img @ txt.T
    dimg = dsim @ txt                                            # (B, D)
    dtxt = dsim.T @ img                                          # (B, D)
    # scale = exp(log_logit_scale)  ->  d log_logit_scale = dscale * scale
    dlog_logit_scale = np.asarray(dscale * scale, dtype=dtype)   # ()
    return dimg.astype(dtype, copy=False), dtxt.astype(dtype, copy=False), dlog_logit_scale
