"""Inference with a trained model: retrieval embeddings and greedy captions, in batches.

Every function runs the tower in eval mode (no router noise) on the sequence its job
needs (minivlmoe/sequence.py), never on the whole training sequence:

* :func:`encode_images` -- the image segment alone (full attention)::

      img_emb = l2norm(img_proj(h[:, 0]))                      (B, De)   the final cls

* :func:`encode_texts` -- the retrieval text alone (key-padding mask)::

      txt_emb = l2norm(txt_proj(h[:, last non-pad]))           (B, De)   the eos token

* :func:`greedy_decode` -- ``[image | ids so far]`` with the prefix-causal block mask,
  re-run at every time step; the argmax of the last position's logits is appended.

* :func:`route` -- one eval-mode forward of the training sequence and the routing
  decisions of every MoE layer (:func:`routing_decisions`: per token the chosen
  experts, whether each got a slot, the router entropy), read from the caches.

Because image rows never see text and retrieval rows never see the image, these are
exactly the embeddings of the training sequence (with dropless routing; see
tests/test_model.py::test_dual_encoder_equals_separate_towers).

Batching happens here and only here: each function cuts its B items into consecutive
chunks of ``batch_size`` (default 256, which bounds the (b, H, S, S) attention memory),
runs each chunk, and concatenates.  With a finite capacity factor the tokens of a chunk
compete for expert slots, so ``batch_size`` is part of what is computed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import check_int, check_params
from .model import PARAM_KEYS
from .model_config import check_config
from .ops import l2norm, linear, patch_embed, token_embed
from . import model, sequence, tower

BATCH_SIZE = 256


def _batched(fn, items, batch_size):
    """``fn(chunk)`` over consecutive ``batch_size`` chunks of ``items``, concatenated."""
    batch_size = check_int("batch_size", batch_size, 1)
    return np.concatenate([fn(items[start:start + batch_size])
                           for start in range(0, items.shape[0], batch_size)])


def encode_images(params, cfg, images, *, batch_size=BATCH_SIZE):
    """Unit-norm retrieval embeddings (B, De) of images (B, R, R, Ch) alone."""
    check_config(cfg)
    check_params("params", params, PARAM_KEYS)
    sequence.check_images(cfg, images)

    def encode(chunk):                                             # (b, R, R, Ch)
        x, _ = patch_embed.forward(chunk, params["patch"], cfg.patch)  # (b, 1+P, D)
        modality = np.full(x.shape[0] * x.shape[1], sequence.IMAGE,
                           dtype=np.int64)                         # (b*(1+P),)
        h, _, _, _ = tower.forward(x, None, modality, None, params, cfg)  # (b, 1+P, D)
        z, _ = linear.forward(h[:, 0], params["img_proj"])     # (b, De)
        emb, _ = l2norm.forward(z)                                 # (b, De)
        return emb

    return _batched(encode, images, batch_size)                    # (B, De)


def encode_texts(params, cfg, ids, *, pad_id, batch_size=BATCH_SIZE):
    """Unit-norm retrieval embeddings (B, De) of token ids (B, T) alone."""
    check_config(cfg)
    check_params("params", params, PARAM_KEYS)
    ids, pad_id = sequence.check_ids(cfg, ids, pad_id)

    def encode(chunk):                                             # (b, T)
        b, T = chunk.shape
        x, _ = token_embed.forward(chunk, params["text"])          # (b, T, D)
        valid = chunk != pad_id                                    # (b, T)
        mask = valid[:, None, :]                                   # (b, 1, T) key padding
        modality = np.full(b * T, sequence.TEXT, dtype=np.int64)   # (b*T,)
        rows = np.flatnonzero(valid.reshape(-1))                   # (U,)
        h, _, _, _ = tower.forward(x, mask, modality, rows, params, cfg)  # (b, T, D)
        pooled = h[np.arange(b), sequence.last_valid(valid)]       # (b, D)
        z, _ = linear.forward(pooled, params["txt_proj"])      # (b, De)
        emb, _ = l2norm.forward(z)                                 # (b, De)
        return emb

    return _batched(encode, ids, batch_size)                       # (B, De)


def greedy_decode(params, cfg, images, *, bos_id, eos_id, pad_id, max_len,
                  batch_size=BATCH_SIZE):
    """Greedy captions (B, max_len): ``bos w1 ... eos pad ...``.

    Each step re-runs the fusion sequence [image | ids so far] with the prefix-causal
    mask (:func:`minivlmoe.sequence.embed` without a retrieval segment) and appends the
    argmax of the last position's logits over every token but ``pad_id`` and
    ``bos_id``; after a row emits ``eos`` it is filled with ``pad_id``.  Vectorized over
    a chunk; the loop is over time steps, and ends when every row of the chunk is done.
    """
    check_config(cfg)
    check_params("params", params, PARAM_KEYS)
    sequence.check_images(cfg, images)
    V = cfg.vocab_size
    bos_id = check_int("bos_id", bos_id, 0, V - 1)
    eos_id = check_int("eos_id", eos_id, 0, V - 1)
    pad_id = check_int("pad_id", pad_id, 0, V - 1)
    max_len = check_int("max_len", max_len, 2, cfg.max_text_len)

    def decode(chunk):                                             # (b, R, R, Ch)
        b = chunk.shape[0]
        out = np.full((b, max_len), pad_id, dtype=np.int64)        # (b, max_len)
        out[:, 0] = bos_id
        done = np.zeros(b, dtype=bool)                             # (b,)
        for t in range(1, max_len):
            seq, _ = sequence.embed(params, cfg, chunk, out[:, :t], None,
                                    pad_id)                        # (b, 1+P+t, D)
            h, _, _, _ = tower.forward(seq.x, seq.blocks, seq.modality, seq.rows, params,
                                       cfg)                        # (b, S, D)
            logits, _ = linear.forward(h[:, -1], params["lm_head"])  # (b, V)
            logits[:, [pad_id, bos_id]] = -np.inf                  # never generated
            nxt = np.argmax(logits, axis=1)                        # (b,)
            out[:, t] = np.where(done, pad_id, nxt)
            done |= nxt == eos_id
            if done.all():
                break
        return out

    return _batched(decode, images, batch_size)                    # (B, max_len)


class PoolRouting(NamedTuple):
    """The routing decisions of one expert pool of one MoE layer (read from its cache).

    Fields
    ------
    tokens : (N_p,) int, flat index ``b*S + s`` of each of the pool's tokens in the
        (B, S) sequence batch (pad rows are never routed, so never listed).
    experts : (N_p, K) int, the chosen experts, best first (``experts[:, 0]``: top-1).
    kept : (N_p, K) bool, the assignment got a capacity slot (False: dropped).
    entropy : (N_p,) float, the router's entropy ``-sum_e p log p`` per token (nats).
    """

    tokens: np.ndarray
    experts: np.ndarray
    kept: np.ndarray
    entropy: np.ndarray


def routing_decisions(tower_cache, k):
    """Per MoE layer and pool, the :class:`PoolRouting` a tower forward decided.

    Nothing is recomputed: the experts and kept flags are the dispatch plan's, the
    entropy comes from the router's softmax, all read from the cache of
    :func:`minivlmoe.tower.forward` (``k``: experts per token, for an idle pool's shape).

    Returns
    -------
    dict "blocks.i" -> {pool name: PoolRouting}, MoE layers only, in layer order.
    """
    rows = tower_cache.rows                                        # (U,) or None (all N)
    out = {}
    for i, block in enumerate(tower_cache.blocks):
        if block.kind != "moe":
            continue
        pools = {}
        for name, index, pool, _params in block.mix.pools:         # moe_layer.Cache.pools
            if pool is None:                                       # the pool got no token
                pools[name] = PoolRouting(np.zeros(0, np.int64), np.zeros((0, k), np.int64),
                                          np.zeros((0, k), bool), np.zeros(0))
                continue
            u = np.arange(pool.dispatch.plan.kept.shape[0]) if index is None else index  # (N_p,)
            tokens = u if rows is None else rows[u]                # (N_p,) flat b*S + s
            p = pool.router.softmax.p.astype(np.float64)           # (N_p, E)
            entropy = -(p * np.log(np.maximum(p, np.finfo(np.float64).tiny))).sum(axis=1)
            pools[name] = PoolRouting(tokens=np.asarray(tokens, np.int64),
                                      experts=pool.dispatch.plan.experts,
                                      kept=pool.dispatch.plan.kept, entropy=entropy)
        out[f"blocks.{i}"] = pools
    return out


def route(params, cfg, images, ids, *, pad_id, keys=None):
    """One eval-mode forward of the training sequence on a batch, and its routing.

    Parameters
    ----------
    params, cfg : the model.   images : (B, R, R, Ch).   ids : (B, T) captions.
    pad_id : the padding id.   keys : (B,) caption keys, or None.

    Returns
    -------
    layout : sequence.Layout of the (B, S) sequences (segments: image, caption, retrieval).
    decisions : :func:`routing_decisions` of that forward.
    stats : the model's statistics of the same forward (``stats["moe"]``: the MoE
        layers' own counts, e.g. ``routed`` per pool).
    """
    _, stats, cache = model.forward(params, cfg, images, ids, pad_id=pad_id, keys=keys,
                                    rng=None, train=False)
    return cache.embed.layout, routing_decisions(cache.tower, cfg.top_k), stats
