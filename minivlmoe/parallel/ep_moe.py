"""The expert-parallel MoE layer: experts spread over Rk ranks, tokens exchanged by
all-to-all, the same numbers as minivlmoe/moe/moe_layer.py on the global batch.

Layout
------
Rk ranks; rank r holds the n_r tokens ``x`` (n_r, D) of its share of the global batch
(the global batch is the ranks' shares concatenated in rank order, N = sum_r n_r), a
full copy of every router, and the experts ``owned(r) = [r E/Rk, (r+1) E/Rk)`` of every
pool (E divisible by Rk).  Per pool (docs/parallel.md has the diagram and the sizes)::

    route     routing = router.forward(x)                     local, (n_r, E), (n_r, K)
    plan      top, top-1 prob  --Allgather-->  (N, K), (N,)   every rank the same
              plan = make_plan(top_global, E, X(N), order)    global capacity and drops
    dispatch  Xs_me = Disp_me^T x                             (m_r, D) my kept
              assignments in global slot order = grouped by the rank of their expert
              --Alltoallv-->  Xs_own (M_own, D), the slots of my experts, slot order
    experts   Ys_own = FFN_e(Xs_own[block e])  for e in owned(r)
    combine   Ys_own --Alltoallv (reverse)-->  Ys_me (m_r, D)
              y = Comb_me Ys_me                               (n_r, D)
    aux       losses from Allreduced sums (parallel/ep_aux.py)

``Disp_me``/``Comb_me`` are the single-process matrices restricted to my tokens' rows
and my kept slots (renumbered in the same order), so each token sums its experts'
outputs in the same order as one process does.  The backward mirrors it: ``dy`` ->
``combine_backward`` -> Alltoallv to the experts' ranks -> ``experts.backward`` ->
Alltoallv back -> ``dispatch_backward``; the router gets this rank's rows of the
gates' and the aux losses' gradients.

Gradients returned by :func:`backward`: ``dx`` (n_r, D) exact; the owned experts' weight
gradients complete (every token of the expert was processed here); the router
gradients are this rank's *contribution* -- summing them over ranks (``Allreduce``, as
data parallelism does for every replicated weight) gives the single-process gradient.
Experts this rank does not own get exact zeros, so one Allreduce of the whole tree is
also correct for them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..moe import dispatch, experts, moe_layer, router
from ..moe.moe_config import MODALITIES, MoEConfig
from ..moe.moe_layer import Aux, PoolStats
from ..tree import zeros_like
from . import ep_aux


def owned_experts(num_experts, rank, size):
    """The experts ``range(lo, hi)`` of ``rank`` out of ``size``; E must divide evenly."""
    if num_experts % size:
        raise ValueError(f"num_experts must be divisible by the number of ranks ({size}: "
                         f"each rank holds num_experts / ranks experts of every pool), got "
                         f"num_experts={num_experts}")
    per = num_experts // size
    return range(rank * per, (rank + 1) * per)


def shard(params, config, rank, size):
    """This rank's part of full MoE params: every router, the owned experts only."""
    own = owned_experts(config.num_experts, rank, size)

    def pool(p):
        return {"router": p["router"],
                "experts": {f"e{g}": p["experts"][f"e{g}"] for g in own}}
    if config.mode == "shared":
        return pool(params)
    return {name: pool(params[name]) for name in MODALITIES}


class Exchange(NamedTuple):
    """How the slots move between ranks (all derived from the global plan).

    Fields
    ------
    send : (Rk,) rows of Xs_me for each destination rank.
    recv : (Rk,) rows of Xs_own from each source rank.
    perm : (M_own,) ``Xs_own[perm] = received rows`` (received grouped by source).
    """

    send: np.ndarray
    recv: np.ndarray
    perm: np.ndarray


class PoolCache(NamedTuple):
    """``router``: router.Cache (rows of this rank); ``dispatch``, ``combine``: the
    caches on the local plan; ``experts``: experts.Cache of the owned experts (None
    when they got no slot); ``exchange``: Exchange; ``aux``: ep_aux.Cache;
    ``own``: range of owned experts; ``plan``: the global Plan (every rank the same)."""

    router: router.Cache
    dispatch: dispatch.DispatchCache
    combine: dispatch.CombineCache
    experts: experts.Cache | None
    exchange: Exchange
    aux: ep_aux.Cache
    own: range
    plan: dispatch.Plan


