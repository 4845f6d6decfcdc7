"""The vision-language MoE transformer (VLMo / VL-MoE multiway tower, LIMoE shared pool).

One pre-norm transformer tower is shared by images and captions (minivlmoe/tower.py:
``x = x + attention(LN1(x), mask)``, ``x = x + ffn_or_moe(LN2(x))``, then ``h = LN_f(x)``).

Expert modes (``ModelConfig.experts``; the layers at ``i % moe_every == moe_every - 1``
are the "MoE positions", as V-MoE's "every other layer")
---------------------------------------------------------------------------------------
* ``"shared"`` (LIMoE): every MoE position is one pool of E experts for both modalities.
* ``"modality"`` (VL-MoE): every MoE position has an image pool and a text pool (image
  tokens only go to image experts, text tokens to text experts), except the top
  ``fusion_layers`` layers, which use a dense vision-language FFN shared by both.
  ``moe_modalities`` places the experts (VL-MoE's Table 3): ``"both"`` (the default),
  ``"image"`` (image experts; the text tokens of a MoE position go through a dense FFN
  of width ``expert_hidden * top_k``) or ``"text"`` (the reverse).
* ``"dense"``: no MoE; the baseline for every comparison.

Active compute is matched: at a MoE position a token runs through K experts of hidden
width ``expert_hidden``, so every *dense* FFN at a MoE position (dense mode, and the
fusion layers of modality mode) has hidden width ``expert_hidden * top_k``; the other
layers use ``mlp_hidden`` in every mode.  Each token therefore does the same number of
multiply-adds in all three modes; only the number of stored parameters differs.

Two objectives, one sequence (minivlmoe/sequence.py, docs/architecture.md)
--------------------------------------------------------------------------
A batch of B image-caption pairs becomes one sequence per pair, ``[image | caption
input ids[:, :-1] | retrieval text ids]`` (S = 1+P + T-1 + T), whose block mask makes
the image segment the dual encoder's image tower, the caption segment the fusion
(captioning) model and the retrieval segment the dual encoder's text tower.

Heads and losses (docs/objectives.md)::

    img_emb = l2norm(img_proj(h[:, 0]))                 (B, De)  the final cls token
    txt_emb = l2norm(txt_proj(h[:, last non-pad]))      (B, De)  the retrieval text's eos
    contrastive = InfoNCE(img_emb, txt_emb, log_logit_scale, positives from duplicate keys)
    caption = CE(lm_head(h[:, caption rows]), ids[:, 1:], ignore_index=pad_id)
    aux = sum over MoE layers of the weighted auxiliary losses
    total = contrastive_weight * contrastive + caption_weight * caption + aux

``log_logit_scale`` is the log of the contrastive logits' scale, the *inverse*
temperature: temperature = exp(-log_logit_scale), about 0.07 at init (CLIP).

Backward is written out in :func:`backward` as the reverse call list, every residual
fork named; ``backward(dtotal, cache)`` takes the upstream gradient of the total loss
(1 in training), like every op's ``backward(dout, cache)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .ops import (attention, contrastive, cross_entropy, ffn, l2norm, layernorm, linear,
                  lowrank_linear, patch_embed, sparse_linear, token_embed)
from .moe import aux_losses, moe_layer
from ._checks import (check_bool, check_cache, check_finite_tree, check_grad, check_params,
                      checked_inputs)
from . import sequence, tower
from .model_config import check_config
from .timing import NULL_TIMER
from .tree import zeros_like

PARAM_KEYS = ("patch", "text", "blocks", "ln_f", "img_proj", "txt_proj", "log_logit_scale",
              "lm_head")


# ----------------------------------------------------------------------------- params

def init(rng, cfg):
    """Create the parameter tree.

    Returns
    -------
    params : {"patch": {"proj", "cls", "pos"}, "text": {"tok", "pos"},
              "blocks": {"0": {"ln1", "attn", "ln2", "ffn" | "moe"}, ...},
              "ln_f", "img_proj", "txt_proj", "log_logit_scale" (shape ()), "lm_head"};
        every linear layer is ``{"W", "b"}``, or ``{"A", "B", "b"}`` (the truncated SVD
        of its initial weight, minivlmoe/ops/lowrank_linear.py) at the dotted paths of
        ``cfg.lowrank``.  The generator draws the same numbers either way.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    check_config(cfg)
    dt, D = cfg.np_dtype, cfg.width
    params = {
        "patch": patch_embed.init(rng, cfg.image_size, cfg.patch, cfg.channels, D,
                                  cfg.density, dt),
        "text": token_embed.init(rng, cfg.vocab_size, cfg.max_text_len, D, dt),
        "blocks": {},
    }
    mcfg = cfg.moe_config()
    for i, (kind, hidden) in enumerate(cfg.layer_kinds()):
        block = {"ln1": layernorm.init(D, dt),
                 "attn": attention.init(rng, D, cfg.heads, cfg.density, dt),
                 "ln2": layernorm.init(D, dt)}
        if kind in ("moe", "split"):
            block["moe"] = moe_layer.init(rng, D, hidden, mcfg, cfg.density, dt)
        if kind == "split":                 # the other modality's dense FFN
            block["ffn"] = ffn.init(rng, D, hidden * cfg.top_k, cfg.density, dt)
        elif kind == "ffn":
            block["ffn"] = ffn.init(rng, D, hidden, cfg.density, dt)
        params["blocks"][str(i)] = block
    params["ln_f"] = layernorm.init(D, dt)
    params["img_proj"] = sparse_linear.init(rng, D, cfg.embed_dim, cfg.density, dt)
    params["txt_proj"] = sparse_linear.init(rng, D, cfg.embed_dim, cfg.density, dt)
    params["log_logit_scale"] = np.array(contrastive.LOG_LOGIT_SCALE_INIT, dtype=dt)
    params["lm_head"] = sparse_linear.init(rng, D, cfg.vocab_size, cfg.density, dt)
    if cfg.lowrank:                         # factored layers: the truncated SVD of each init
        params = lowrank_linear.factor_tree(params, cfg.lowrank)
    return params


