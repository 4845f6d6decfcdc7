"""Low-rank compression of a trained model: each chosen weight replaced by its truncated SVD.

:func:`lowrank_params` turns every chosen linear layer ``{"W" (out, in), "b"}`` of a
parameter tree into ``{"A" (r, in), "B" (out, r), "b"}`` with ``B A`` the best rank-r
approximation of ``W`` (Eckart-Young; the factor split ``A = sqrt(S) V^T``,
``B = U sqrt(S)`` is explained in minivlmoe/ops/lowrank_linear.py), and returns the
model config that records the ranks (``ModelConfig.lowrank``), so that ``model.init``
and checkpoint loading rebuild the factored structure.  The factored layers train with
their own backward (two sparse_linear products) like any other layer.

Which weights (:func:`eligible_paths`)
--------------------------------------
The attention projections ``q, k, v, o`` and both weights ``fc1, fc2`` of every FFN,
dense or expert: they hold almost all of the parameters and the multiply-adds of a
token (the default preset: 245,760 of its 268,032 stored weight entries; 131,072 of
152,832 in dense mode).  Left as they are:

* the MoE routers (E x D, a few hundred entries: ``r (D + E) >= D E`` for any useful
  rank, and a low-rank router would blur the expert choice itself);
* the patch embedding (D x 192) and the heads ``img_proj``, ``txt_proj`` (De x D) and
  ``lm_head`` (V x D): small, and the model's interfaces to pixels, the embedding space
  and the vocabulary, where the first and last errors are not corrected by any layer;
* biases, layer norms, embedding tables and the logit scale (vectors or lookups).

Rank
----
``rank=R``: the same rank for every chosen weight, clipped to each weight's
``min(in, out)`` (its full rank); ``R`` must be in ``[1, max min(in, out)]`` over the
chosen weights (beyond it no weight would take the rank; a ValueError says so).
``energy=e``: per layer the smallest rank whose singular values keep
``sum_{i<r} s_i^2 >= e sum_i s_i^2`` (the fraction of the squared Frobenius norm).
A layer is factored even when ``r (in + out) >= in out`` (it then saves nothing; the
report's ``saves`` says so).

Report (one dict per factored layer)
------------------------------------
``name`` (dotted path), ``shape`` [out, in], ``rank``, ``params_before`` (stored entries
of W, ``in * out`` when dense), ``params_after`` ``r (in + out)``, ``flops_before``
``2 nnz(W)`` and ``flops_after`` ``2 r (in + out)`` per token (a multiply-add is 2
FLOPs; biases excluded, unchanged), ``energy`` (kept fraction of ``sum s^2``),
``spectral_error`` ``s_{r+1} / s_1`` (the relative spectral-norm error, Eckart-Young)
and ``saves`` (params_after < params_before).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..model_config import check_config
from ..ops import lowrank_linear
from .._checks import check_float, check_int

ATTENTION = ("q", "k", "v", "o")
FFN = ("fc1", "fc2")


def _layers(tree, prefix=""):
    """``(path, params)`` of every linear layer ``{"W", "b"}`` in the tree, in order."""
    if isinstance(tree, dict):
        if "W" in tree and "b" in tree:
            yield prefix, tree
            return
        for key, child in tree.items():
            yield from _layers(child, f"{prefix}.{key}" if prefix else str(key))


def _chosen(path):
    """An attention projection or an FFN (dense or expert) weight (module docstring)."""
    parts = path.split(".")
    if parts[0] != "blocks" or len(parts) < 3:
        return False
    return (parts[-2] == "attn" and parts[-1] in ATTENTION) or parts[-1] in FFN


def eligible_paths(params):
    """The dotted paths of the unfactored layers :func:`lowrank_params` factors."""
    return [path for path, _ in _layers(params) if _chosen(path)]


def energy_rank(s, energy):
    """The smallest r >= 1 with ``sum(s[:r]**2) >= energy * sum(s**2)`` (s decreasing)."""
    sq = np.asarray(s, dtype=np.float64) ** 2                    # squared, decreasing
    total = sq.sum()
    if total == 0.0:
        return 1
    kept = np.cumsum(sq) / total                                 # kept fractions, rising
    # a 1e-12 slack so that energy=1.0 is reached despite the cumsum's rounding
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(sq)))


def check_arguments(params, model_cfg, *, rank=None, energy=None):
    """``(rank, energy)`` of :func:`lowrank_params`, validated against ``params`` without
    factoring anything; ValueError / TypeError naming the bad one."""
    check_config(model_cfg)
    if (rank is None) == (energy is None):
        raise ValueError(f"exactly one of rank and energy must be given, got rank={rank!r}, "
                         f"energy={energy!r}")
    paths = eligible_paths(params)
    if not paths:
        raise ValueError("params have no unfactored attention or FFN weight to factor "
                         f"(already factored: {len(model_cfg.lowrank)} layer(s))")
    if rank is not None:
        layers = dict(_layers(params))
        top = max(min(layers[path]["W"].shape) for path in paths)
        rank = check_int(f"rank (at most the largest min(in, out) of the factored "
                         f"weights, {top})", rank, 1, top)
    else:
        energy = check_float("energy", energy, 0.0, 1.0, low_open=True)
    return rank, energy


def lowrank_params(params, model_cfg, *, rank=None, energy=None):
    """Factor every chosen weight of ``params`` by truncated SVD.

    Parameters
    ----------
    params : the model's parameter tree (minivlmoe.model.init / a checkpoint); not modified.
    model_cfg : its ModelConfig.
    rank : int in [1, max min(in, out)], the rank of every chosen weight (clipped to
        each weight's min(in, out)); or
    energy : float in (0, 1], the per-layer rank keeping that fraction of sum s^2.
        Exactly one of the two.

    Returns
    -------
    new_params : the tree with ``{"A", "B", "b"}`` at the factored paths (every other
        leaf shared with ``params``).
    new_model_cfg : ``model_cfg`` with ``lowrank`` extended by ``{path: rank}``.
    report : list of per-layer dicts (module docstring).
    """
    rank, energy = check_arguments(params, model_cfg, rank=rank, energy=energy)
    layers = dict(_layers(params))
    paths = eligible_paths(params)
    ranks, report = {}, []
    for path in paths:
        W = layers[path]["W"]
        d_out, d_in = W.shape
        top = min(d_in, d_out)
        s = lowrank_linear.singular_values(W)                    # decreasing, min(in, out) of them
        if rank is not None:
            r = min(rank, top)                                   # clipped to full rank
        else:
            r = energy_rank(s, energy)
        ranks[path] = r
        total = float(np.sum(s ** 2))
        report.append({
            "name": path, "shape": [d_out, d_in], "rank": r,
            "params_before": int(W.nnz), "params_after": r * (d_in + d_out),
            "flops_before": 2 * int(W.nnz), "flops_after": 2 * r * (d_in + d_out),
            "energy": float(np.sum(s[:r] ** 2)) / total if total else 1.0,
            "spectral_error": float(s[r] / s[0]) if r < top and s[0] > 0 else 0.0,
            "saves": r * (d_in + d_out) < int(W.nnz)})
    new_params = lowrank_linear.factor_tree(params, ranks)
    new_cfg = dataclasses.replace(model_cfg, lowrank={**model_cfg.lowrank, **ranks})
    return new_params, new_cfg, report


def totals(report):
    """Sums of a report's ``params_*`` and ``flops_*`` and their after/before ratios."""
    out = {key: sum(row[key] for row in report)
           for key in ("params_before", "params_after", "flops_before", "flops_after")}
    out["params_ratio"] = out["params_after"] / max(1, out["params_before"])
    out["flops_ratio"] = out["flops_after"] / max(1, out["flops_before"])
    return out


def format_report(report):
    """The report as a text table, one line per layer and a total line."""
    lines = [f"{'layer':<34} {'shape':>9} {'rank':>4} {'params':>15} {'FLOPs/token':>15} "
             f"{'energy':>6}"]
    for row in report:
        shape = "x".join(map(str, row["shape"]))
        lines.append(f"{row['name']:<34} {shape:>9} {row['rank']:>4} "
                     f"{row['params_before']:>7}>{row['params_after']:<7} "
                     f"{row['flops_before']:>7}>{row['flops_after']:<7} {row['energy']:>6.3f}")
    t = totals(report)
    lines.append(f"{'total':<34} {'':>9} {'':>4} {t['params_before']:>7}>{t['params_after']:<7} "
                 f"{t['flops_before']:>7}>{t['flops_after']:<7} "
                 f"(x{t['params_ratio']:.3f} params)")
    return "\n".join(lines)
