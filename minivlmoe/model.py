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

import dataclasses
from typing import NamedTuple

import numpy as np

from .ops import (attention, contrastive, cross_entropy, ffn, l2norm, layernorm, patch_embed,
                  sparse_linear, token_embed)
from .moe import aux_losses, moe_config, moe_layer
from ._checks import (check_bool, check_cache, check_choice, check_float, check_grad, check_int,
                      check_params)
from . import sequence, tower
from .timing import NULL_TIMER
from .tree import zeros_like

EXPERT_MODES = ("modality", "shared", "dense")
MOE_MODALITIES = ("both", "image", "text")


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Every hyperparameter of the model (validated on construction).

    Fields
    ------
    image_size, patch, channels : images are (R, R, Ch) = (image_size, image_size,
        channels), cut into (image_size / patch)^2 patches.
    vocab_size : V >= 4, including the 4 special tokens.   max_text_len : Tmax, longest caption
        in tokens (bos ... eos), the size of the position table.
    width, heads, layers : D, H, number of blocks.
    mlp_hidden : hidden width of the dense FFNs at non-MoE positions.
    expert_hidden : hidden width F of one expert (None: ``mlp_hidden``); dense FFNs at
        MoE positions get ``expert_hidden * top_k`` so that active compute matches.
    experts : "modality" | "shared" | "dense" (module docstring).
    moe_modalities : "both" | "image" | "text", which modality has experts in
        "modality" mode (the other one: a dense FFN of width ``expert_hidden * top_k``).
    num_experts, top_k : E experts per pool, K experts per token.
    capacity_factor : float > 0, or None for dropless routing.
    moe_every : MoE at layers ``i % moe_every == moe_every - 1``.
    fusion_layers : in "modality" mode the top ``fusion_layers`` layers are dense.
    density : stored fraction of every sparse weight row.
    embed_dim : De, width of the retrieval embeddings.
    load_balance, z_loss, importance, entropy_local, entropy_global : weights of the
        auxiliary MoE losses (minivlmoe/moe/aux_losses.py).
    min_experts : LIMoE's global-entropy threshold log(min(min_experts, E)).
    router_noise : std of the router noise in training (0 = none).
    bpr : Batch Priority Routing.
    renormalize : "auto" (default), True or False: renormalize the top-k gates.  "auto"
        is raw probabilities for top_k = 1 (Switch, V-MoE) and renormalized for
        top_k >= 2 (GShard, Mixtral); stored as given, resolved by
        :func:`minivlmoe.moe.moe_config.resolve_renormalize`.  top_k = 1 with True is
        refused: every gate would be p/p = 1 and the router get no task gradient.
    task_blind_top1 : opt in to top_k = 1 with renormalize=True anyway (hash-like routing
        trained by the auxiliary losses alone, kept for comparison).  :meth:`from_dict`
        sets it for a run saved before the flag existed with top_k 1 and renormalize
        true, so such a run loads as it was trained.
    caption_weight, contrastive_weight : weights of the two objectives (>= 0, not both 0).
    dtype : "float32" or "float64".
    """

    image_size: int = 32
    patch: int = 8
    channels: int = 3
    vocab_size: int
    max_text_len: int
    width: int = 64
    heads: int = 4
    layers: int = 4
    mlp_hidden: int = 128
    expert_hidden: int | None = None
    experts: str = "modality"
    moe_modalities: str = "both"
    num_experts: int = 4
    top_k: int = 1
    capacity_factor: float | None = 1.25
    moe_every: int = 2
    fusion_layers: int = 1
    density: float = 1.0
    embed_dim: int = 64
    load_balance: float = 0.01
    z_loss: float = 0.001
    importance: float = 0.0
    entropy_local: float = 0.0
    entropy_global: float = 0.0
    min_experts: int = 2
    router_noise: float = 0.0
    bpr: bool = False
    renormalize: bool | str = "auto"
    task_blind_top1: bool = False
    caption_weight: float = 1.0
    contrastive_weight: float = 1.0
    dtype: str = "float32"

    def __post_init__(self):
        for name, low in (("image_size", 1), ("patch", 1), ("channels", 1), ("vocab_size", 4),
                          ("max_text_len", 2), ("width", 1), ("heads", 1), ("layers", 1),
                          ("mlp_hidden", 1), ("num_experts", 1), ("moe_every", 1),
                          ("fusion_layers", 0), ("embed_dim", 1), ("min_experts", 1)):
            check_int(name, getattr(self, name), low)
        if self.image_size % self.patch:
            raise ValueError(f"patch must divide image_size={self.image_size}, got {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"heads must divide width={self.width}, got {self.heads}")
        if self.expert_hidden is None:
            object.__setattr__(self, "expert_hidden", self.mlp_hidden)
        check_int("expert_hidden", self.expert_hidden, 1)
        check_choice("experts", self.experts, set(EXPERT_MODES))
        check_choice("moe_modalities", self.moe_modalities, set(MOE_MODALITIES))
        if self.moe_modalities != "both" and self.experts != "modality":
            raise ValueError(f"moe_modalities must be 'both' unless experts='modality', "
                             f"got {self.moe_modalities!r} with experts={self.experts!r}")
        check_int("top_k", self.top_k, 1, self.num_experts)
        if self.capacity_factor is not None:
            check_float("capacity_factor", self.capacity_factor, 0.0, low_open=True)
        check_int("fusion_layers", self.fusion_layers, 0, self.layers)
        check_float("density", self.density, 0.0, 1.0, low_open=True)
        for name in ("load_balance", "z_loss", "importance", "entropy_local",
                     "entropy_global", "router_noise", "caption_weight", "contrastive_weight"):
            check_float(name, getattr(self, name), 0.0)
        if self.caption_weight == 0 and self.contrastive_weight == 0:
            raise ValueError("caption_weight and contrastive_weight must not both be 0, "
                             "got 0 and 0")
        check_bool("bpr", self.bpr)
        if not isinstance(self.renormalize, str):
            object.__setattr__(self, "renormalize", check_bool("renormalize", self.renormalize))
        object.__setattr__(self, "task_blind_top1",
                           check_bool("task_blind_top1", self.task_blind_top1))
        moe_config.resolve_renormalize(self.renormalize, self.top_k, self.task_blind_top1)
        check_choice("dtype", self.dtype, {"float32", "float64"})

    # derived sizes
    @property
    def num_patches(self):
        """P = (image_size / patch)^2."""
        return (self.image_size // self.patch) ** 2

    @property
    def np_dtype(self):
        return np.dtype(self.dtype)

    def layer_kinds(self):
        """Per layer ``("moe" | "split" | "ffn", hidden width)`` (module docstring, active
        compute); "split" (``moe_modalities`` "image" or "text"): experts of that hidden
        width for one modality, a dense FFN of ``hidden * top_k`` for the other."""
        kinds = []
        for i in range(self.layers):
            moe_position = i % self.moe_every == self.moe_every - 1
            fusion = self.experts == "modality" and i >= self.layers - self.fusion_layers
            if not moe_position:
                kinds.append(("ffn", self.mlp_hidden))
            elif self.experts == "dense" or fusion:
                kinds.append(("ffn", self.expert_hidden * self.top_k))
            else:
                kinds.append(("moe" if self.moe_modalities == "both" else "split",
                              self.expert_hidden))
        return kinds

    def moe_config(self):
        """The :class:`minivlmoe.moe.moe_config.MoEConfig` shared by every MoE layer."""
        return moe_config.MoEConfig(
            num_experts=self.num_experts, k=self.top_k, capacity_factor=self.capacity_factor,
            renormalize=self.renormalize, task_blind_top1=self.task_blind_top1,
            bpr=bool(self.bpr), noise_std=self.router_noise,
            mode=("modality" if self.experts == "modality" and self.moe_modalities == "both"
                  else "shared"),           # a "split" layer's experts are one pool
            min_experts=self.min_experts,
            aux_weights={name: getattr(self, name) for name in
                         ("load_balance", "z_loss", "importance", "entropy_local",
                          "entropy_global")})

    def to_dict(self):
        """A JSON-able dict of every field but ``task_blind_top1``, which is implied:
        it is True exactly when top_k is 1 and renormalize is True (the only configs
        that may set it), so a run with it writes the same dict a run saved before the
        flag existed did, and both load (and resume) alike."""
        d = dataclasses.asdict(self)
        del d["task_blind_top1"]
        return d

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        A dict without ``task_blind_top1`` that has top_k 1 and renormalize true (a run
        of the task-blind opt-in, or one saved before renormalize="auto" was the
        default, when every preset was top-1 renormalized) gets
        ``task_blind_top1=True``: it loads as it was trained.
        """
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"d has unknown ModelConfig fields {unknown}; known: {sorted(known)}")
        if ("task_blind_top1" not in d and d.get("renormalize") is True
                and d.get("top_k", 1) == 1):
            d = {**d, "task_blind_top1": True}      # implied (to_dict leaves it out)
        return cls(**d)


