"""The tower: pre-norm transformer blocks and the final layer norm, shared by both modalities.

Forward (per block i, then LN_f)::

    a_in = LN1(x)                                   (B, S, D)
    x1   = x + attention(a_in, mask)                (B, S, D)   residual
    f_in = LN2(x1[rows])                            (U, D)      the used (non-pad) rows only
    f    = F(f_in)                                  (U, D)      dense FFN, or MoE (+ aux)
    x2   = x1 + scatter_rows(f)                     (B, S, D)   residual; pad rows: x1
    h    = LN_f(x_L)                                (B, S, D)   after the last block

``F`` is the block's kind (``ModelConfig.layer_kinds``): a dense FFN, or a MoE layer that
also returns its weighted auxiliary losses; ``aux_total`` sums them over the MoE layers.
A "split" block (``moe_modalities`` "image" or "text") sends the rows of that modality
through a one-pool MoE layer and the other rows through a dense FFN::

    f[on]  = MoE(f_in[on])        on  = rows of the expert modality
    f[off] = FFN(f_in[off])       off = the other rows      (backward: the same split)
Padding rows skip ``F`` (module docstring of minivlmoe/sequence.py says why).

Backward: the reverse call list, every residual fork named::

    dx = LN_f.backward(dh)
    for each block, last first:
        dx1_resid = dx2                              x2 = x1 + scatter_rows(f): fork
        df_in     = F.backward(dx2[rows])            MoE: its aux losses enter with daux_total
        dx1       = dx1_resid + scatter_rows(LN2.backward(df_in))      forks join
        dx_resid  = dx1                              x1 = x + attention(a_in): fork
        dx        = dx_resid + LN1.backward(attention.backward(dx1))   forks join

Statistics: each MoE layer reports its routing statistics and its router margin (the
smallest gap between the K-th and (K+1)-th router logit over its tokens), which the
gradient tests use to stay away from routing ties.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import check_bool
from .ops import attention, ffn, layernorm, segment_attention
from .moe import moe_config, moe_layer, router
from .timing import NULL_TIMER
from .tree import zeros_like

LN_EPS = 1e-5


class BlockCache(NamedTuple):
    """Caches of one block.

    Fields
    ------
    ln1, attn, ln2 : the layernorm / attention caches.
    kind : "ffn" or "moe".
    mix : the ffn.Cache or moe_layer.Cache of the FFN sublayer (on the used rows).
    """

    ln1: layernorm.Cache
    attn: attention.Cache | segment_attention.Cache
    ln2: layernorm.Cache
    kind: str
    mix: object


class SplitCache(NamedTuple):
    """The FFN sublayer of a "split" block.

    Fields
    ------
    on, off : positions (among the U used rows) of the expert modality's rows and of the
        others.
    moe, ffn : the moe_layer.Cache / ffn.Cache of those rows (None when there are none).
    params : the block's params (the zero gradient of a sublayer that saw no rows).
    """

    on: np.ndarray
    off: np.ndarray
    moe: object
    ffn: object
    params: dict


class Cache(NamedTuple):
    """What :func:`backward` needs.

    Fields
    ------
    blocks : list of BlockCache, one per block.
    ln_f : the final layernorm cache.
    rows : (U,) flat indices of the tokens the FFN/MoE sublayers saw (None = all N).
    shape : (B, S, D).
    """

    blocks: list
    ln_f: layernorm.Cache
    rows: np.ndarray | None
    shape: tuple


def _router_margin(moe_cache, k):
    """Smallest gap between the k-th and (k+1)-th router logit over the layer's tokens
    (inf when k = E): routing cannot change under a perturbation of the logits smaller
    than half of it.  Logit gaps equal log-probability gaps, so it is read from p."""
    gaps = [np.inf]
    for _name, _index, pool, _params in moe_cache.pools:   # PoolCache, or None if idle
        if pool is not None:
            logp = np.log(np.maximum(pool.router.softmax.p, np.finfo(np.float64).tiny))
            gaps.append(float(np.min(router.margin(logp, k), initial=np.inf)))
    return min(gaps)


def _moe_stats(aux, margin):
    """Plain (JSON-able) statistics of one MoE layer."""
    pools = {}
    for name, st in aux.stats.items():
        pools[name] = {"capacity": int(st.capacity), "routed": st.routed.tolist(),
                       "load": st.load.tolist(),
                       "usage": None if st.usage is None else st.usage.tolist(),
                       "dropped_fraction": float(st.dropped_fraction)}
    return {"dropped_fraction": float(aux.dropped_fraction),
            "losses": {k: float(v) for k, v in aux.losses.items()},
            "min_margin": margin, "pools": pools}


def _split_forward(f_rows, p, cfg, mcfg, mod_rows, *, rng, train, all_losses):
    """A "split" block's FFN sublayer: ``(f, aux_total, stats or None, SplitCache)``."""
    expert_id = moe_config.MODALITIES.index(cfg.moe_modalities)   # 0 image, 1 text
    on = np.flatnonzero(mod_rows == expert_id)                     # (on.size,)
    off = np.flatnonzero(mod_rows != expert_id)                    # (off.size,)
    f = np.zeros_like(f_rows)                                      # (U, D)
    aux_total, stat, c_moe, c_ffn = 0.0, None, None, None
    if on.size:
        f[on], aux, c_moe = moe_layer.forward(f_rows[on], p["moe"], mcfg, mod_rows[on],
                                              rng=rng, train=train,
                                              all_losses=all_losses)  # (on.size, D)
        aux_total = aux.aux_total
        stat = _moe_stats(aux, _router_margin(c_moe, cfg.top_k))
        stat["pools"] = {cfg.moe_modalities: stat["pools"]["shared"]}   # the one pool
    if off.size:
        f[off], c_ffn = ffn.forward(f_rows[off], p["ffn"])         # (off.size, D)
    return f, aux_total, stat, SplitCache(on=on, off=off, moe=c_moe, ffn=c_ffn, params=p)