# ----------------------------------------------------------------------------- training step

class Cache(NamedTuple):
    """Everything :func:`backward` needs.

    Fields
    ------
    cfg : ModelConfig.
    embed : sequence.EmbedCache (its ``layout`` holds the segment lengths).
    tower : tower.Cache.
    img_proj, img_norm, txt_proj, txt_norm, contrastive : retrieval head caches (or None);
        the projections' and ``lm_head``'s are linear caches (minivlmoe/ops/linear.py).
    txt_last : (B,) position of the pooled retrieval-text token inside its segment.
    lm_head, caption : captioning head caches (or None).
    params : the params (for the zero gradients of unused heads).
    """

    cfg: ModelConfig
    embed: sequence.EmbedCache
    tower: tower.Cache
    img_proj: sparse_linear.Cache | lowrank_linear.Cache | None
    img_norm: l2norm.Cache | None
    txt_proj: sparse_linear.Cache | lowrank_linear.Cache | None
    txt_norm: l2norm.Cache | None
    contrastive: contrastive.Cache | None
    txt_last: np.ndarray | None
    lm_head: sparse_linear.Cache | lowrank_linear.Cache | None
    caption: cross_entropy.Cache | None
    params: dict


def forward(params, cfg, images, ids, *, pad_id, keys=None, rng=None, train=False,
            all_losses=True, timer=NULL_TIMER):
    """Forward of the training objective (arguments as :func:`loss_and_grads`).

    Returns ``(losses, stats, cache)``, not ``(out, cache)``: the routing statistics
    are a second, non-differentiable output, as in ``tower.forward``.

    Returns
    -------
    losses : dict of floats (see :func:`loss_and_grads`).
    stats : routing statistics and the contrastive temperature (see :func:`loss_and_grads`).
    cache : Cache, for :func:`backward`; ``cache.img_norm.y`` and ``cache.txt_norm.y``
        are the (B, De) unit-norm retrieval embeddings of the batch.
    """
    check_config(cfg)
    check_bool("train", train)
    check_params("params", params, PARAM_KEYS)
    sequence.check_images(cfg, images)
    ids, pad_id = sequence.check_ids(cfg, ids, pad_id, min_len=2)
    B, T = ids.shape
    if images.shape[0] != B:
        raise ValueError(f"ids must have one row per image (B={images.shape[0]}), got "
                         f"{ids.shape[0]} rows")
    positives = None
    if keys is not None:
        keys = np.asarray(keys)
        if keys.shape != (B,):
            raise ValueError(f"keys must have shape (B,) = ({B},), got {keys.shape}")
        positives = contrastive.duplicate_positives(keys)         # (B, B)
    check_finite_tree("params", params)   # one scan per leaf: the ops inside skip theirs
    with checked_inputs():              # inputs checked in full: no scan at every op
        return _forward(params, cfg, images, ids, pad_id, positives, rng, train,
                        check_bool("all_losses", all_losses), timer)


