"""The sparse Mixture-of-Experts layer: router -> capacity -> dispatch -> experts -> combine.

Math
----
For tokens ``x`` (N, D) and one pool of E experts (docs/moe/moe_layer.md)::

    routing     = router.forward(x)                 logits, p (N, E); top, g (N, K)
    plan        = capacity + priority -> slots      kept (N, K), M filled slots
    Xs          = Disp^T x                          (M, D)   dispatch
    Ys[block e] = FFN_e(Xs[block e])                (M, D)   experts
    y           = Comb Ys                           (N, D)   combine, Comb = Disp diag(g)

so that ``y[n] = sum_{j kept} g[n, j] FFN_{top[n, j]}(x[n])``.  ``y`` holds only the
expert mixture: the model adds the residual, which is what carries a token whose
assignments were all dropped (its ``y`` row is exactly 0).

Auxiliary losses (minivlmoe/moe/aux_losses.py) are computed from the same ``p`` and
logits the router decided with, per pool, and summed over pools; LIMoE's entropy
losses are computed per modality group inside each pool and summed over the groups.
``aux_total = sum_name aux_weights[name] * losses[name]``.

Backward: the gradient of ``sum(y * dy) + daux_total * aux_total``.  ``x`` feeds two
branches (the router and the dispatch), so ``dx`` is the sum of both::

    dYs, dg   = combine.backward(dy)          dg = 0 for dropped assignments
    dXs, dθ_e = experts.backward(dYs)         experts that got no token: dθ_e = 0
    dx        = Disp dXs                       dispatch backward
    dp, dlog  = sum of the weighted aux-loss backwards
    dx       += router.backward(dg, dp, dlog)  through the gates, the renormalizer,
                                               the softmax and the router weights

Modality-aware routing
----------------------
``mode="shared"`` (LIMoE): one pool; the per-token ``modality`` (0 image, 1 text) is
optional and only splits the statistics and the entropy losses.
``mode="modality"`` (VL-MoE): two pools, ``params["image"]`` and ``params["text"]``,
each with its own router and E experts (VL-MoE's V-MoE and T-MoE experts); image
tokens go only to the image pool, text tokens only to the text pool, and each pool
computes its own capacity from its own token count.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import aux_losses, dispatch, experts, router
from .moe_config import MODALITIES, MoEConfig
from .._checks import (check_array, check_bool, check_cache, check_csr, check_dtype,
                       check_finite_tree, check_grad, check_params, check_same_dtype,
                       checked_inputs, shorten)
from ..tree import zeros_like

def _pool_init(rng, d, hidden, config, density, dtype):
    return {"router": router.init(rng, d, config.num_experts, density, dtype),
            "experts": experts.init(rng, d, hidden, config.num_experts, density, dtype)}


def init(rng, d, hidden, config, density=1.0, dtype=np.float32):
    """Parameters of one MoE layer.

    Parameters
    ----------
    rng : numpy.random.Generator
    d, hidden : int, model width D and expert hidden width F.
    config : MoEConfig
    density : float in (0, 1], stored fraction of every weight row (router and experts).
    dtype : numpy.float32 or numpy.float64.

    Returns
    -------
    params : shared mode ``{"router": {"W": (E, D), "b": (E,)}, "experts": {"e0": ffn
        params, ...}}``; modality mode ``{"image": <a pool>, "text": <a pool>}``.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
    check_dtype("dtype", dtype)
    if config.mode == "shared":
        return _pool_init(rng, d, hidden, config, density, dtype)
    return {name: _pool_init(rng, d, hidden, config, density, dtype) for name in MODALITIES}


class PoolStats(NamedTuple):
    """Routing statistics of one pool.

    Fields
    ------
    capacity : int, X slots per expert.
    routed : (E,) int, assignments per expert before capacity.
    load : (E,) int, tokens each expert processed (after capacity).
    dropped_fraction : float, dropped assignments / all N*K assignments of the pool.
    usage : (2, E) int or None, processed assignments per (modality, expert), row 0
        image, row 1 text; None when no modality array was given.
    """

    capacity: int
    routed: np.ndarray
    load: np.ndarray
    dropped_fraction: float
    usage: np.ndarray | None


