"""The vision-language MoE transformer (VLMo / VL-MoE multiway tower, LIMoE shared pool).

One pre-norm transformer tower is shared by images and captions.  Its blocks are::

    x = x + attention(LN1(x), mask)           self-attention over every token of the sequence
    x = x + ffn_or_moe(LN2(x))                a dense FFN, or a sparse Mixture-of-Experts
    h = LN_f(x)                               after the last block

Expert modes (``ModelConfig.experts``; the layers at ``i % moe_every == moe_every - 1``
are the "MoE positions", as V-MoE's "every other layer")
---------------------------------------------------------------------------------------
* ``"shared"`` (LIMoE): every MoE position is one pool of E experts for both modalities.
* ``"modality"`` (VL-MoE): every MoE position has an image pool and a text pool (image
  tokens only go to image experts, text tokens to text experts), except the top
  ``fusion_layers`` layers, which use a dense vision-language FFN shared by both.
* ``"dense"``: no MoE; the baseline for every comparison.

Active compute is matched: at a MoE position a token runs through K experts of hidden
width ``expert_hidden``, so every *dense* FFN at a MoE position (dense mode, and the
fusion layers of modality mode) has hidden width ``expert_hidden * top_k``; the other
layers use ``mlp_hidden`` in every mode.  Each token therefore does the same number of
multiply-adds in all three modes; only the number of stored parameters differs.

Two objectives, one sequence (docs/architecture.md draws it)
--------------------------------------------------------------
A training batch of B image-caption pairs becomes ONE sequence per pair::

    [ image: cls + P patches | caption input ids[:, :-1] | retrieval text ids ]
      segment 0 (1+P)          segment 1 (T-1)              segment 2 (T)

with a block mask (True = may attend):

* image rows see the image only (bidirectional): the dual-encoder image tower;
* caption rows see the whole image and the caption up to themselves (prefix-causal,
  prefix = 1+P): the fusion (captioning) model;
* retrieval-text rows see the valid (non-pad) retrieval text only (bidirectional):
  the dual-encoder text tower.

So the image is encoded once and serves both objectives (image rows never look at
text, so their states are exactly those of "the image alone through the tower"), and
every MoE layer sees the image and text tokens of the batch in one call (as LIMoE
routes both modalities in one batch).  Padding rows are not sent through the FFN/MoE
(they would occupy expert capacity and count in the load-balancing loss); their
output is the residual only, and no valid row ever attends to them.

Heads and losses (docs/objectives.md)::

    img_emb = l2norm(img_proj(h[:, 0]))                 the final cls token
    txt_emb = l2norm(txt_proj(h[:, last non-pad]))      the retrieval text's eos token
    contrastive = InfoNCE(img_emb, txt_emb, log_logit_scale, positives from duplicate keys)
    caption = CE(lm_head(h[:, caption rows]), ids[:, 1:], ignore_index=pad_id)
    aux = sum over MoE layers of the weighted auxiliary losses
    total = contrastive_weight * contrastive + caption_weight * caption + aux

``log_logit_scale`` is the log of the contrastive logits' scale, the *inverse*
temperature: temperature = exp(-log_logit_scale), about 0.07 at init (CLIP).

Backward is written out in :func:`backward` as the reverse call list, with every
residual fork named.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from .ops import attention, contrastive, cross_entropy, ffn, l2norm, layernorm, patch_embed, sparse_linear, token_embed
from .moe import aux_losses, moe_layer, router
from ._checks import check_array, check_choice, check_float, check_int
from . import tree
from .timing import NULL_TIMER
from .tree import flatten, unflatten, with_values, zeros_like

EXPERT_MODES = ("modality", "shared", "dense")
IMAGE, TEXT = 0, 1           # modality ids (moe_layer.MODALITIES order)
SEG_IMAGE, SEG_CAPTION, SEG_RETRIEVAL = 0, 1, 2
LN_EPS = 1e-5
_ENCODE_CHUNK = 256          # items per forward in encode_* (bounds the (B, H, S, S) memory)


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Every hyperparameter of the model (validated on construction).

    Fields
    ------
    image_size, patch, channels : images are (R, R, Ch) = (image_size, image_size,
        channels), cut into (image_size / patch)^2 patches.
    vocab_size : V, including the special tokens.   max_text_len : Tmax, longest caption
        in tokens (bos ... eos), the size of the position table.
    width, heads, layers : D, H, number of blocks.
    mlp_hidden : hidden width of the dense FFNs at non-MoE positions.
    expert_hidden : hidden width F of one expert (None: ``mlp_hidden``); dense FFNs at
        MoE positions get ``expert_hidden * top_k`` so that active compute matches.
    experts : "modality" | "shared" | "dense" (module docstring).
    num_experts, top_k : E experts per pool, K experts per token.
    capacity_factor : float > 0, or None for dropless routing.
    moe_every : MoE at layers ``i % moe_every == moe_every - 1``.
    fusion_layers : in "modality" mode the top ``fusion_layers`` layers are dense.
    density : stored fraction of every sparse weight row.
    embed_dim : width of the retrieval embeddings.
    load_balance, z_loss, importance, entropy_local, entropy_global : weights of the
        auxiliary MoE losses (minivlmoe/moe/aux_losses.py).
    min_experts : LIMoE's global-entropy threshold log(min(min_experts, E)).
    router_noise : std of the router noise in training (0 = none).
    bpr : Batch Priority Routing.   renormalize : renormalize the top-k gates.
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
    renormalize: bool = True
    caption_weight: float = 1.0
    contrastive_weight: float = 1.0
    dtype: str = "float32"

    def __post_init__(self):
        for name, low in (("image_size", 1), ("patch", 1), ("channels", 1), ("vocab_size", 2),
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
        for name in ("bpr", "renormalize"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
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
        """Per layer ``("moe" | "ffn", hidden width)`` (module docstring, active compute)."""
        kinds = []
        for i in range(self.layers):
            moe_position = i % self.moe_every == self.moe_every - 1
            fusion = self.experts == "modality" and i >= self.layers - self.fusion_layers
            if not moe_position:
                kinds.append(("ffn", self.mlp_hidden))
            elif self.experts == "dense" or fusion:
                kinds.append(("ffn", self.expert_hidden * self.top_k))
            else:
                kinds.append(("moe", self.expert_hidden))
        return kinds

    def moe_config(self):
        """The :class:`minivlmoe.moe.moe_layer.MoEConfig` shared by every MoE layer."""
        return moe_layer.MoEConfig(
            num_experts=self.num_experts, k=self.top_k, capacity_factor=self.capacity_factor,
            renormalize=bool(self.renormalize), bpr=bool(self.bpr), noise_std=self.router_noise,
            mode="modality" if self.experts == "modality" else "shared",
            min_experts=self.min_experts,
            aux_weights={name: getattr(self, name) for name in
                         ("load_balance", "z_loss", "importance", "entropy_local",
                          "entropy_global")})

    def to_dict(self):
        """A JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"d has unknown ModelConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def _check_config(cfg):
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
    _check_config(cfg)
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
        if kind == "moe":
            block["moe"] = moe_layer.init(rng, D, hidden, mcfg, cfg.density, dt)
        else:
            block["ffn"] = ffn.init(rng, D, hidden, cfg.density, dt)
        params["blocks"][str(i)] = block
    params["ln_f"] = layernorm.init(D, dt)
    params["img_proj"] = sparse_linear.init(rng, D, cfg.embed_dim, cfg.density, dt)
    params["txt_proj"] = sparse_linear.init(rng, D, cfg.embed_dim, cfg.density, dt)
    params["log_logit_scale"] = np.array(contrastive.LOG_LOGIT_SCALE_INIT, dtype=dt)
    params["lm_head"] = sparse_linear.init(rng, D, cfg.vocab_size, cfg.density, dt)
    return params


