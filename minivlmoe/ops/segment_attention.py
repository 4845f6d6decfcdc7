"""Attention by segments: each query segment against only the keys it may see.

Why
---
The model's sequence is ``[image | caption | retrieval text]`` (minivlmoe/sequence.py)
and its block mask allows only three blocks of the S x S score matrix: image rows over
image keys, caption rows over image and earlier caption keys, retrieval rows over
retrieval keys.  Masked attention (:mod:`minivlmoe.ops.attention`) computes all S x S
scores and then sets the forbidden ones to ``-inf``; for the default layout (17 + 11 +
12 positions) that is 1600 scores per head of which 741 lie in the three blocks, and
every forbidden score still costs its share of the product, the softmax and the backward.
This op computes the blocks and nothing else.

Math
----
A *block* is a contiguous range of query positions ``Q``, the contiguous range of key
positions ``K`` they see, and an optional mask ``m`` (B, |Q|, |K|) inside it (causality,
key padding).  The blocks' query ranges partition ``[0, S)``.  With q, k, v (B, H, S, Dh)
from the shared projections (:func:`attention.project_qkv`) and ``c = 1/sqrt(Dh)``::

    for each block (Q, K, m):
        s = c q[:, :, Q] k[:, :, K]^T           (B, H, |Q|, |K|)
        s = -inf where m is False
        p = softmax(s, over K)                  (B, H, |Q|, |K|)
        ctx[:, :, Q] = p v[:, :, K]             (B, H, |Q|, Dh)
    y = o(merge_heads(ctx))

This is masked attention with the mask that is ``m`` inside each block and False
outside every block (:func:`dense_mask` builds it; the tests check that both ops give the
same outputs and gradients): a key outside the block gets probability exactly 0 there,
so leaving it out changes no sum.

Backward, per block (derived in docs/ops/attention.md)::

    dp = dctx[:, :, Q] v[:, :, K]^T             (B, H, |Q|, |K|)
    dv[:, :, K] += p^T dctx[:, :, Q]            keys seen by several blocks: their
    ds = c softmax.backward(dp)                 gradients add (the caption block
    dq[:, :, Q] = ds k[:, :, K]                 re-reads the image keys)
    dk[:, :, K] += ds^T q[:, :, Q]

then the projections' backward as in masked attention.  The loop runs over the (three)
blocks, never over tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import attention, linear, softmax
from .._checks import check_array, check_cache, check_grad


class Block(NamedTuple):
    """One query segment and the keys it sees.

    Fields
    ------
    queries : slice [q0, q1) of the sequence positions (step 1).
    keys : slice [k0, k1) of the key positions (step 1, non-empty).
    mask : bool array broadcastable to (B, q1 - q0, k1 - k0), True where allowed, or
        None (every key of the range allowed).
    """

    queries: slice
    keys: slice
    mask: np.ndarray | None


def _span(name, sl, S):
    """``(start, stop)`` of a step-1 slice inside [0, S]."""
    if not isinstance(sl, slice) or sl.step not in (None, 1):
        raise TypeError(f"{name} must be a slice with step 1, got {sl!r}")
    start, stop, _ = sl.indices(S)
    if sl.start is None or sl.stop is None or (start, stop) != (sl.start, sl.stop):
        raise ValueError(f"{name} must be a slice [start, stop) inside [0, S={S}], got {sl!r}")
    return start, stop


def check_blocks(blocks, B, S):
    """Validate ``blocks`` for a batch of B sequences of length S (see :class:`Block`):
    a non-empty tuple or list of Blocks whose query ranges are non-empty and, in order,
    cover ``[0, S)`` exactly; key ranges non-empty; masks of the right shape.  Returns a
    tuple of Blocks."""
    if not isinstance(blocks, (tuple, list)) or not blocks or not all(
            isinstance(b, Block) for b in blocks):
        raise TypeError(f"blocks must be a non-empty tuple of Block, got {type(blocks).__name__}")
    at = 0
    for i, blk in enumerate(blocks):
        q0, q1 = _span(f"blocks[{i}].queries", blk.queries, S)
        k0, k1 = _span(f"blocks[{i}].keys", blk.keys, S)
        if q0 != at or q1 <= q0:
            raise ValueError(f"blocks[{i}].queries must start at {at} and be non-empty "
                             f"(the query ranges partition [0, S={S}) in order), got "
                             f"[{q0}, {q1})")
        if k1 <= k0:
            raise ValueError(f"blocks[{i}].keys must be non-empty, got [{k0}, {k1})")
        if blk.mask is not None:
            check_array(f"blocks[{i}].mask", blk.mask, dtype_kind="b")
            want = (B, q1 - q0, k1 - k0)
            try:
                ok = blk.mask.ndim == 3 and np.broadcast_shapes(blk.mask.shape, want) == want
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"blocks[{i}].mask must be broadcastable to (B, Sq, Sk)="
                                 f"{want}, got shape {blk.mask.shape}")
        at = q1
    if at != S:
        raise ValueError(f"blocks must cover the query positions [0, S={S}), they end at {at}")
    return tuple(blocks)


def dense_mask(blocks, B, S):
    """The (B, S, S) bool mask of masked attention that equals ``blocks``: each block's
    mask inside it (True where it has none), False outside every block."""
    blocks = check_blocks(blocks, B, S)
    mask = np.zeros((B, S, S), dtype=bool)                         # (B, S, S)
    for blk in blocks:
        inside = mask[:, blk.queries, blk.keys]                    # (B, Sq, Sk) a view
        inside[...] = True if blk.mask is None else blk.mask       # broadcast into it
    return mask


class Cache(NamedTuple):
    """What backward needs.

    Fields
    ------
    qkv : attention.QKVCache of the projections.   o : the output projection's cache.
    q, k, v : (B, H, S, Dh) the head-split queries, keys and values.
    blocks : the tuple of Block.
    probs : list, one (B, H, Sq, Sk) array of attention weights per block.
    scale : float, 1/sqrt(Dh).
    """

    qkv: attention.QKVCache
    o: object
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    blocks: tuple
    probs: list
    scale: float


def forward(x, params, heads, blocks):
    """Multi-head self-attention computed block by block.

    Parameters
    ----------
    x : (B, S, D) float32 or float64.
    params : {"q","k","v","o"}, each linear params with weight (D, D), dtype of ``x``.
    heads : int H, must divide D.
    blocks : tuple of :class:`Block` whose query ranges partition [0, S).

    Returns
    -------
    y : (B, S, D), dtype of ``x``.
    cache : Cache
    """
    heads = attention.check_inputs(x, params, heads)
    B, S, D = x.shape
    blocks = check_blocks(blocks, B, S)
    scale = 1.0 / float(np.sqrt(D // heads))                       # a Python float keeps float32
    qkv, c_qkv = attention.project_qkv(x, params, heads)           # (3, B, H, S, Dh)
    q, k, v = qkv                                                  # (B, H, S, Dh) each
    ctx = np.empty_like(q)                                         # (B, H, S, Dh)
    probs = []
    for blk in blocks:
        Q, K = blk.queries, blk.keys
        s = q[:, :, Q] @ k[:, :, K].transpose(0, 1, 3, 2)          # (B, H, Sq, Sk)
        s *= scale                                                 # (B, H, Sq, Sk) in place
        if blk.mask is not None:
            np.copyto(s, -np.inf, where=~blk.mask[:, None])        # (B, H, Sq, Sk) masked keys
        p, _ = softmax.forward(s, axis=-1)                         # (B, H, Sq, Sk)
        ctx[:, :, Q] = p @ v[:, :, K]                              # (B, H, Sq, Dh)
        probs.append(p)
    y, c_o = linear.forward(attention.merge_heads(ctx), params["o"])  # (B, S, D)
    return y, Cache(qkv=c_qkv, o=c_o, q=q, k=k, v=v, blocks=blocks, probs=probs,
                    scale=scale)


def backward(dy, cache):
    """Gradients of :func:`forward`: ``(dx (B, S, D), {"q","k","v","o": dparams})``."""
    check_cache(cache, Cache)
    lead, d_out, _ = linear.output(cache.o)
    check_grad("dy", dy, lead + (d_out,), cache.q.dtype)
    q, k, v, scale = cache.q, cache.k, cache.v, cache.scale
    # y = o(merge(ctx))
    dctx, do = linear.backward(dy, cache.o)                        # (B, S, D)
    dctx = attention.split_heads(dctx, q.shape[1])                # (B, H, S, Dh)
    B, H, S, Dh = q.shape
    dqkv = attention.split_qkv(np.zeros((B * S, 3 * H * Dh), dtype=q.dtype), B, S, H)  # (3, B, H, S, Dh)
    dq, dk, dv = dqkv                                              # (B, H, S, Dh) views
    for blk, p in zip(cache.blocks, cache.probs):
        Q, K = blk.queries, blk.keys
        dctx_b = dctx[:, :, Q]                                     # (B, H, Sq, Dh)
        # ctx[Q] = p @ v[K]
        dp = dctx_b @ v[:, :, K].transpose(0, 1, 3, 2)             # (B, H, Sq, Sk)
        dv[:, :, K] += p.transpose(0, 1, 3, 2) @ dctx_b            # (B, H, Sk, Dh) keys add
        # p = softmax(s): dscores = 0 wherever p = 0 (masked keys)
        ds = softmax.backward(dp, softmax.Cache(p=p, axis=3))      # (B, H, Sq, Sk)
        # s = (q[Q] @ k[K]^T) * scale
        ds *= scale                                                # (B, H, Sq, Sk) in place
        dq[:, :, Q] = ds @ k[:, :, K]                              # (B, H, Sq, Dh) Q partition S
        dk[:, :, K] += ds.transpose(0, 1, 3, 2) @ q[:, :, Q]       # (B, H, Sk, Dh) keys add
    # q, k, v = proj(x): x forks into three branches, their gradients add
    dx, dparams = attention.project_qkv_backward(dqkv, cache.qkv)  # (B, S, D)
    dparams["o"] = do
    return dx, {name: dparams[name] for name in attention.PROJECTIONS}