def _forward(params, cfg, images, ids, pad_id, positives, rng, train, all_losses, timer):
    """:func:`forward` after its checks: ``(losses, stats, cache)``."""
    B = ids.shape[0]
    use_cap, use_ret = cfg.caption_weight > 0, cfg.contrastive_weight > 0

    # ---- embed: [image | caption input | retrieval text]
    with timer.section("embed"):
        seq, c_embed = sequence.embed(
            params, cfg, images, ids[:, :-1] if use_cap else None, ids if use_ret else None,
            pad_id, ids[:, 1:] != pad_id)                          # (B, S, D), (B, S, S)
    layout = seq.layout

    # ---- the tower
    h, aux_total, stats, c_tower = tower.forward(seq.x, seq.blocks, seq.modality, seq.rows,
                                                 params, cfg, rng=rng, train=train,
                                                 all_losses=all_losses,
                                                 timer=timer)     # (B, S, D)

    # ---- heads and losses
    losses = {"contrastive": 0.0, "caption": 0.0}
    c_ip = c_in = c_tp = c_tn = c_con = txt_last = c_lm = c_ce = None
    with timer.section("losses"):
        if use_ret:
            img_pool = h[:, 0]                                     # (B, D) final cls
            txt_last = sequence.last_valid(ids != pad_id)          # (B,)
            txt_pool = h[np.arange(B), layout.retrieval_slice.start + txt_last]  # (B, D) eos
            img_z, c_ip = linear.forward(img_pool, params["img_proj"])  # (B, De)
            img_emb, c_in = l2norm.forward(img_z)                  # (B, De)
            txt_z, c_tp = linear.forward(txt_pool, params["txt_proj"])  # (B, De)
            txt_emb, c_tn = l2norm.forward(txt_z)                  # (B, De)
            losses["contrastive"], c_con = contrastive.forward(
                img_emb, txt_emb, params["log_logit_scale"], positives)
        if use_cap:
            h_cap = h[:, layout.caption_slice]                     # (B, T-1, D)
            logits, c_lm = linear.forward(h_cap, params["lm_head"])  # (B, T-1, V)
            losses["caption"], c_ce = cross_entropy.forward(logits, ids[:, 1:], pad_id)
    losses["aux"] = float(aux_total)
    losses["total"] = (cfg.contrastive_weight * losses["contrastive"]
                       + cfg.caption_weight * losses["caption"] + losses["aux"])
    for name in aux_losses.AUX_LOSSES:     # all_losses=False: only the weighted ones
        if all(name in s["losses"] for s in stats.values()):
            losses[f"aux_{name}"] = float(sum(s["losses"][name] for s in stats.values()))
    stats = {"moe": stats,
             "temperature": float(np.exp(-params["log_logit_scale"])),
             "logit_scale": float(np.exp(params["log_logit_scale"])),
             "tokens": int(seq.rows.size)}
    cache = Cache(cfg=cfg, embed=c_embed, tower=c_tower, img_proj=c_ip, img_norm=c_in,
                  txt_proj=c_tp, txt_norm=c_tn, contrastive=c_con, txt_last=txt_last,
                  lm_head=c_lm, caption=c_ce, params=params)
    return losses, stats, cache


