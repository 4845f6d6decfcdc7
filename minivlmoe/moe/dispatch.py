"""Expert capacity, token priority (incl. Batch Priority Routing), and the sparse
dispatch and combine matrices of a Mixture-of-Experts layer.

The contract (davidmrau's SparseDispatcher, vmoe's ``moe.py``): for gates ``G`` (N, E)
that are zero outside each token's kept experts::

    y[n] = sum_e G[n, e] * expert_e(x[n])

Capacity
--------
Each of the E experts takes at most ``X = ceil(capacity_factor * K * N / E)`` token
slots (:func:`capacity`; rounding up, so a capacity factor of 1 with a perfectly
balanced router drops nothing).  ``capacity_factor=None`` is dropless: ``X = N``,
which no expert can exceed because a token picks an expert at most once.

Placement (:func:`make_plan`), as in GShard and V-MoE:

1. all first choices are placed before any second choice (and so on for rank j);
2. inside a rank, tokens come in priority order: token order, or with Batch Priority
   Routing (V-MoE) by decreasing top-1 router probability (ties: lower token first);
3. an assignment whose position in its expert is >= X is *dropped*: its combine
   weight is 0 and it contributes nothing to ``y`` (the residual connection around
   the layer carries the token).  Earlier assignments that were dropped still count,
   so an expert never takes a rank-(j+1) token after dropping a rank-j token.

Slots and matrices
------------------
Only the M filled slots exist.  They are ordered by expert, then by position: expert
e owns slots ``offsets[e]:offsets[e+1]``, so its input is a contiguous block.  With
``slot(n, j)`` the slot of token n's j-th kept choice::

    dispatch  Disp (N, M):  Disp[n, s] = 1        if s = slot(n, j) for some kept j
    combine   Comb (N, M):  Comb[n, s] = g[n, j]  same pattern   (Comb = Disp diag(g_slot))
    expert inputs   Xs = Disp^T x      (M, D)   a gather
    layer output    y  = Comb Ys       (N, D)   a weighted scatter-add

This is GShard's ``einsum("nd,nex->exd")`` / ``einsum("nex,exd->nd")`` with the dense
(N, E, X) one-hot tensors reshaped to (N, E*X) and their empty columns deleted, and
it is MegaBlocks' block-sparse form with one block row per expert of variable height
(docs/moe/dispatch.md shows the three side by side).

Backward (docs/moe/dispatch.md)::

    dispatch:  dx  = Disp dXs                                   (N, D)
    combine:   dYs = Comb^T dy = g_slot * (Disp^T dy)           (M, D)
               dg[n, j] = dy[n] . Ys[slot(n, j)]  (kept), 0 (dropped)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ..tree import csr_on_pattern
from .._checks import (check_array, check_bool, check_cache, check_float, check_grad, check_int,
                       shorten)


def capacity(num_tokens, num_experts, k, capacity_factor):
    """Slots per expert ``X = ceil(capacity_factor * k * N / E)``; ``N`` if dropless.

    ``capacity_factor`` is a float > 0 or None (dropless).  The product is rounded to
    9 decimals before the ceiling, so 1.1 * 2 * 100 / 4 = 55.00000000000001 gives 55.
    """
    num_tokens = check_int("num_tokens", num_tokens, 0)
    num_experts = check_int("num_experts", num_experts, 1)
    k = check_int("k", k, 1, num_experts)
    if capacity_factor is None:
        return num_tokens
    capacity_factor = check_float("capacity_factor", capacity_factor, 0.0, low_open=True)
    return int(math.ceil(round(capacity_factor * k * num_tokens / num_experts, 9)))


def priority_order(top1_probs, bpr):
    """Order (N,) in which the tokens of one choice rank claim their slots.

    ``bpr=False``: token order ``0, 1, ..., N-1``.  ``bpr=True`` (Batch Priority
    Routing, V-MoE): decreasing top-1 router probability; a stable sort, so equal
    priorities keep token order.
    """
    check_array("top1_probs", top1_probs, ndim=1, axes="(N,)")
    bpr = check_bool("bpr", bpr)
    n = top1_probs.shape[0]
    if not bpr:
        return np.arange(n)                                      # (N,)
    return np.argsort(-top1_probs, kind="stable")                # (N,)


class Plan(NamedTuple):
    """Where every (token, choice) assignment goes.  Integer arrays only, no dtype.

    Fields
    ------
    capacity : int, X slots per expert.
    experts : (N, K) int, chosen experts (from the router).
    position : (N, K) int, the assignment's place in its expert's queue.
    kept : (N, K) bool, ``position < capacity``.
    slot : (N, K) int, the slot of a kept assignment, -1 if dropped.
    offsets : (E+1,) int, expert e owns slots ``offsets[e]:offsets[e+1]``.
    routed : (E,) int, assignments per expert before capacity.
    load : (E,) int, filled slots per expert, ``min(routed, capacity)``.
    slot_token : (M,) int32, the token in each slot.
    slot_rank : (M,) int, the choice rank j of each slot.
    indptr : (N+1,) int32, CSR row pointers of the (N, M) dispatch/combine pattern.
    indices : (M,) int32, CSR column (slot) indices, sorted within each row.
    entry_src : (M,) int, flat index ``n*K + j`` of the gate of each CSR entry.
    """

    capacity: int
    experts: np.ndarray
    position: np.ndarray
    kept: np.ndarray
    slot: np.ndarray
    offsets: np.ndarray
    routed: np.ndarray
    load: np.ndarray
    slot_token: np.ndarray
    slot_rank: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    entry_src: np.ndarray

    @property
    def num_slots(self):
        """M, the number of filled slots (kept assignments)."""
        return int(self.offsets[-1])

    @property
    def dropped_fraction(self):
        """Dropped assignments / all N*K assignments (0.0 when N = 0)."""
        return 1.0 - self.num_slots / max(1, self.kept.size)


def make_plan(experts, num_experts, capacity, order):
    """Assign each (token, choice) a queue position, then a slot or a drop.

    Parameters
    ----------
    experts : (N, K) int, the router's choices, best first.
    num_experts : int, E.
    capacity : int >= 0, X slots per expert.
    order : (N,) int, a permutation of the tokens (:func:`priority_order`).

    Returns
    -------
    plan : Plan
    """
    check_array("experts", experts, ndim=2, axes="(N, K)", dtype_kind="i")
    n, k = experts.shape
    num_experts = check_int("num_experts", num_experts, 1)
    capacity = check_int("capacity", capacity, 0)
    if n and (experts.min() < 0 or experts.max() >= num_experts):
        raise ValueError(f"experts must be in [0, {num_experts - 1}], got values in "
                         f"[{experts.min()}, {experts.max()}]")
    if k > 1 and n:                                              # a token picks an expert once
        row_sorted = np.sort(experts, axis=1)                    # (N, K)
        dup = np.flatnonzero(np.any(row_sorted[:, 1:] == row_sorted[:, :-1], axis=1))
        if dup.size:
            raise ValueError(f"experts must hold K distinct experts per token, got row "
                             f"{int(dup[0])} = {shorten(experts[dup[0]].tolist())}")
    check_array("order", order, ndim=1, axes="(N,)", dtype_kind="i")
    if order.shape != (n,) or (n and (order.min() < 0 or order.max() >= n
                                      or np.any(np.bincount(order, minlength=n) != 1))):
        raise ValueError(f"order must be a permutation of the {n} tokens, got "
                         f"{shorten(order.tolist())}")
    ids = np.arange(num_experts)                                 # (E,)
    position = np.empty((n, k), dtype=np.int64)                  # (N, K)
    filled = np.zeros(num_experts, dtype=np.int64)               # (E,) queue lengths so far
    for j in range(k):                                           # rank j before rank j+1
        e_j = experts[order, j]                                  # (N,) in priority order
        onehot = e_j[:, None] == ids                             # (N, E)
        ahead = np.cumsum(onehot, axis=0) - onehot               # (N, E) same-rank tokens ahead
        position[order, j] = filled[e_j] + ahead[np.arange(n), e_j]  # (N,)
        filled += onehot.sum(axis=0)                             # (E,)
    kept = position < capacity                                   # (N, K)
    routed = filled                                              # (E,)
    load = np.minimum(routed, capacity)                          # (E,)
    offsets = np.concatenate([[0], np.cumsum(load)])             # (E+1,)
    slot = np.where(kept, offsets[experts] + position, -1)       # (N, K)
    m = int(offsets[-1])

    slot_token, slot_rank, indptr, indices, entry_src = slot_pattern(kept, slot, m)
    return Plan(capacity=capacity, experts=experts, position=position, kept=kept, slot=slot,
                offsets=offsets, routed=routed, load=load, slot_token=slot_token,
                slot_rank=slot_rank, indptr=indptr, indices=indices, entry_src=entry_src)


def slot_pattern(kept, slot, m):
    """Who sits in each of ``m`` slots, and the CSR pattern of the (N, M) dispatch and
    combine matrices, from ``kept`` (N, K) bool and ``slot`` (N, K) (the slot of each kept
    assignment, a permutation of 0..M-1 over them).

    Returns ``(slot_token (M,), slot_rank (M,), indptr (N+1,), indices (M,),
    entry_src (M,))`` as the Plan fields of those names.
    """
    n, k = kept.shape
    # who sits in each slot: invert slot (N, K) -> (token, rank) for the M kept ones
    tokens = np.broadcast_to(np.arange(n)[:, None], (n, k))      # (N, K)
    ranks = np.broadcast_to(np.arange(k)[None, :], (n, k))       # (N, K)
    slot_token = np.empty(m, dtype=np.int32)                     # (M,)
    slot_rank = np.empty(m, dtype=np.int64)                      # (M,)
    slot_token[slot[kept]] = tokens[kept]
    slot_rank[slot[kept]] = ranks[kept]

    # CSR pattern of the (N, M) dispatch/combine matrices: row n holds its kept slots,
    # sorted (canonical format); dropped assignments sort last and are cut off
    key = np.where(kept, slot, m)                                # (N, K)
    by_slot = np.argsort(key, axis=1)                            # (N, K)
    sorted_slot = np.take_along_axis(key, by_slot, axis=1)       # (N, K)
    sorted_kept = sorted_slot < m                                # (N, K)
    indices = sorted_slot[sorted_kept].astype(np.int32)          # (M,) row-major = by row
    entry_src = (tokens * k + by_slot)[sorted_kept]              # (M,) flat index into (N, K)
    indptr = np.zeros(n + 1, dtype=np.int32)                     # (N+1,)
    np.cumsum(kept.sum(axis=1), out=indptr[1:])
    return slot_token, slot_rank, indptr, indices, entry_src


def dispatch_matrix(plan, dtype):
    """``Disp`` (N, M) csr_array of ones: row n marks the slots of token n."""
    n, m = plan.kept.shape[0], plan.num_slots
    return csr_on_pattern(np.ones(m, dtype=dtype), plan.indices, plan.indptr, (n, m))


def dispatch_matrix_T(plan, dtype):
    """``Disp^T`` (M, N) csr_array, built directly: slot s has one 1, at its token."""
    n, m = plan.kept.shape[0], plan.num_slots
    return csr_on_pattern(np.ones(m, dtype=dtype), plan.slot_token,
                np.arange(m + 1, dtype=np.int32), (m, n))


def combine_matrix(plan, gates):
    """``Comb`` (N, M) csr_array: ``Comb[n, slot(n, j)] = gates[n, j]`` for kept (n, j)."""
    n, m = plan.kept.shape[0], plan.num_slots
    return csr_on_pattern(gates.reshape(-1)[plan.entry_src], plan.indices, plan.indptr, (n, m))


def _check_plan(plan):
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan from make_plan, got {type(plan).__name__}")


class DispatchCache(NamedTuple):
    """``plan``: the Plan (the pattern of ``Disp``); ``dtype``: of ``x``."""

    plan: Plan
    dtype: np.dtype


def dispatch_forward(x, plan):
    """Expert inputs ``Xs = Disp^T x`` (M, D): the token of each slot, experts in order.

    Parameters
    ----------
    x : (N, D) float array.
    plan : Plan from :func:`make_plan`.

    Returns
    -------
    xs : (M, D), C-contiguous; expert e's block is ``xs[offsets[e]:offsets[e+1]]``.
    cache : DispatchCache
    """
    check_array("x", x, ndim=2, axes="(N, D)")
    _check_plan(plan)
    if x.shape[0] != plan.kept.shape[0]:
        raise ValueError(f"x must have {plan.kept.shape[0]} rows (N of the plan), "
                         f"got shape {x.shape}")
    disp_T = dispatch_matrix_T(plan, x.dtype)                    # (M, N)
    xs = disp_T @ np.ascontiguousarray(x)                        # (M, D)
    return xs, DispatchCache(plan=plan, dtype=x.dtype)


def dispatch_backward(dxs, cache):
    """``dx = Disp dXs`` (N, D): each token sums the gradients of its slots."""
    check_cache(cache, DispatchCache)
    check_grad("dxs", dxs, (cache.plan.num_slots, None), cache.dtype)
    disp = dispatch_matrix(cache.plan, cache.dtype)              # (N, M)
    return disp @ np.ascontiguousarray(dxs)                      # (N, D)


class CombineCache(NamedTuple):
    """``plan``; ``ys`` (M, D) the expert outputs (for dg); ``slot_gate`` (M,) the
    gate of each slot (for dYs)."""

    plan: Plan
    ys: np.ndarray
    slot_gate: np.ndarray


def combine_forward(ys, gates, plan):
    """Layer output ``y = Comb Ys`` (N, D).

    Parameters
    ----------
    ys : (M, D) expert outputs, one row per filled slot.
    gates : (N, K) combine weights of the chosen experts (dropped ones are ignored).
    plan : Plan

    Returns
    -------
    y : (N, D); a token whose every assignment was dropped gets an exact zero row.
    cache : CombineCache
    """
    _check_plan(plan)
    n, k = plan.kept.shape
    check_array("ys", ys, ndim=2, axes="(M, D)")
    check_array("gates", gates, ndim=2, axes="(N, K)")
    if ys.shape[0] != plan.num_slots or gates.shape != (n, k):
        raise ValueError(f"ys must have {plan.num_slots} rows and gates shape {(n, k)}, "
                         f"got {ys.shape} and {gates.shape}")
    ys = np.ascontiguousarray(ys)                                # (M, D)
    comb = combine_matrix(plan, gates)                           # (N, M)
    y = comb @ ys                                                # (N, D)
    slot_gate = gates[plan.slot_token, plan.slot_rank]           # (M,)
    return y, CombineCache(plan=plan, ys=ys, slot_gate=slot_gate)


def combine_backward(dy, cache):
    """Gradients of ``y = Comb Ys`` w.r.t. ``Ys`` and the gates.

    Returns
    -------
    dys : (M, D), ``Comb^T dy``.
    dgates : (N, K), ``dy[n] . Ys[slot(n, j)]`` for kept assignments, exactly 0 for
        dropped ones.
    """
    check_cache(cache, CombineCache)
    check_grad("dy", dy, (cache.plan.kept.shape[0], cache.ys.shape[1]), cache.ys.dtype)
    plan, ys, slot_gate = cache
    n, k = plan.kept.shape
    dy_slot = dispatch_matrix_T(plan, ys.dtype) @ np.ascontiguousarray(dy)  # (M, D) gather
    # y[n] = sum_s Comb[n, s] Ys[s]  ->  dYs[s] = g_slot[s] dy[token(s)]
    dys = dy_slot * slot_gate[:, None]                           # (M, D)
    # Comb[n, s] = g[n, j]           ->  dg[n, j] = dy[n] . Ys[s]
    dslot_gate = np.einsum("md,md->m", dy_slot, ys)             # (M,)
    dgates = np.zeros(n * k, dtype=ys.dtype)                     # (N*K,)
    dgates[plan.slot_token.astype(np.int64) * k + plan.slot_rank] = dslot_gate
    return dys, dgates.reshape(n, k)                             # (N, K)