def num_params(params):
    """Number of stored parameter values (sparse weights count their stored entries)."""
    return int(sum(leaf.nnz if isinstance(leaf, sp.csr_array) else leaf.size
                   for leaf in flatten(params).values()))


# ----------------------------------------------------------------------------- helpers

def _check_images(cfg, images):
    check_array("images", images, ndim=4, axes="(B, R, R, Ch)")
    R, Ch = cfg.image_size, cfg.channels
    if images.shape[1:] != (R, R, Ch) or images.shape[0] < 1:
        raise ValueError(f"images must have shape (B, {R}, {R}, {Ch}) with B >= 1, "
                         f"got {images.shape}")
    if images.dtype != cfg.np_dtype:
        raise TypeError(f"images must have the model dtype {cfg.dtype}, got {images.dtype}")
    return images


def _check_ids(cfg, ids, pad_id, *, min_len=1, name="ids"):
    check_array(name, ids, ndim=2, axes="(B, T)", dtype_kind="i")
    B, T = ids.shape
    if B < 1 or not min_len <= T <= cfg.max_text_len:
        raise ValueError(f"{name} must have shape (B >= 1, T) with {min_len} <= T <= "
                         f"max_text_len={cfg.max_text_len}, got {ids.shape}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"{name} must be in [0, vocab_size={cfg.vocab_size}), got values "
                         f"in [{ids.min()}, {ids.max()}]")
    pad_id = check_int("pad_id", pad_id, 0, cfg.vocab_size - 1)
    empty = np.flatnonzero(np.all(ids == pad_id, axis=1))
    if empty.size:
        raise ValueError(f"{name} must have at least one non-pad token per row, got an "
                         f"all-pad row at index {int(empty[0])}")
    return ids, pad_id