def _split_backward(df, cache, daux_total):
    """Reverse of :func:`_split_forward`: ``(df_rows, dmoe, dffn)``."""
    df_rows = np.zeros_like(df)                                    # (U, D)
    if cache.moe is not None:
        df_rows[cache.on], dmoe = moe_layer.backward(df[cache.on], cache.moe,
                                                     daux_total)   # (on.size, D)
    else:
        dmoe = zeros_like(cache.params["moe"])
    if cache.ffn is not None:
        df_rows[cache.off], dffn = ffn.backward(df[cache.off], cache.ffn)  # (off.size, D)
    else:
        dffn = zeros_like(cache.params["ffn"])
    return df_rows, dmoe, dffn


def _attention(a_in, params, heads, mask):
    """Attention by segments when ``mask`` is a tuple of segment_attention.Block (the
    model's sequences), masked attention when it is a bool array or None."""
    if isinstance(mask, tuple):
        return segment_attention.forward(a_in, params, heads, mask)   # (B, S, D)
    return attention.forward(a_in, params, heads, mask)               # (B, S, D)


def _attention_backward(dy, cache):
    if isinstance(cache, segment_attention.Cache):
        return segment_attention.backward(dy, cache)
    return attention.backward(dy, cache)


def forward(x, mask, modality, rows, params, cfg, *, rng=None, train=False, all_losses=True,
            timer=NULL_TIMER):
    """All blocks and the final layer norm.

    Returns ``(h, aux_total, stats, cache)``, not ``(out, cache)``: like
    ``moe_layer.forward``, the summed aux loss is a second output (its upstream gradient
    is :func:`backward`'s ``daux_total``) and the statistics a non-differentiable one.

    Parameters
    ----------
    x : (B, S, D) embedded tokens.
    mask : the attention mask: a tuple of segment_attention.Block (attention by
        segments: the model's sequences, ``Sequence.blocks``), or a bool array
        broadcastable to (B, S, S), or None (full attention).
    modality : (N,) int, 0 image / 1 text per flattened token (N = B*S).
    rows : (U,) int flat indices of the tokens that go through the FFN/MoE sublayers,
        or None for all N.
    params : the model params (``"blocks"`` and ``"ln_f"`` are used).   cfg : ModelConfig.
    rng, train : router noise (MoE layers only).
    all_losses : False computes only the auxiliary losses of non-zero weight
        (``moe_layer.forward``); the statistics then report only those.
    timer : sections "attention", "ffn", "moe" (minivlmoe/timing.py).

    Returns
    -------
    h : (B, S, D) final hidden states (after LN_f).
    aux_total : float, the summed weighted aux losses of the MoE layers.
    stats : dict "blocks.i" -> MoE layer statistics.
    cache : Cache
    """
    check_bool("train", train)
    B, S, D = x.shape
    N = B * S
    mcfg = cfg.moe_config()
    mod_rows = modality if rows is None else modality[rows]      # (U,)
    aux_total, stats, caches = 0.0, {}, []
    for i, (kind, _) in enumerate(cfg.layer_kinds()):
        p = params["blocks"][str(i)]
        with timer.section("attention"):
            a_in, c_ln1 = layernorm.forward(x, p["ln1"], LN_EPS)   # (B, S, D)
            a, c_attn = _attention(a_in, p["attn"], cfg.heads, mask)  # (B, S, D)
            x1 = x + a                                             # (B, S, D) residual
        with timer.section(kind):
            x1_rows = x1.reshape(N, D)                             # (N, D) 'b s d -> (b s) d'
            if rows is not None:
                x1_rows = x1_rows[rows]                            # (U, D) used tokens
            f_rows, c_ln2 = layernorm.forward(x1_rows, p["ln2"], LN_EPS)  # (U, D) row-wise
            if kind == "moe":
                f, aux, c_mix = moe_layer.forward(f_rows, p["moe"], mcfg, mod_rows,
                                                  rng=rng, train=train,
                                                  all_losses=all_losses)  # (U, D)
                aux_total += aux.aux_total
                stats[f"blocks.{i}"] = _moe_stats(aux, _router_margin(c_mix, cfg.top_k))
            elif kind == "split":
                f, aux_split, stat, c_mix = _split_forward(f_rows, p, cfg, mcfg, mod_rows,
                                                           rng=rng, train=train,
                                                           all_losses=all_losses)  # (U, D)
                aux_total += aux_split
                if stat is not None:
                    stats[f"blocks.{i}"] = stat
            else:
                f, c_mix = ffn.forward(f_rows, p["ffn"])           # (U, D)
            x2 = x1.reshape(N, D).copy()                           # (N, D)
            if rows is None:
                x2 += f                                            # (N, D) residual
            else:
                x2[rows] += f                                      # (U, D) residual, rows distinct
            x = x2.reshape(B, S, D)                                # (B, S, D)
        caches.append(BlockCache(ln1=c_ln1, attn=c_attn, ln2=c_ln2, kind=kind, mix=c_mix))
    h, c_lnf = layernorm.forward(x, params["ln_f"], LN_EPS)        # (B, S, D)
    return h, aux_total, stats, Cache(blocks=caches, ln_f=c_lnf, rows=rows, shape=(B, S, D))