class Aux(NamedTuple):
    """Side outputs of :func:`forward`.

    Fields
    ------
    losses : dict name -> float over ``aux_losses.AUX_LOSSES`` (summed over pools,
        and over modality groups for the entropy losses); with ``all_losses=False``
        only the losses of non-zero weight.
    aux_total : float, ``sum_name config.aux_weights[name] * losses[name]``.
    stats : dict pool name ("shared", or "image" and "text") -> PoolStats.
    dropped_fraction : float, dropped assignments / all N*K assignments of the layer.
    """

    losses: dict
    aux_total: float
    stats: dict
    dropped_fraction: float


class PoolCache(NamedTuple):
    """Caches of one pool's stages: ``router``, ``dispatch``, ``experts``, ``combine``;
    ``aux``: dict name -> list of (token index or None, loss cache), one entry per
    modality group for the entropy losses."""

    router: router.Cache
    dispatch: dispatch.DispatchCache
    experts: experts.Cache
    combine: dispatch.CombineCache
    aux: dict


class Cache(NamedTuple):
    """``config``; ``pools``: list of (pool name, token index or None, PoolCache or
    None for a pool that got no token, the pool's params for its zero gradient);
    ``shape``: (N, D) of x; ``dtype``."""

    config: MoEConfig
    pools: list
    shape: tuple
    dtype: np.dtype


def _check_modality(modality, n, config):
    if modality is None:
        if config.mode == "modality":
            raise ValueError("modality must be given (an (N,) int array, 0 image / 1 text) "
                             "when config.mode='modality', got None")
        return None
    check_array("modality", modality, ndim=1, axes="(N,)", dtype_kind="i")
    if modality.shape != (n,):
        raise ValueError(f"modality must have shape ({n},) (N, one id per token), "
                         f"got {modality.shape}")
    bad = (modality != 0) & (modality != 1)
    if bad.any():
        raise ValueError("modality must contain only 0 (image) and 1 (text), got values "
                         f"{np.unique(modality[bad])[:5].tolist()}")
    return modality


def _pool_forward(x, params, config, modality, noise, names):
    """One pool on its own tokens; returns (y, losses, stats, PoolCache).  ``names``:
    the auxiliary losses to compute (every one, or those with a non-zero weight)."""
    n = x.shape[0]
    k, e = config.k, config.num_experts
    routing, r_cache = router.forward(x, params["router"], k, config.renormalize, noise)
    top1 = np.take_along_axis(routing.probs, routing.experts[:, :1], axis=1)[:, 0]  # (N,)
    order = dispatch.priority_order(top1, config.bpr)            # (N,) BPR: raw top-1 prob
    cap = dispatch.capacity(n, e, k, config.capacity_factor)
    plan = dispatch.make_plan(routing.experts, e, cap, order)
    xs, d_cache = dispatch.dispatch_forward(x, plan)             # (M, D)
    ys, e_cache = experts.forward(xs, plan.offsets, params["experts"])  # (M, D)
    y, c_cache = dispatch.combine_forward(ys, routing.gates, plan)      # (N, D)

    # auxiliary losses on the probabilities and logits the router decided with
    probs, logits = routing.probs, routing.logits                # (N, E)
    assign = aux_losses.top_k_indicator(routing.experts, e, probs.dtype)  # (N, E) 0/1
    groups = [None] if modality is None else [np.flatnonzero(modality == m) for m in (0, 1)]
    losses, caches = {}, {}
    if "load_balance" in names:
        losses["load_balance"], c = aux_losses.load_balance_forward(probs, assign, k)
        caches["load_balance"] = [(None, c)]
    if "importance" in names:
        losses["importance"], c = aux_losses.importance_forward(probs)
        caches["importance"] = [(None, c)]
    if "z_loss" in names:
        losses["z_loss"], c = aux_losses.z_loss_forward(logits)
        caches["z_loss"] = [(None, c)]
    for name, fwd, extra in (("entropy_local", aux_losses.entropy_local_forward, ()),
                             ("entropy_global", aux_losses.entropy_global_forward,
                              (config.tau,))):
        if name not in names:
            continue
        losses[name], caches[name] = 0.0, []
        for idx in groups:                                       # per modality group
            value, c = fwd(probs if idx is None else probs[idx], *extra)
            losses[name] += value
            caches[name].append((idx, c))

    usage = None
    if modality is not None:
        usage = np.stack([np.bincount(routing.experts[plan.kept & (modality[:, None] == m)],
                                      minlength=e) for m in (0, 1)])  # (2, E)
    stats = PoolStats(capacity=cap, routed=plan.routed, load=plan.load,
                      dropped_fraction=plan.dropped_fraction, usage=usage)
    return y, losses, stats, PoolCache(router=r_cache, dispatch=d_cache, experts=e_cache,
                                       combine=c_cache, aux=caches)