def _last_valid(valid):
    """Index of the last True of each row of ``valid`` (B, T) -> (B,)."""
    T = valid.shape[1]
    return T - 1 - np.argmax(valid[:, ::-1], axis=1)              # (B,)


def _block_mask(seg, pos, valid):
    """The attention mask of the combined sequence (module docstring).

    seg, pos : (S,) segment id and position inside the segment of each position.
    valid : (B, S) bool, False on padding keys.
    Returns (B, S, S) bool, True where query s may attend to key t.
    """
    sq, sk = seg[:, None], seg[None, :]                           # (S, 1), (1, S)
    same = sq == sk                                               # (S, S)
    causal_ok = (sq != SEG_CAPTION) | (pos[None, :] <= pos[:, None])  # (S, S)
    caption_sees_image = (sq == SEG_CAPTION) & (sk == SEG_IMAGE)  # (S, S)
    allowed = (same & causal_ok) | caption_sees_image             # (S, S)
    return allowed[None] & valid[:, None, :]                      # (B, S, S)


def embed_sequence(params, cfg, images, cap_in, ret_ids, pad_id, cap_valid=None):
    """Embed ``[image | caption input | retrieval text]`` and build its block mask.

    Parameters
    ----------
    images : (B, R, R, Ch).
    cap_in : (B, Tc) int caption inputs (``ids[:, :-1]``), or None (no caption segment).
    ret_ids : (B, Tr) int retrieval text (``ids``), or None (no retrieval segment).
    pad_id : int; pad tokens are masked as keys and skip the FFN/MoE sublayers.
    cap_valid : (B, Tc) bool, which caption positions are real (default ``cap_in !=
        pad_id``).  Training passes ``ids[:, 1:] != pad_id``: an input whose target is
        padding (the ``eos`` of a full-length caption) predicts nothing and no real
        position attends to it, so it is treated as padding too.

    Returns
    -------
    x : (B, S, D) with S = 1+P+Tc+Tr.
    mask : (B, S, S) bool (module docstring: image | prefix-causal caption | text).
    modality : (B*S,) int, 0 on image tokens, 1 on text tokens.
    rows : (M,) flat indices of the non-pad tokens.
    c_patch, c_cap, c_ret : embedding caches (None for an absent segment).
    """
    B = images.shape[0]
    P1 = 1 + cfg.num_patches
    Tc = 0 if cap_in is None else cap_in.shape[1]
    Tr = 0 if ret_ids is None else ret_ids.shape[1]
    S = P1 + Tc + Tr
    x = np.empty((B, S, cfg.width), dtype=cfg.np_dtype)            # (B, S, D)
    x[:, :P1], c_patch = patch_embed.forward(images, params["patch"], cfg.patch)
    valid = np.ones((B, S), dtype=bool)                            # (B, S) key validity
    c_cap = c_ret = None
    if cap_in is not None:
        x[:, P1:P1 + Tc], c_cap = token_embed.forward(cap_in, params["text"])
        valid[:, P1:P1 + Tc] = cap_in != pad_id if cap_valid is None else cap_valid
    if ret_ids is not None:
        x[:, P1 + Tc:], c_ret = token_embed.forward(ret_ids, params["text"])
        valid[:, P1 + Tc:] = ret_ids != pad_id
    seg = np.repeat([SEG_IMAGE, SEG_CAPTION, SEG_RETRIEVAL], [P1, Tc, Tr])  # (S,)
    pos = np.concatenate([np.arange(P1), np.arange(Tc), np.arange(Tr)])     # (S,)
    mask = _block_mask(seg, pos, valid)                            # (B, S, S)
    modality = np.repeat((seg != SEG_IMAGE)[None], B, axis=0).reshape(-1).astype(np.int64)
    rows = np.flatnonzero(valid)                                   # (M,) non-pad tokens
    return x, mask, modality, rows, c_patch, c_cap, c_ret


# ----------------------------------------------------------------------------- tower

class BlockCache(NamedTuple):
    """Caches of one block.

    Fields
    ------
    ln1, attn, ln2 : the layernorm / attention caches.
    kind : "ffn" or "moe".
    mix : the ffn.Cache or moe_layer.Cache of the FFN sublayer (on the active rows).
    """

    ln1: layernorm.Cache
    attn: attention.Cache
    ln2: layernorm.Cache
    kind: str
    mix: object