class Cache(NamedTuple):
    """``config``; ``comm``; ``pools``: list of (pool name, local rows or None,
    PoolCache or None when the pool has no token on any rank, the pool's params);
    ``shape``: (n_r, D); ``dtype``.  The ``pools`` tuples have the layout of
    moe_layer.Cache's, so tower statistics read them alike."""

    config: MoEConfig
    comm: object
    pools: list
    shape: tuple
    dtype: np.dtype


def local_plan(experts_loc, slot_loc, kept_loc, slot_expert_me, num_experts):
    """The Plan of this rank's tokens over its m_r kept slots (renumbered 0..m_r-1 in
    global slot order), for dispatch/combine on the local rows.

    Parameters
    ----------
    experts_loc, slot_loc, kept_loc : (n_r, K) rows of the global plan.
    slot_expert_me : (m_r,) expert of each of my kept slots, in global slot order.
    num_experts : E.

    Returns
    -------
    plan : dispatch.Plan over (n_r, m_r); ``offsets``/``load`` count my slots per
        expert; ``capacity`` and ``position`` are -1 (the global plan holds them, and
        dispatch/combine never read them).
    """
    n, k = experts_loc.shape
    mine = np.sort(slot_loc[kept_loc])                           # (m_r,) global slots, sorted
    m = mine.shape[0]
    slot = np.where(kept_loc, np.searchsorted(mine, slot_loc), -1)  # (n_r, K) local slot
    # who sits in my slots, and the CSR pattern of Disp_me (n_r, m_r), as make_plan does
    slot_token, slot_rank, indptr, indices, entry_src = dispatch.slot_pattern(kept_loc, slot, m)
    load = np.bincount(slot_expert_me, minlength=num_experts)    # (E,) my slots per expert
    offsets = np.concatenate([[0], np.cumsum(load)])             # (E+1,)
    return dispatch.Plan(capacity=-1, experts=experts_loc, position=np.full((n, k), -1),
                         kept=kept_loc, slot=slot, offsets=offsets, routed=load, load=load,
                         slot_token=slot_token, slot_rank=slot_rank, indptr=indptr,
                         indices=indices, entry_src=entry_src)


def _pool_forward(x, params, config, modality, noise, comm, counts):
    """One pool; ``counts`` (Rk,) its tokens per rank.  Returns (y, losses, stats, cache)."""
    n, d = x.shape
    k, e, r = config.k, config.num_experts, comm.rank
    start = int(counts[:r].sum())
    own = owned_experts(e, r, comm.size)
    routing, r_cache = router.forward(x, params["router"], k, config.renormalize, noise)

    # ---- plan: the global choices (and priorities), then the single-process plan
    top = comm.allgather_rows(routing.experts.astype(np.int64), counts)  # (N, K)
    if config.bpr:
        top1 = np.take_along_axis(routing.probs, routing.experts[:, :1], axis=1)[:, 0]  # (n_r,)
        order = dispatch.priority_order(comm.allgather_rows(top1, counts), True)  # (N,)
    else:
        order = np.arange(top.shape[0])                          # (N,) token order
    cap = dispatch.capacity(top.shape[0], e, k, config.capacity_factor)
    plan = dispatch.make_plan(top, e, cap, order)
    slot_expert = np.repeat(np.arange(e), plan.load)             # (M,) expert of each slot
    token_rank = np.repeat(np.arange(comm.size), counts)         # (N,) rank of each token
    slot_src = token_rank[plan.slot_token]                       # (M,) rank of each slot's token
    per = e // comm.size
    slot_dst = slot_expert // per                                # (M,) rank of each slot's expert

    # ---- dispatch: my kept assignments, grouped by destination (global slot order)
    rows = slice(start, start + n)
    mine = slot_src == r                                         # (M,)
    lplan = local_plan(routing.experts, plan.slot[rows], plan.kept[rows],
                       slot_expert[mine], e)
    xs_me, d_cache = dispatch.dispatch_forward(x, lplan)         # (m_r, D)
    lo, hi = int(plan.offsets[own.start]), int(plan.offsets[own.stop])
    src_own = slot_src[lo:hi]                                    # (M_own,)
    ex = Exchange(send=np.bincount(slot_dst[mine], minlength=comm.size),
                  recv=np.bincount(src_own, minlength=comm.size),
                  perm=np.argsort(src_own, kind="stable"))
    got = comm.alltoallv(xs_me, ex.send, ex.recv, "dispatch")    # (M_own, D) by source
    xs_own = np.empty_like(got)                                  # (M_own, D)
    xs_own[ex.perm] = got                                        # slot order

    # ---- the owned experts on their slots
    names = {f"e{i}": params["experts"][f"e{g}"] for i, g in enumerate(own)}
    offsets = plan.offsets[own.start:own.stop + 1] - lo          # (E/Rk+1,)
    ys_own, e_cache = experts.forward(xs_own, offsets, names)    # (M_own, D)

    # ---- combine: the outputs travel back to their tokens' ranks
    ys_me = comm.alltoallv(ys_own[ex.perm], ex.recv, ex.send, "combine")  # (m_r, D)
    y, c_cache = dispatch.combine_forward(ys_me, routing.gates, lplan)    # (n_r, D)

    # ---- auxiliary losses over the global batch
    assign = np.zeros((n, e), dtype=routing.probs.dtype)         # (n_r, E) top-k indicator
    assign[np.arange(n)[:, None], routing.experts] = 1
    groups = [None] if modality is None else [np.flatnonzero(modality == m) for m in (0, 1)]
    losses, a_cache = ep_aux.forward(routing.probs, routing.logits, assign, k, groups,
                                     config.tau, comm)
    usage = None
    if modality is not None:
        mine_usage = np.stack([np.bincount(routing.experts[plan.kept[rows]
                                                           & (modality[:, None] == m)],
                                           minlength=e) for m in (0, 1)])  # (2, E)
        usage = comm.allreduce_sum(mine_usage, tag="stats")     # (2, E)
    stats = PoolStats(capacity=cap, routed=plan.routed, load=plan.load,
                      dropped_fraction=plan.dropped_fraction, usage=usage)
    cache = PoolCache(router=r_cache, dispatch=d_cache, combine=c_cache, experts=e_cache,
                      exchange=ex, aux=a_cache, own=own, plan=plan)
    return y, losses, stats, cache