_AUX_BACKWARD = {"load_balance": aux_losses.load_balance_backward,
                 "importance": aux_losses.importance_backward,
                 "z_loss": aux_losses.z_loss_backward,
                 "entropy_local": aux_losses.entropy_local_backward,
                 "entropy_global": aux_losses.entropy_global_backward}


def _pool_backward(dy, cache, config, daux_total):
    """Gradients of one pool: (dx, dparams)."""
    dys, dgates = dispatch.combine_backward(dy, cache.combine)   # (M, D), (N, K)
    dxs, dexperts = experts.backward(dys, cache.experts)         # (M, D)
    dx = dispatch.dispatch_backward(dxs, cache.dispatch)         # (N, D) dispatch branch

    probs = cache.router.softmax.p                               # (N, E)
    dprobs = np.zeros_like(probs)                                # (N, E)
    dlogits = None
    for name, weight in config.aux_weights.items():
        scale = daux_total * weight                              # d aux_total / d loss
        if scale == 0.0:
            continue
        for idx, c in cache.aux[name]:
            grad = _AUX_BACKWARD[name](scale, c)                 # (N_group, E)
            if name == "z_loss":
                dlogits = grad                                   # (N, E) of the logits
            elif idx is None:
                dprobs += grad                                   # (N, E)
            else:
                dprobs[idx] += grad                              # (N_group, E) rows distinct
    dx_router, drouter = router.backward(dgates, cache.router, dprobs, dlogits)  # (N, D)
    dx += dx_router                                              # (N, D) the two branches
    return dx, {"router": drouter, "experts": dexperts}


def _zero_pool_grads(params):
    return zeros_like({"router": params["router"], "experts": params["experts"]})


def place_pool(y, idx, y_p, stats_p, name, num_experts):
    """Put a pool's output ``y_p`` (N_p, D) into the layer's ``y`` (N, D) at its rows
    ``idx`` (None: the pool is the whole layer, ``y_p`` is the output), and give a
    modality pool's statistics their (2, E) usage (all its load on its own modality's
    row).  Returns ``(y, stats_p)``."""
    if idx is None:
        return y_p, stats_p                                      # (N, D)
    y[idx] = y_p                                                 # (N_p, D) scatter rows
    usage = np.zeros((2, num_experts), dtype=np.int64)           # (2, E)
    usage[MODALITIES.index(name)] = stats_p.load
    return y, stats_p._replace(usage=usage)