class TowerCache(NamedTuple):
    """``blocks``: list of BlockCache; ``ln_f``: the final layernorm cache; ``rows``:
    (M,) flat indices of the tokens the FFN/MoE sublayers saw (None = all);
    ``shape``: (B, S, D)."""

    blocks: list
    ln_f: layernorm.Cache
    rows: np.ndarray | None
    shape: tuple


def _router_margin(moe_cache, k):
    """Smallest gap between the k-th and (k+1)-th router logit over the layer's tokens
    (inf when k = E): routing cannot change under a perturbation of the logits smaller
    than half of it.  Logit gaps equal log-probability gaps, so it is read from p."""
    gaps = [np.inf]
    for entry in moe_cache.pools:                 # (name, index, PoolCache or None, ...)
        pool = entry[2]
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


def tower_forward(x, mask, modality, rows, params, cfg, *, rng=None, train=False,
                  timer=NULL_TIMER):
    """All blocks and the final layer norm.

    Parameters
    ----------
    x : (B, S, D) embedded tokens.
    mask : bool broadcastable to (B, S, S) or None (full attention).
    modality : (N,) int, 0 image / 1 text per flattened token (N = B*S).
    rows : (M,) int flat indices of the tokens that go through the FFN/MoE sublayers,
        or None for all N.
    params : the model params.   cfg : ModelConfig.
    rng, train : router noise (MoE layers only).
    timer : sections "attention", "ffn", "moe" (minivlmoe/timing.py).

    Returns
    -------
    h : (B, S, D) final hidden states (after LN_f).
    aux_total : float, the summed weighted aux losses of the MoE layers.
    stats : dict "blocks.i" -> MoE layer statistics.
    cache : TowerCache
    """
    B, S, D = x.shape
    N = B * S
    mcfg = cfg.moe_config()
    mod_rows = modality if rows is None else modality[rows]      # (M,)
    aux_total, stats, caches = 0.0, {}, []
    for i, (kind, _) in enumerate(cfg.layer_kinds()):
        p = params["blocks"][str(i)]
        with timer.section("attention"):
            a_in, c_ln1 = layernorm.forward(x, p["ln1"], LN_EPS)   # (B, S, D)
            a, c_attn = attention.forward(a_in, p["attn"], cfg.heads, mask)  # (B, S, D)
            x1 = x + a                                             # (B, S, D) residual
        with timer.section(kind):
            f_in, c_ln2 = layernorm.forward(x1, p["ln2"], LN_EPS)  # (B, S, D)
            f_in = f_in.reshape(N, D)                              # (N, D) 'b s d -> (b s) d'
            f_rows = f_in if rows is None else f_in[rows]          # (M, D) active tokens
            if kind == "moe":
                f, aux, c_mix = moe_layer.forward(f_rows, p["moe"], mcfg, mod_rows,
                                            rng=rng, train=train)  # (M, D)
                aux_total += aux.aux_total
                stats[f"blocks.{i}"] = _moe_stats(aux, _router_margin(c_mix, cfg.top_k))
            else:
                f, c_mix = ffn.forward(f_rows, p["ffn"])           # (M, D)
            x2 = x1.reshape(N, D).copy()                           # (N, D)
            if rows is None:
                x2 += f                                            # (N, D) residual
            else:
                x2[rows] += f                                      # (M, D) residual, rows distinct
            x = x2.reshape(B, S, D)                                # (B, S, D)
        caches.append(BlockCache(c_ln1, c_attn, c_ln2, kind, c_mix))
    h, c_lnf = layernorm.forward(x, params["ln_f"], LN_EPS)        # (B, S, D)
    return h, aux_total, stats, TowerCache(caches, c_lnf, rows, (B, S, D))


