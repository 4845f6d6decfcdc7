"""The auxiliary router losses of one pool over the *global* batch, from reduced sums.

Each rank holds the router outputs of its own n_r tokens (``probs``, ``logits``
(n_r, E)).  Every loss of minivlmoe/moe/aux_losses.py is a function of a few sums over
tokens, so one ``Allreduce`` of those sums gives every rank the single-process value
(same formulas; only the summation order differs)::

    imp_e   = sum_n probs[n, e]                  (E,)  importance, P_e = imp_e / N
    cnt_e   = sum_n assign[n, e]                 (E,)  f_e = cnt_e / (N K)
    zsum    = sum_n lse_n^2                      ()    z_loss = zsum / N
    N       = sum_r n_r                          ()
    per modality group g (shared mode with a modality array; else one group, all):
    imp_ge  = sum_{n in g} probs[n, e]           (E,)  pbar_g = imp_g / N_g
    hsum_g  = sum_{n in g} H(probs[n])           ()    entropy_local_g = hsum_g / N_g
    N_g                                          ()

    load_balance   = E * sum_e f_e P_e
    importance     = var_e(imp) / mean_e(imp)^2
    z_loss         = zsum / N
    entropy_local  = sum_g hsum_g / N_g
    entropy_global = sum_g max(0, tau - H(pbar_g))

One message of ``(2 + groups) E + 2 + 2 groups`` floats per pool.  The gradients
are those of the single-process losses restricted to this rank's rows: every one is a
per-expert vector broadcast over tokens (load balance, importance, entropy_global) or a
per-token term divided by the *global* count (z_loss, entropy_local), so the backward
needs no further message::

    dprobs[n, e]  = dlb * E f_e / N                              load_balance
                  + dimp_e                                       importance
                  - dloc_g (log p[n, e] + 1) / N_g               entropy_local, n in g
                  + dglob_g (log pbar_ge + 1) / N_g  (active)    entropy_global, n in g
    dlogits[n, e] = dz * 2 lse_n softmax(logits)[n, e] / N       z_loss
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..ops import softmax


def _safe_log(p):
    """``log(max(p, tiny))`` (as aux_losses: finite at p = 0, exact for p >= tiny)."""
    return np.log(np.maximum(p, np.finfo(p.dtype).tiny))


class Group(NamedTuple):
    """One modality group's part of the cache: ``idx`` local rows (None = all),
    ``log_probs`` (n_g, E), ``count`` N_g global, ``log_mean`` (E,) of pbar_g,
    ``active`` the entropy_global hinge."""

    idx: np.ndarray | None
    log_probs: np.ndarray
    count: int
    log_mean: np.ndarray
    active: bool


class Cache(NamedTuple):
    """``f`` (E,) assignment fractions; ``imp`` (E,) global importance; ``count`` N;
    ``num_local`` n_r; ``lse`` (n_r,) and ``zsoft`` (n_r, E) for the z-loss;
    ``groups``: list of Group."""

    f: np.ndarray
    imp: np.ndarray
    count: int
    num_local: int
    lse: np.ndarray
    zsoft: np.ndarray
    groups: list


def forward(probs, logits, assign, k, groups, tau, comm):
    """All five losses of a pool on the global batch.

    Parameters
    ----------
    probs, logits : (n_r, E) this rank's router probabilities and logits.
    assign : (n_r, E) 0/1 top-k indicator (before capacity).
    k : int, experts per token.
    groups : list of local row arrays, one per modality group, or ``[None]``.
    tau : float, the entropy_global threshold.
    comm : parallel.comm.Comm.

    Returns
    -------
    losses : dict name -> float (``aux_losses.AUX_LOSSES``), equal on every rank.
    cache : Cache
    """
    n_loc, e = probs.shape
    dtype = probs.dtype
    lse = softmax.logsumexp(logits, axis=1)                      # (n_r,)
    zsoft, _ = softmax.forward(logits, axis=1)                   # (n_r, E)
    log_probs = _safe_log(probs)                                 # (n_r, E)
    h = -(probs * log_probs).sum(axis=1)                         # (n_r,) entropy per token
    parts = [probs.sum(axis=0), assign.sum(axis=0, dtype=np.float64),
             [float(np.sum(lse * lse)), n_loc]]
    for idx in groups:
        rows = slice(None) if idx is None else idx
        parts += [probs[rows].sum(axis=0), [float(h[rows].sum()), h[rows].shape[0]]]
    local = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])  # (sums,)
    total = comm.allreduce_sum(local, tag="aux")                 # (sums,) global
    imp, cnt = total[:e].astype(dtype), total[e:2 * e]           # (E,), (E,)
    zsum, count = total[2 * e], int(round(total[2 * e + 1]))

    losses = {}
    f = (cnt / (count * k)).astype(dtype)                        # (E,) sums to 1
    losses["load_balance"] = e * float(f @ (imp / count).astype(dtype))
    mean = float(imp.mean())
    losses["importance"] = float(np.mean((imp - mean) ** 2)) / mean**2
    losses["z_loss"] = zsum / count
    losses["entropy_local"] = losses["entropy_global"] = 0.0
    cache_groups, at = [], 2 * e + 2
    for idx in groups:
        imp_g = total[at:at + e].astype(dtype)                   # (E,)
        hsum, n_g = total[at + e], int(round(total[at + e + 1]))
        at += e + 2
        log_mean, active = np.zeros(e, dtype=dtype), False      # (E,)
        if n_g:
            losses["entropy_local"] += hsum / n_g
            pbar = (imp_g / n_g).astype(dtype)                   # (E,)
            log_mean = _safe_log(pbar)                           # (E,)
            gap = tau - (-float(pbar @ log_mean))
            active = bool(gap > 0)                               # at the kink: inactive
            losses["entropy_global"] += gap if active else 0.0
        cache_groups.append(Group(idx=idx, log_probs=log_probs if idx is None else
                                  log_probs[idx], count=n_g, log_mean=log_mean,
                                  active=active))
    return losses, Cache(f=f, imp=imp, count=count, num_local=n_loc, lse=lse, zsoft=zsoft,
                         groups=cache_groups)


def backward(scales, cache):
    """This rank's rows of the gradient of ``sum_name scales[name] * losses[name]``.

    Parameters
    ----------
    scales : dict name -> float (``daux_total * aux_weights[name]``); zero ones skipped.
    cache : Cache from :func:`forward`.

    Returns
    -------
    dprobs : (n_r, E)
    dlogits : (n_r, E) from the z-loss, or None when its scale is 0.
    """
    f, imp, count, n_loc, lse, zsoft, groups = cache
    e = f.shape[0]
    dprobs = np.zeros((n_loc, e), dtype=f.dtype)                 # (n_r, E)
    dlogits = None
    if scales.get("load_balance", 0.0):
        # loss = E sum_e f_e P_e, P_e = imp_e / N  ->  dprobs[n, e] = dloss E f_e / N
        dprobs += (float(scales["load_balance"]) * e * f / count)[None, :]
    if scales.get("importance", 0.0):
        mean = float(imp.mean())
        var = float(np.mean((imp - mean) ** 2))
        # loss = v / m^2 (aux_losses.importance_backward)  ->  dimp_e, same for every n
        dimp = float(scales["importance"]) * 2.0 * (imp - mean - var / mean) / (e * mean**2)
        dprobs += dimp[None, :]                                  # (n_r, E)
    if scales.get("z_loss", 0.0):
        # loss = (1/N) sum_n lse_n^2  ->  dlogits = dloss 2 lse_n softmax / N
        dlse = float(scales["z_loss"]) * 2.0 * lse / count       # (n_r,)
        dlogits = (dlse[:, None] * zsoft).astype(f.dtype, copy=False)  # (n_r, E)
    for g in groups:
        rows = slice(None) if g.idx is None else g.idx
        if scales.get("entropy_local", 0.0) and g.count:
            # loss_g = (1/N_g) sum_n H_n  ->  dp = -(dloss / N_g) (log p + 1)
            dh = float(scales["entropy_local"]) / g.count
            dprobs[rows] += -dh * (g.log_probs + 1.0)            # (n_g, E)
        if scales.get("entropy_global", 0.0) and g.active:
            # loss_g = tau - H(pbar_g)  ->  dpbar = dloss (log pbar + 1), dp = dpbar / N_g
            dpbar = float(scales["entropy_global"]) * (g.log_mean + 1.0)  # (E,)
            dprobs[rows] += (dpbar / g.count)[None, :]           # (n_g, E)
    return dprobs, dlogits