PARAM_KEYS = ("patch", "text", "blocks", "ln_f", "img_proj", "txt_proj", "log_logit_scale",
              "lm_head")


def check_config(cfg):
    """``cfg`` must be a ModelConfig."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    return cfg


# ----------------------------------------------------------------------------- params

def init(rng, cfg):
    """Create the parameter tree.

    Returns
    -------
    params : {"patch": {"proj", "cls", "pos"}, "text": {"tok", "pos"},
              "blocks": {"0": {"ln1", "attn", "ln2", "ffn" | "moe"}, ...},
              "ln_f", "img_proj", "txt_proj", "log_logit_scale" (shape ()), "lm_head"}
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
    return params


# ----------------------------------------------------------------------------- training step

class Cache(NamedTuple):
    """Everything :func:`backward` needs.

    Fields
    ------
    cfg : ModelConfig.
    embed : sequence.EmbedCache (its ``layout`` holds the segment lengths).
    tower : tower.Cache.
    img_proj, img_norm, txt_proj, txt_norm, contrastive : retrieval head caches (or None).
    txt_last : (B,) position of the pooled retrieval-text token inside its segment.
    lm_head, caption : captioning head caches (or None).
    params : the params (for the zero gradients of unused heads).
    """

    cfg: ModelConfig
    embed: sequence.EmbedCache
    tower: tower.Cache
    img_proj: sparse_linear.Cache | None
    img_norm: l2norm.Cache | None
    txt_proj: sparse_linear.Cache | None
    txt_norm: l2norm.Cache | None
    contrastive: contrastive.Cache | None
    txt_last: np.ndarray | None
    lm_head: sparse_linear.Cache | None
    caption: cross_entropy.Cache | None
    params: dict