def tower_backward(dh, cache, *, timer=NULL_TIMER):
    """Reverse of :func:`tower_forward` (every residual fork named).

    Returns
    -------
    dx : (B, S, D) gradient of the embedded tokens.
    dblocks : {"0": {...}, ...} and dln_f : {"gamma", "beta"}.
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
            df = dx2 if rows is None else dx2[rows]                # (M, D) FFN branch
            if c.kind == "moe":
                df_rows, g["moe"] = moe_layer.backward(df, c.mix, 1.0)   # (M, D); aux weight 1
            else:
                df_rows, g["ffn"] = ffn.backward(df, c.mix)        # (M, D)
            if rows is None:
                df_in = df_rows.reshape(B, S, D)                   # (B, S, D)
            else:
                df_in = np.zeros((N, D), dtype=df_rows.dtype)      # (N, D) pad rows: 0
                df_in[rows] = df_rows                              # (M, D)
                df_in = df_in.reshape(B, S, D)                     # (B, S, D)
            # f_in = LN2(x1)
            dx1_ln, g["ln2"] = layernorm.backward(df_in, c.ln2)    # (B, S, D)
            dx1 = dx1_resid.reshape(B, S, D) + dx1_ln              # (B, S, D) forks join
        with timer.section("attention"):
            # x1 = x + attn(a_in): fork into the residual and the attention branch
            dx_resid = dx1                                         # (B, S, D)
            da_in, g["attn"] = attention.backward(dx1, c.attn)     # (B, S, D)
            # a_in = LN1(x)
            dx_ln, g["ln1"] = layernorm.backward(da_in, c.ln1)     # (B, S, D)
            dx = dx_resid + dx_ln                                  # (B, S, D) forks join
        dblocks[str(i)] = {k: g[k] for k in ("ln1", "attn", "ln2", c.kind)}
    dblocks = {str(i): dblocks[str(i)] for i in range(len(cache.blocks))}
    return dx, dblocks, dln_f


# ----------------------------------------------------------------------------- training step

class Cache(NamedTuple):
    """Everything :func:`backward` needs.

    Fields
    ------
    cfg : ModelConfig.   layout : (P1, Tc, Tr) segment lengths (0 = segment absent).
    patch, cap_embed, ret_embed : embedding caches (None when absent).
    tower : TowerCache.
    img_proj, img_norm, txt_proj, txt_norm, contrastive : retrieval head caches (or None).
    txt_last : (B,) position of the pooled retrieval-text token inside segment 2.
    lm_head, caption : captioning head caches (or None).
    params : the params (for the zero gradients of unused heads).
    """

    cfg: ModelConfig
    layout: tuple
    patch: patch_embed.Cache
    cap_embed: token_embed.Cache | None
    ret_embed: token_embed.Cache | None
    tower: TowerCache
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

    Returns
    -------
    losses : dict of floats (see :func:`loss_and_grads`).
    stats : routing statistics (see :func:`loss_and_grads`).
    cache : Cache, for :func:`backward`; ``cache.img_norm.y`` and ``cache.txt_norm.y``
        are the (B, embed_dim) unit-norm retrieval embeddings of the batch.
    """
    _check_config(cfg)
    _check_images(cfg, images)
    ids, pad_id = _check_ids(cfg, ids, pad_id, min_len=2)
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
    P1 = 1 + cfg.num_patches
    Tc, Tr = (T - 1 if use_cap else 0), (T if use_ret else 0)

    # ---- embed: [image | caption input | retrieval text]
    with timer.section("embed"):
        x, mask, modality, rows, c_patch, c_cap, c_ret = embed_sequence(
            params, cfg, images, ids[:, :-1] if use_cap else None, ids if use_ret else None,
            pad_id, ids[:, 1:] != pad_id)                          # (B, S, D), (B, S, S)

    # ---- the tower
    h, aux_total, stats, c_tower = tower_forward(x, mask, modality, rows, params, cfg,
                                                 rng=rng, train=train, timer=timer)

    # ---- heads and losses
    losses = {"contrastive": 0.0, "caption": 0.0}
    c_ip = c_in = c_tp = c_tn = c_con = txt_last = c_lm = c_ce = None
    with timer.section("losses"):
        if use_ret:
            img_pool = h[:, 0]                                     # (B, D) final cls
            txt_last = _last_valid(ids != pad_id)                  # (B,)
            txt_pool = h[np.arange(B), P1 + Tc + txt_last]         # (B, D) eos token
            img_z, c_ip = sparse_linear.forward(img_pool, params["img_proj"])  # (B, E_d)
            img_emb, c_in = l2norm.forward(img_z)                  # (B, E_d)
            txt_z, c_tp = sparse_linear.forward(txt_pool, params["txt_proj"])  # (B, E_d)
            txt_emb, c_tn = l2norm.forward(txt_z)                  # (B, E_d)
            losses["contrastive"], c_con = contrastive.forward(
                img_emb, txt_emb, params["log_logit_scale"], positives)
        if use_cap:
            h_cap = h[:, P1:P1 + Tc]                               # (B, T-1, D)
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
             "tokens": int(rows.size)}
    cache = Cache(cfg, (P1, Tc, Tr), c_patch, c_cap, c_ret, c_tower, c_ip, c_in, c_tp, c_tn,
                  c_con, txt_last, c_lm, c_ce, params)
    return losses, stats, cache