def backward(dh, cache, daux_total=1.0, *, timer=NULL_TIMER):
    """Reverse of :func:`forward` (module docstring: every residual fork named).

    Parameters
    ----------
    dh : (B, S, D) upstream gradient of ``h``.
    cache : Cache from :func:`forward`.
    daux_total : upstream gradient of ``aux_total`` (1 when it is added to the loss).
    timer : sections "attention", "ffn", "moe".

    Returns
    -------
    dx : (B, S, D) gradient of the embedded tokens.
    dblocks : {"0": {"ln1", "attn", "ln2", "ffn" | "moe"}, ...} and dln_f : {"gamma", "beta"}.
    """
    B, S, D = cache.shape
    N = B * S
    rows = cache.rows
    # h = LN_f(x)
    dx, dln_f = layernorm.backward(dh, cache.ln_f)                 # (B, S, D)
    dblocks = {}
    for i in reversed(range(len(cache.blocks))):
        c = cache.blocks[i]
        g = {}
        with timer.section(c.kind):
            # x2 = x1 + scatter_rows(f): fork into the residual and the FFN branch
            dx2 = dx.reshape(N, D)                                 # (N, D)
            dx1_resid = dx2                                        # (N, D) residual branch
            df = dx2 if rows is None else dx2[rows]                # (U, D) FFN branch
            if c.kind == "moe":
                df_rows, g["moe"] = moe_layer.backward(df, c.mix, daux_total)  # (U, D)
            elif c.kind == "split":
                df_rows, g["moe"], g["ffn"] = _split_backward(df, c.mix, daux_total)  # (U, D)
            else:
                df_rows, g["ffn"] = ffn.backward(df, c.mix)        # (U, D)
            # f_in = LN2(x1[rows])
            dx1_ln, g["ln2"] = layernorm.backward(df_rows, c.ln2)  # (U, D)
            dx1 = dx1_resid.copy()                                 # (N, D)
            if rows is None:
                dx1 += dx1_ln                                      # (N, D) forks join
            else:
                dx1[rows] += dx1_ln                                # (U, D) forks join, rows distinct
            dx1 = dx1.reshape(B, S, D)                             # (B, S, D)
        with timer.section("attention"):
            # x1 = x + attn(a_in): fork into the residual and the attention branch
            dx_resid = dx1                                         # (B, S, D)
            da_in, g["attn"] = _attention_backward(dx1, c.attn)    # (B, S, D)
            # a_in = LN1(x)
            dx_ln, g["ln1"] = layernorm.backward(da_in, c.ln1)     # (B, S, D)
            dx = dx_resid + dx_ln                                  # (B, S, D) forks join
        dblocks[str(i)] = {k: g[k] for k in ("ln1", "attn", "ln2", "ffn", "moe") if k in g}
    dblocks = {str(i): dblocks[str(i)] for i in range(len(cache.blocks))}
    return dx, dblocks, dln_f