def backward(dtotal, cache, *, timer=NULL_TIMER):
    """The whole model's backward: the forward's call list in reverse.

    Parameters
    ----------
    dtotal : float, the upstream gradient of ``losses["total"]`` (1 in training).
    cache : Cache from :func:`forward`.
    timer : sections as in :func:`forward`.

    Returns the gradient of ``dtotal * losses["total"]`` keyed exactly like the params
    (the objectives enter with their weights, the aux losses with weight 1 since their
    own weights are inside ``aux_total``).
    """
    check_cache(cache, Cache)
    check_grad("dtotal", dtotal, ())
    cfg, layout = cache.cfg, cache.embed.layout
    B, S, D = cache.tower.shape
    grads = {}
    dh = np.zeros((B, S, D), dtype=cfg.np_dtype)                   # (B, S, D)
    with timer.section("losses"):
        # total = caption_weight * caption + ...
        if cache.caption is not None:
            dlogits = cross_entropy.backward(dtotal * cfg.caption_weight,
                                             cache.caption)        # (B, T-1, V)
            dh_cap, grads["lm_head"] = linear.backward(dlogits, cache.lm_head)
            dh[:, layout.caption_slice] = dh_cap                   # (B, T-1, D)
        # total = contrastive_weight * contrastive + ...
        if cache.contrastive is not None:
            dimg_emb, dtxt_emb, grads["log_logit_scale"] = contrastive.backward(
                dtotal * cfg.contrastive_weight, cache.contrastive)  # (B, De) x2, ()
            dtxt_z = l2norm.backward(dtxt_emb, cache.txt_norm)     # (B, De)
            dtxt_pool, grads["txt_proj"] = linear.backward(dtxt_z, cache.txt_proj)
            dimg_z = l2norm.backward(dimg_emb, cache.img_norm)     # (B, De)
            dimg_pool, grads["img_proj"] = linear.backward(dimg_z, cache.img_proj)
            eos = layout.retrieval_slice.start + cache.txt_last    # (B,) eos rows
            dh[np.arange(B), eos] += dtxt_pool                     # (B, D)
            dh[:, 0] += dimg_pool                                  # (B, D) cls rows
    # total = ... + aux: the tower's aux losses enter inside each MoE backward
    dx, grads["blocks"], grads["ln_f"] = tower.backward(dh, cache.tower, dtotal,
                                                        timer=timer)  # (B, S, D)
    with timer.section("embed"):
        grads["patch"], grads["text"] = sequence.embed_backward(dx, cache.embed)
    # heads that an objective with weight 0 never used get exact zeros
    for name in ("img_proj", "txt_proj", "log_logit_scale", "lm_head"):
        if name not in grads:
            grads[name] = zeros_like(cache.params[name])
    return {name: grads[name] for name in cache.params}


def loss_and_grads(params, cfg, images, ids, *, pad_id, keys=None, rng=None, train=True,
                   all_losses=True, timer=NULL_TIMER):
    """Losses, gradients of ``losses["total"]`` and routing statistics for one batch.

    Parameters
    ----------
    params : from :func:`init`.   cfg : ModelConfig.
    images : (B, R, R, Ch) in the model dtype.
    ids : (B, T) int captions ``bos w1 ... eos pad ...``, 2 <= T <= max_text_len.
    pad_id : int, the padding id (masked keys, ignored targets, not routed).
    keys : (B,) caption keys; equal keys are extra contrastive positives.  None: none.
    rng : numpy.random.Generator for the router noise (needed when train and
        router_noise > 0).
    train : bool, router noise on.
    all_losses : bool.  True: every auxiliary loss is computed and reported.  False:
        only those of non-zero weight (their sum, the gradient and ``losses["aux"]`` are
        the same; the ``aux_<name>`` keys of the others are absent): the training step.
    timer : object with a ``section(name)`` context manager (minivlmoe/timing.py);
        sections "embed", "attention", "ffn", "moe", "losses".

    Returns
    -------
    losses : dict of floats "total", "contrastive", "caption", "aux", "aux_<name>".
    grads : keyed exactly like ``params`` (sparse grads with the weights' patterns).
    stats : {"moe": {"blocks.i": {"dropped_fraction", "losses", "min_margin", "pools":
        {pool: {"capacity", "routed", "load", "usage" (2, E) image/text rows,
        "dropped_fraction"}}}}, "temperature" exp(-log_logit_scale), "logit_scale"
        exp(log_logit_scale), "tokens" U}.
    """
    losses, stats, cache = forward(params, cfg, images, ids, pad_id=pad_id, keys=keys, rng=rng,
                                   train=train, all_losses=all_losses, timer=timer)
    grads = backward(1.0, cache, timer=timer)
    return losses, grads, stats


def losses_only(params, cfg, images, ids, *, pad_id, keys=None, rng=None, train=False):
    """Forward only: the losses dict of :func:`loss_and_grads`."""
    losses, _, _ = forward(params, cfg, images, ids, pad_id=pad_id, keys=keys, rng=rng,
                           train=train)
    return losses