def backward(cache, timer=NULL_TIMER):
    """The whole model's backward: the forward's call list in reverse.

    Returns the gradient of ``losses["total"]`` keyed exactly like the params (the
    upstream gradient of the total is 1; the objectives enter with their weights, the
    aux losses with weight 1 since their own weights are inside ``aux_total``).
    """
    cfg, (P1, Tc, _) = cache.cfg, cache.layout                   # (image, caption, retrieval-text) lengths
    B, S, D = cache.tower.shape
    grads = {}
    dh = np.zeros((B, S, D), dtype=cfg.np_dtype)                   # (B, S, D)
    with timer.section("losses"):
        # total = caption_weight * caption + ...
        if cache.caption is not None:
            dlogits = cross_entropy.backward(cfg.caption_weight, cache.caption)  # (B, T-1, V)
            dh_cap, grads["lm_head"] = sparse_linear.backward(dlogits, cache.lm_head)
            dh[:, P1:P1 + Tc] = dh_cap                             # (B, T-1, D)
        # total = contrastive_weight * contrastive + ...
        if cache.contrastive is not None:
            dimg_emb, dtxt_emb, grads["log_logit_scale"] = contrastive.backward(
                cfg.contrastive_weight, cache.contrastive)        # (B, E_d) x2, ()
            dtxt_z = l2norm.backward(dtxt_emb, cache.txt_norm)     # (B, E_d)
            dtxt_pool, grads["txt_proj"] = sparse_linear.backward(dtxt_z, cache.txt_proj)
            dimg_z = l2norm.backward(dimg_emb, cache.img_norm)     # (B, E_d)
            dimg_pool, grads["img_proj"] = sparse_linear.backward(dimg_z, cache.img_proj)
            dh[np.arange(B), P1 + Tc + cache.txt_last] += dtxt_pool  # (B, D) eos rows
            dh[:, 0] += dimg_pool                                  # (B, D) cls rows
    # the tower (aux losses enter inside each MoE backward with weight 1)
    dx, grads["blocks"], grads["ln_f"] = tower_backward(dh, cache.tower, timer=timer)
    with timer.section("embed"):
        _, grads["patch"] = patch_embed.backward(dx[:, :P1], cache.patch)  # images: no grad
        # the text table is used twice (caption input, retrieval text): the grads add
        dtext = zeros_like(cache.params["text"])
        if cache.cap_embed is not None:
            dtext = tree.add(dtext, token_embed.backward(dx[:, P1:P1 + Tc], cache.cap_embed))
        if cache.ret_embed is not None:
            dtext = tree.add(dtext, token_embed.backward(dx[:, P1 + Tc:], cache.ret_embed))
        grads["text"] = dtext
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
    timer : object with a ``section(name)`` context manager (minivlmoe/timing.py).

    Returns
    -------
    losses : dict of floats "total", "contrastive", "caption", "aux", "aux_<name>".
    grads : keyed exactly like ``params`` (sparse grads with the weights' patterns).
    stats : {"moe": {"blocks.i": {"dropped_fraction", "losses", "min_margin", "pools":
        {pool: {"capacity", "routed", "load", "usage" (2, E) image/text rows,
        "dropped_fraction"}}}}, "temperature" exp(-log_logit_scale), "logit_scale"
        exp(log_logit_scale), "tokens"}.
    """
    losses, stats, cache = forward(params, cfg, images, ids, pad_id=pad_id, keys=keys, rng=rng,
                                   train=train, timer=timer)
    grads = backward(cache, timer)
    return losses, grads, stats


def losses_only(params, cfg, images, ids, *, pad_id, keys=None, rng=None, train=False):
    """Forward only: the losses dict of :func:`loss_and_grads`."""
    losses, _, _ = forward(params, cfg, images, ids, pad_id=pad_id, keys=keys, rng=rng,
                           train=train)
    return losses


# ----------------------------------------------------------------------------- inference

def encode_images(params, cfg, images):
    """Unit-norm retrieval embeddings (B, embed_dim) of images alone (eval mode)."""
    _check_config(cfg)
    _check_images(cfg, images)
    out = []
    for start in range(0, images.shape[0], _ENCODE_CHUNK):
        chunk = images[start:start + _ENCODE_CHUNK]                # (b, R, R, Ch)
        x, _ = patch_embed.forward(chunk, params["patch"], cfg.patch)  # (b, 1+P, D)
        modality = np.full(x.shape[0] * x.shape[1], IMAGE, dtype=np.int64)  # (b*(1+P),)
        h, _, _, _ = tower_forward(x, None, modality, None, params, cfg)  # (b, 1+P, D)
        z, _ = sparse_linear.forward(h[:, 0], params["img_proj"])  # (b, E_d)
        out.append(l2norm.forward(z)[0])                           # (b, E_d)
    return np.concatenate(out)                                     # (B, E_d)


def encode_texts(params, cfg, ids, *, pad_id):
    """Unit-norm retrieval embeddings (B, embed_dim) of captions alone (eval mode)."""
    _check_config(cfg)
    ids, pad_id = _check_ids(cfg, ids, pad_id)
    out = []
    for start in range(0, ids.shape[0], _ENCODE_CHUNK):
        chunk = ids[start:start + _ENCODE_CHUNK]                   # (b, T)
        b, T = chunk.shape
        x, _ = token_embed.forward(chunk, params["text"])          # (b, T, D)
        valid = chunk != pad_id                                    # (b, T)
        mask = valid[:, None, :]                                   # (b, 1, T) key padding
        modality = np.full(b * T, TEXT, dtype=np.int64)            # (b*T,)
        rows = np.flatnonzero(valid.reshape(-1))                   # (M,)
        h, _, _, _ = tower_forward(x, mask, modality, rows, params, cfg)  # (b, T, D)
        pooled = h[np.arange(b), _last_valid(valid)]               # (b, D)
        z, _ = sparse_linear.forward(pooled, params["txt_proj"])  # (b, E_d)
        out.append(l2norm.forward(z)[0])                           # (b, E_d)
    return np.concatenate(out)                                     # (B, E_d)


def greedy_decode(params, cfg, images, *, bos_id, eos_id, pad_id, max_len):
    """Greedy captions (B, max_len): ``bos w1 ... eos pad ...`` (eval mode).

    Each step re-runs the fusion sequence [image | ids so far] with the prefix-causal
    mask (:func:`embed_sequence` without a retrieval segment) and appends the argmax
    of the last position's logits over every token but ``pad_id`` and ``bos_id``;
    after a row emits ``eos`` it is filled with ``pad_id``.  Vectorized over the
    batch; the loop is over time steps.
    """
    _check_config(cfg)
    _check_images(cfg, images)
    V = cfg.vocab_size
    bos_id = check_int("bos_id", bos_id, 0, V - 1)
    eos_id = check_int("eos_id", eos_id, 0, V - 1)
    pad_id = check_int("pad_id", pad_id, 0, V - 1)
    max_len = check_int("max_len", max_len, 2, cfg.max_text_len)
    B = images.shape[0]
    out = np.full((B, max_len), pad_id, dtype=np.int64)            # (B, max_len)
    out[:, 0] = bos_id
    done = np.zeros(B, dtype=bool)                                 # (B,)
    for t in range(1, max_len):
        x, mask, modality, rows, _, _, _ = embed_sequence(
            params, cfg, images, out[:, :t], None, pad_id)         # (B, 1+P+t, D)
        h, _, _, _ = tower_forward(x, mask, modality, rows, params, cfg)  # (B, S, D)
        logits, _ = sparse_linear.forward(h[:, -1], params["lm_head"])  # (B, V)
        logits[:, [pad_id, bos_id]] = -np.inf                      # never generated
        nxt = np.argmax(logits, axis=1)                            # (B,)
        out[:, t] = np.where(done, pad_id, nxt)
        done |= nxt == eos_id
        if done.all():
            break
    return out


# ----------------------------------------------------------------------------- gradcheck

def tiny_config(experts="shared", **overrides):
    """A tiny float64 config for gradient checks (width 8, 2 layers, 2 experts, dropless)."""
    base = dict(image_size=4, patch=2, channels=2, vocab_size=7, max_text_len=5, width=8,
                heads=2, layers=2, mlp_hidden=6, experts=experts, num_experts=2, top_k=1,
                capacity_factor=None, moe_every=1, fusion_layers=1, density=1.0,
                embed_dim=4, load_balance=0.1, z_loss=0.01, importance=0.1,
                entropy_local=0.1, entropy_global=0.1, dtype="float64")
    base.update(overrides)
    return ModelConfig(**base)


def tiny_batch(rng, cfg, B=3, pad_id=0, T=None):
    """Random images and captions ``1 w ... 2 pad ...`` (bos=1, eos=2) of length T
    (default ``cfg.max_text_len``) for ``cfg``."""
    R, Ch = cfg.image_size, cfg.channels
    T = cfg.max_text_len if T is None else T
    images = rng.standard_normal((B, R, R, Ch)).astype(cfg.np_dtype)   # (B, R, R, Ch)
    lengths = rng.integers(2, T + 1, size=B)                       # (B,) incl. bos and eos
    ids = rng.integers(3, cfg.vocab_size, size=(B, T))             # (B, T) words
    t = np.arange(T)[None, :]                                      # (1, T)
    ids = np.where(t == 0, 1, np.where(t == lengths[:, None] - 1, 2,
                                       np.where(t >= lengths[:, None], pad_id, ids)))
    return images, ids


# attention's key bias has an exactly-zero gradient (a row shift of the scores, see
# minivlmoe/ops/attention.py); its relative error is round-off over round-off, so the
# directional check leaves it out (tests/test_model.py checks it is ~0).
def _excluded(path):
    return path.endswith("attn.k.b")


def _group(path):
    """Coefficient group of a leaf: "embed", "blocks/i" or "heads"."""
    parts = path.split(".")
    if parts[0] == "blocks":
        return "/".join(parts[:2])
    return "embed" if parts[0] in ("patch", "text") else "heads"


def directional_leaves(params):
    """``{group: [leaf path, ...]}``: the order of the coefficients of
    :func:`directional_case` (an index reported by the gradient checker is a position
    in its group's list)."""
    groups = {}
    for path in flatten(params):
        if not _excluded(path):
            groups.setdefault(_group(path), []).append(path)
    return groups


def directional_case(name, params, cfg, images, ids, *, pad_id, keys=None, rng):
    """A GradcheckCase checking one random directional derivative per parameter leaf.

    Every leaf ``w`` gets a fixed random unit direction ``v``; the checked inputs are
    coefficients ``c`` (all 0) with ``w(c) = w + c v``.  Then ``dL/dc = <dL/dw, v>``,
    so the gradient checker compares it with ``(L(c + h) - L(c - h)) / 2h``: two
    forwards per leaf, whatever its size.  The coefficients are grouped by block
    (:func:`directional_leaves`), so the checker's error floor (1% of the group's
    largest derivative) keeps a leaf whose derivative is ~0 from failing on round-off.
    ``h = 1e-5``: the loss (~10) carries ~1e-15 of round-off, and the curvature of a
    well-conditioned tiny model (:func:`tiny_params`) keeps the O(h^2) error below it.
    """
    from .gradcheck import GradcheckCase

    groups = directional_leaves(params)
    directions = {}
    for paths in groups.values():
        for path in paths:
            leaf = flatten(params)[path]
            values = leaf.data if isinstance(leaf, sp.csr_array) else leaf
            v = rng.standard_normal(values.shape)
            directions[path] = v / max(np.linalg.norm(v), 1e-300)

    def perturbed(coeffs):
        step = {path: coeffs[g][i] for g, paths in groups.items()
                for i, path in enumerate(paths)}
        out = {}
        for path, leaf in flatten(params).items():
            if path not in step:
                out[path] = leaf
            elif isinstance(leaf, sp.csr_array):
                out[path] = with_values(leaf, leaf.data + step[path] * directions[path])
            else:
                out[path] = np.asarray(leaf + step[path] * directions[path])  # 0-d stays 0-d
        return unflatten(out)

    def fwd(a):
        losses, _, cache = forward(perturbed(a["c"]), cfg, images, ids, pad_id=pad_id,
                                   keys=keys)
        return losses["total"], cache

    def bwd(dout, cache):
        g = flatten(backward(cache))
        dc = {}
        for group, paths in groups.items():
            values = [g[p].data if isinstance(g[p], sp.csr_array) else g[p] for p in paths]
            dc[group] = dout * np.array([np.sum(gv * directions[p])
                                         for gv, p in zip(values, paths)])  # (leaves,)
        return {"c": dc}

    coeffs = {group: np.zeros(len(paths)) for group, paths in groups.items()}
    return GradcheckCase(name, {"c": coeffs}, fwd, bwd, h=1e-5)


def tiny_params(rng, cfg):
    """:func:`init`, then the embedding tables rescaled from std 0.02 to std 1.

    With std-0.02 embeddings every first LayerNorm divides by ~0.02, so the loss has a
    large curvature there and centered differences lose digits; gradient checks use
    these better-conditioned parameters instead.
    """
    params = init(rng, cfg)
    for group, key in (("patch", "cls"), ("patch", "pos"), ("text", "tok"), ("text", "pos")):
        params[group][key] *= 50.0
    return params


def gradcheck_cases(rng):
    """One tiny float64 whole-model case per expert mode (both objectives on)."""
    cases = []
    for mode in EXPERT_MODES:
        cfg = tiny_config(mode)
        params = tiny_params(rng, cfg)
        images, ids = tiny_batch(rng, cfg)
        cases.append(directional_case(f"model(experts={mode})", params, cfg, images, ids,
                                      pad_id=0, keys=np.array([0, 1, 0]), rng=rng))
    return cases