def _pool_backward(dy, cache, config, daux_total, comm):
    """(dx, dparams) of one pool: dparams' experts are the owned ones, global names."""
    ex = cache.exchange
    dys_me, dgates = dispatch.combine_backward(dy, cache.combine)  # (m_r, D), (n_r, K)
    got = comm.alltoallv(dys_me, ex.send, ex.recv, "combine")    # (M_own, D) by source
    dys_own = np.empty_like(got)                                 # (M_own, D)
    dys_own[ex.perm] = got                                       # slot order
    dxs_own, dnames = experts.backward(dys_own, cache.experts)   # (M_own, D)
    dxs_me = comm.alltoallv(dxs_own[ex.perm], ex.recv, ex.send, "dispatch")  # (m_r, D)
    dx = dispatch.dispatch_backward(dxs_me, cache.dispatch)      # (n_r, D) dispatch branch
    scales = {name: daux_total * w for name, w in config.aux_weights.items()}
    dprobs, dlogits = ep_aux.backward(scales, cache.aux)         # (n_r, E), (n_r, E) or None
    dx_router, drouter = router.backward(dgates, cache.router, dprobs, dlogits)  # (n_r, D)
    dx += dx_router                                              # (n_r, D) the two branches
    dexperts = {f"e{g}": dnames[f"e{i}"] for i, g in enumerate(cache.own)}
    return dx, {"router": drouter, "experts": dexperts}


def _pool_grads(params, got):
    """Gradients keyed like ``params``: ``got``'s entries, zeros for the rest."""
    out = {"router": got["router"] if got else zeros_like(params["router"]), "experts": {}}
    for name, p in params["experts"].items():
        if got and name in got["experts"]:
            out["experts"][name] = got["experts"][name]
        else:
            out["experts"][name] = zeros_like(p)
    return out