def forward(x, params, config, modality=None, *, rng=None, train=False, all_losses=True):
    """The MoE layer's expert mixture (no residual).

    Parameters
    ----------
    x : (N, D) float array.
    params : from :func:`init` (same dtype as ``x``).
    config : MoEConfig
    modality : (N,) int array of 0 (image) / 1 (text), or None.  Required in
        ``"modality"`` mode; in ``"shared"`` mode it only splits the statistics and
        the LIMoE entropy losses by modality.
    rng : numpy.random.Generator, required when ``train`` and ``config.noise_std > 0``
        (the router noise is its only use).
    train : bool, add router noise (if ``noise_std > 0``); evaluation is deterministic.
    all_losses : bool.  True: every auxiliary loss is computed (for reporting).  False:
        only those with a non-zero weight in ``config.aux_weights`` (what the gradient
        needs; the training step), and ``aux.losses`` holds only them.

    Returns
    -------
    y : (N, D), dtype of ``x``; ``y[n] = sum_{kept j} g[n, j] FFN_{top[n, j]}(x[n])``.
    aux : Aux(losses, aux_total, stats, dropped_fraction)
    cache : Cache
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
    check_array("x", x, ndim=2, axes="(N, D)")
    n, d = x.shape
    modality = _check_modality(modality, n, config)
    noisy = check_bool("train", train) and config.noise_std > 0
    if noisy and not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator when train=True and "
                         f"noise_std={config.noise_std} > 0 (router noise), got "
                         f"{shorten(repr(rng))}")
    check_bool("all_losses", all_losses)
    names = [name for name in aux_losses.AUX_LOSSES
             if all_losses or config.aux_weights[name] != 0]
    check_params("params", params, ())
    if config.mode == "shared":
        pools = [("shared", None, params)]
    else:
        missing = [m for m in MODALITIES if m not in params]
        if missing:
            raise ValueError(f"params must have the pools {list(MODALITIES)} in "
                             f"mode='modality', missing {missing}")
        pools = [(name, np.flatnonzero(modality == m), params[name])
                 for m, name in enumerate(MODALITIES)]
    for name, _, pool in pools:
        where = "params" if name == "shared" else f"params['{name}']"
        check_params(where, pool, ("router", "experts"))
        check_params(f"{where}['router']", pool["router"], ("W", "b"))
        check_csr(f"{where}['router']['W']", pool["router"]["W"])
        w = pool["router"]["W"]
        if w.shape != (config.num_experts, d):
            raise ValueError(f"params router W must have shape ({config.num_experts}, {d}) "
                             f"(E, D), got {w.shape}")
        check_same_dtype("x", x, f"the {name} router W", w)

    check_finite_tree("params", params)
    with checked_inputs():              # checked in full above: no rescan at every hop
        return _forward(x, config, modality, rng, noisy, names, pools)


def _forward(x, config, modality, rng, noisy, names, pools):
    """:func:`forward` after its checks: ``(y, aux, cache)``."""
    n, d = x.shape
    y = np.zeros((n, d), dtype=x.dtype)                          # (N, D) rows of idle pools stay 0
    losses = dict.fromkeys(names, 0.0)
    stats, caches = {}, []
    for name, idx, pool in pools:
        x_p = x if idx is None else x[idx]                       # (N_p, D)
        mod_p = modality if idx is None else None                # groups inside the pool
        if x_p.shape[0] == 0:                                    # no token for this pool
            zeros = np.zeros(config.num_experts, dtype=np.int64)  # (E,)
            usage = None if modality is None else np.zeros((2, config.num_experts), np.int64)
            stats[name] = PoolStats(capacity=0, routed=zeros, load=zeros, dropped_fraction=0.0,
                                    usage=usage)
            caches.append((name, idx, None, pool))
            continue
        noise = None
        if noisy:
            noise = router.sample_noise(rng, (x_p.shape[0], config.num_experts),
                                        config.noise_std, x.dtype)  # (N_p, E)
        y_p, losses_p, stats_p, cache_p = _pool_forward(x_p, pool, config, mod_p, noise,
                                                        names)
        y, stats_p = place_pool(y, idx, y_p, stats_p, name, config.num_experts)
        for key, value in losses_p.items():
            losses[key] += value
        stats[name] = stats_p
        caches.append((name, idx, cache_p, None))

    aux_total = float(sum(config.aux_weights[key] * losses[key] for key in losses))
    kept = sum(int(s.load.sum()) for s in stats.values())
    dropped = 1.0 - kept / max(1, n * config.k)
    aux = Aux(losses=losses, aux_total=aux_total, stats=stats, dropped_fraction=dropped)
    return y, aux, Cache(config=config, pools=caches, shape=(n, d), dtype=x.dtype)


def backward(dy, cache, daux_total=1.0):
    """Gradient of ``sum(y * dy) + daux_total * aux_total``.

    Parameters
    ----------
    dy : (N, D) upstream gradient of ``y``.
    cache : Cache from :func:`forward`.
    daux_total : float, upstream gradient of ``aux.aux_total`` (1.0 when the aux losses
        are simply added to the task loss).

    Returns
    -------
    dx : (N, D)
    dparams : keyed like the params (router W with its pattern, every expert weight
        and bias); experts that received no token get exactly zero.
    """
    check_cache(cache, Cache)
    check_grad("dy", dy, cache.shape, cache.dtype)
    check_grad("daux_total", daux_total, ())
    config, pools, (n, d), dtype = cache
    daux_total = float(daux_total)
    dy = np.asarray(dy)
    if dy.shape != (n, d):
        raise ValueError(f"dy must have shape {(n, d)} (N, D), got {dy.shape}")
    dx = np.zeros((n, d), dtype=dtype)                           # (N, D)
    dparams = {}
    for name, idx, pool_cache, pool_params in pools:
        if pool_cache is None:                                   # pool got no token
            dparams[name] = _zero_pool_grads(pool_params)
        elif idx is None:                                        # shared: all rows
            dx, dparams[name] = _pool_backward(dy, pool_cache, config, daux_total)
        else:
            dx_p, dparams[name] = _pool_backward(dy[idx], pool_cache, config, daux_total)
            dx[idx] = dx_p                                       # (N_p, D) rows of the pool
    return (dx, dparams["shared"]) if config.mode == "shared" else (dx, dparams)