def forward(params, cfg, images, ids, *, pad_id, keys=None, rng=None, train=False,
            timer=NULL_TIMER):
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
    use_cap, use_ret = cfg.caption_weight > 0, cfg.contrastive_weight > 0

    # ---- embed: [image | caption input | retrieval text]
    with timer.section("embed"):
        seq, c_embed = sequence.embed(
            params, cfg, images, ids[:, :-1] if use_cap else None, ids if use_ret else None,
            pad_id, ids[:, 1:] != pad_id)                          # (B, S, D), (B, S, S)
    layout = seq.layout

    # ---- the tower
    h, aux_total, stats, c_tower = tower.forward(seq.x, seq.mask, seq.modality, seq.rows,
                                                 params, cfg, rng=rng, train=train,
                                                 timer=timer)     # (B, S, D)

    # ---- heads and losses
    losses = {"contrastive": 0.0, "caption": 0.0}
    c_ip = c_in = c_tp = c_tn = c_con = txt_last = c_lm = c_ce = None
    with timer.section("losses"):
        if use_ret:
            img_pool = h[:, 0]                                     # (B, D) final cls
            txt_last = sequence.last_valid(ids != pad_id)          # (B,)
            txt_pool = h[np.arange(B), layout.retrieval_slice.start + txt_last]  # (B, D) eos
            img_z, c_ip = sparse_linear.forward(img_pool, params["img_proj"])  # (B, De)
            img_emb, c_in = l2norm.forward(img_z)                  # (B, De)
            txt_z, c_tp = sparse_linear.forward(txt_pool, params["txt_proj"])  # (B, De)
            txt_emb, c_tn = l2norm.forward(txt_z)                  # (B, De)
            losses["contrastive"], c_con = contrastive.forward(
                img_emb, txt_emb, params["log_logit_scale"], positives)
        if use_cap:
            h_cap = h[:, layout.caption_slice]                     # (B, T-1, D)
            logits, c_lm = sparse_linear.forward(h_cap, params["lm_head"])  # (B, T-1, V)
            losses["caption"], c_ce = cross_entropy.forward(logits, ids[:, 1:], pad_id)
    losses["aux"] = float(aux_total)
    losses["total"] = (cfg.contrastive_weight * losses["contrastive"]
                       + cfg.caption_weight * losses["caption"] + losses["aux"])
    for name in aux_losses.AUX_LOSSES:
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
            dh_cap, grads["lm_head"] = sparse_linear.backward(dlogits, cache.lm_head)
            dh[:, layout.caption_slice] = dh_cap                   # (B, T-1, D)
        # total = contrastive_weight * contrastive + ...
        if cache.contrastive is not None:
            dimg_emb, dtxt_emb, grads["log_logit_scale"] = contrastive.backward(
                dtotal * cfg.contrastive_weight, cache.contrastive)  # (B, De) x2, ()
            dtxt_z = l2norm.backward(dtxt_emb, cache.txt_norm)     # (B, De)
            dtxt_pool, grads["txt_proj"] = sparse_linear.backward(dtxt_z, cache.txt_proj)
            dimg_z = l2norm.backward(dimg_emb, cache.img_norm)     # (B, De)
            dimg_pool, grads["img_proj"] = sparse_linear.backward(dimg_z, cache.img_proj)
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
                   timer=NULL_TIMER):
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
                                   train=train, timer=timer)
    grads = backward(1.0, cache, timer=timer)
    return losses, grads, stats


def losses_only(params, cfg, images, ids, *, pad_id, keys=None, rng=None, train=False):
    """Forward only: the losses dict of :func:`loss_and_grads`."""
    losses, _, _ = forward(params, cfg, images, ids, pad_id=pad_id, keys=keys, rng=rng,
                           train=train)
    return losses