def forward(x, params, config, comm, modality=None, *, rng=None, train=False):
    """The expert-parallel layer on this rank's tokens.

    Parameters
    ----------
    x : (n_r, D) this rank's tokens (its share of the global batch, in order).
    params : the MoE params (moe_layer.init) or this rank's :func:`shard` of them:
        every router, at least the owned experts.
    config : MoEConfig.   comm : parallel.comm.Comm.
    modality : (n_r,) int 0 image / 1 text, or None (as moe_layer.forward).
    rng, train : router noise; every rank draws the *global* (N, E) noise from its own
        generator (all ranks hold the same generator state) and adds its rows, so the
        noise equals the single-process draw.

    Returns
    -------
    y : (n_r, D); aux : moe_layer.Aux, equal on every rank (global statistics);
    cache : Cache.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
    owned_experts(config.num_experts, comm.rank, comm.size)      # E divisible by Rk
    n, d = x.shape
    noisy = bool(train) and config.noise_std > 0
    if config.mode == "modality" and modality is None:
        raise ValueError("modality must be given (an (N,) int array, 0 image / 1 text) "
                         "when config.mode='modality', got None")
    if config.mode == "shared":
        pools = [("shared", None, params)]
    else:
        pools = [(name, np.flatnonzero(modality == m), params[name])
                 for m, name in enumerate(MODALITIES)]
    y = np.zeros((n, d), dtype=x.dtype)                          # (n_r, D)
    losses = {name: 0.0 for name in ("load_balance", "importance", "z_loss",
                                     "entropy_local", "entropy_global")}
    stats, caches, kept, total = {}, [], 0, 0
    for name, idx, pool in pools:
        x_p = x if idx is None else x[idx]                       # (n_p, D)
        mod_p = modality if idx is None else None
        counts = comm.allgather_counts(x_p.shape[0])             # (Rk,) pool tokens per rank
        total += int(counts.sum())
        if counts.sum() == 0:                                    # no token on any rank
            zeros = np.zeros(config.num_experts, dtype=np.int64)  # (E,)
            usage = None if modality is None else np.zeros((2, config.num_experts), np.int64)
            stats[name] = PoolStats(capacity=0, routed=zeros, load=zeros,
                                    dropped_fraction=0.0, usage=usage)
            caches.append((name, idx, None, pool))
            continue
        noise = None
        if noisy:
            full = router.sample_noise(rng, (int(counts.sum()), config.num_experts),
                                       config.noise_std, x.dtype)  # (N_p, E) global draw
            start = int(counts[:comm.rank].sum())
            noise = full[start:start + x_p.shape[0]]             # (n_p, E) my rows
        y_p, losses_p, stats_p, cache_p = _pool_forward(x_p, pool, config, mod_p, noise,
                                                        comm, counts)
        y, stats_p = moe_layer.place_pool(y, idx, y_p, stats_p, name, config.num_experts)
        for key, value in losses_p.items():
            losses[key] += value
        stats[name] = stats_p
        kept += int(stats_p.load.sum())
        caches.append((name, idx, cache_p, pool))
    aux_total = float(sum(config.aux_weights[key] * losses[key] for key in losses))
    dropped = 1.0 - kept / max(1, total * config.k)
    aux = Aux(losses=losses, aux_total=aux_total, stats=stats, dropped_fraction=dropped)
    return y, aux, Cache(config=config, comm=comm, pools=caches, shape=(n, d), dtype=x.dtype)


def backward(dy, cache, daux_total=1.0):
    """Gradient of the global ``sum(y * dy) + daux_total * aux_total``, this rank's part.

    Returns
    -------
    dx : (n_r, D)
    dparams : keyed like the params given to :func:`forward`: owned experts complete,
        other experts zero, routers this rank's contribution (sum over ranks).
    """
    config, comm = cache.config, cache.comm
    n, d = cache.shape
    daux_total = float(daux_total)
    dy = np.asarray(dy)
    if dy.shape != (n, d):
        raise ValueError(f"dy must have shape {(n, d)} (n_r, D), got {dy.shape}")
    dx = np.zeros((n, d), dtype=cache.dtype)                     # (n_r, D)
    dparams = {}
    for name, idx, pool_cache, pool_params in cache.pools:
        if pool_cache is None:
            dparams[name] = _pool_grads(pool_params, None)
            continue
        dy_p = dy if idx is None else dy[idx]                    # (n_p, D)
        dx_p, got = _pool_backward(dy_p, pool_cache, config, daux_total, comm)
        if idx is None:
            dx = dx_p                                            # (n_r, D)
        else:
            dx[idx] = dx_p                                       # (n_p, D)
        dparams[name] = _pool_grads(pool_params, got)
    return (dx, dparams["shared"]) if config.mode == "shared" else (dx, dparams)
