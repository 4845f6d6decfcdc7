"""One sequence per image-caption pair: its layout, its block mask and its embedding.

Layout (docs/architecture.md draws it)
--------------------------------------
A training batch of B image-caption pairs becomes ONE sequence per pair::

    [ image: cls + P patches | caption input ids[:, :-1] | retrieval text ids ]
      segment 0 (1+P)          segment 1 (Tc = T-1)         segment 2 (Tr = T)

S = 1+P + Tc + Tr positions, N = B*S flattened tokens, of which the U <= N non-pad
("used") rows go through the FFN/MoE sublayers.  A segment an objective does not need is
left out (length 0): the caption segment when ``caption_weight = 0``, the retrieval
segment when ``contrastive_weight = 0`` and in greedy decoding.

Block mask (True = may attend)
------------------------------
* image rows see the image only (bidirectional): the dual-encoder image tower;
* caption rows see the whole image and the caption up to themselves (prefix-causal,
  prefix = 1+P): the fusion (captioning) model;
* retrieval-text rows see the valid (non-pad) retrieval text only (bidirectional):
  the dual-encoder text tower;

and no query attends to a padding key.  So the image is encoded once and serves both
objectives (image rows never look at text, so their states are exactly those of "the
image alone through the tower"), and every MoE layer sees the image and text tokens of
the batch in one call (as LIMoE routes both modalities in one batch).  Padding rows are
not sent through the FFN/MoE (they would occupy expert capacity and count in the
load-balancing loss); their output is the residual only, and no valid row attends to them.

Embedding and its backward
--------------------------
::

    x[:, image]     = patch_embed(images)          (B, 1+P, D)
    x[:, caption]   = token_embed(ids[:, :-1])     (B, Tc, D)
    x[:, retrieval] = token_embed(ids)             (B, Tr, D)

    dpatch = patch_embed.backward(dx[:, image])    the images get no gradient
    dtext  = token_embed.backward(dx[:, caption]) + token_embed.backward(dx[:, retrieval])

The token table is used twice (caption input and retrieval text), so its two gradients add.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import check_array, check_int
from .ops import patch_embed, segment_attention, token_embed
from . import tree

IMAGE, TEXT = 0, 1           # modality ids (moe_config.MODALITIES order)
SEG_IMAGE, SEG_CAPTION, SEG_RETRIEVAL = 0, 1, 2


class Layout(NamedTuple):
    """Segment lengths of a sequence (0 = the segment is absent).

    Fields
    ------
    image : 1+P.   caption : Tc.   retrieval : Tr.
    """

    image: int
    caption: int
    retrieval: int

    @property
    def length(self):
        """S = 1+P + Tc + Tr."""
        return self.image + self.caption + self.retrieval

    @property
    def image_slice(self):
        return slice(0, self.image)

    @property
    def caption_slice(self):
        return slice(self.image, self.image + self.caption)

    @property
    def retrieval_slice(self):
        return slice(self.image + self.caption, self.length)


class Sequence(NamedTuple):
    """An embedded sequence, as the tower takes it.

    Fields
    ------
    x : (B, S, D) embedded tokens.
    mask : (B, S, S) bool, the block mask.
    blocks : tuple of segment_attention.Block, the same mask as the blocks it allows
        (what the tower's attention computes: minivlmoe/ops/segment_attention.py).
    modality : (N,) int, IMAGE or TEXT per flattened token.
    rows : (U,) int, flat indices of the used (non-pad) tokens.
    layout : Layout.
    """

    x: np.ndarray
    mask: np.ndarray
    blocks: tuple
    modality: np.ndarray
    rows: np.ndarray
    layout: Layout


class EmbedCache(NamedTuple):
    """What :func:`embed_backward` needs.

    Fields
    ------
    layout : Layout.
    patch : patch_embed.Cache.
    caption, retrieval : token_embed.Cache of each text segment (None when absent).
    text : the token tables ``params["text"]`` (their zero gradient starts the sum).
    """

    layout: Layout
    patch: patch_embed.Cache
    caption: token_embed.Cache | None
    retrieval: token_embed.Cache | None
    text: dict


# ----------------------------------------------------------------------------- checks

def check_images(cfg, images):
    """``images`` must be (B >= 1, R, R, Ch) in the model dtype."""
    check_array("images", images, ndim=4, axes="(B, R, R, Ch)")
    R, Ch = cfg.image_size, cfg.channels
    if images.shape[1:] != (R, R, Ch) or images.shape[0] < 1:
        raise ValueError(f"images must have shape (B, {R}, {R}, {Ch}) with B >= 1, "
                         f"got {images.shape}")
    if images.dtype != cfg.np_dtype:
        raise TypeError(f"images must have the model dtype {cfg.dtype}, got {images.dtype}")
    return images


def check_ids(cfg, ids, pad_id, *, min_len=1, name="ids"):
    """``ids`` must be (B >= 1, T) ints in [0, V), min_len <= T <= Tmax, no all-pad row.

    Returns ``(ids, pad_id)``.
    """
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


# ----------------------------------------------------------------------------- layout

def last_valid(valid):
    """Index of the last True of each row of ``valid`` (B, T) -> (B,)."""
    T = valid.shape[1]
    return T - 1 - np.argmax(valid[:, ::-1], axis=1)              # (B,)


def segments(layout):
    """``(seg, pos)``: the segment id and the position inside its segment, (S,) each."""
    seg = np.repeat([SEG_IMAGE, SEG_CAPTION, SEG_RETRIEVAL], list(layout))  # (S,)
    pos = np.concatenate([np.arange(n) for n in layout])                    # (S,)
    return seg, pos


def block_mask(seg, pos, valid):
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


def attention_blocks(layout, valid):
    """The block mask as the blocks it allows (:class:`segment_attention.Block`):

    * image rows over the image keys (no mask: image positions are never padding);
    * caption rows over the image and caption keys ``[0, 1+P+Tc)``, prefix-causal: the
      caption row at sequence position ``s`` sees key ``t`` iff ``t <= s`` (every image
      key is before every caption row) and ``t`` is not padding;
    * retrieval rows over the retrieval keys, those that are not padding.

    valid : (B, S) bool, False on padding keys.  Returns a tuple of Blocks (absent
    segments have none); :func:`segment_attention.dense_mask` of it equals
    :func:`block_mask`.
    """
    blocks = []
    im, cap, ret = layout.image_slice, layout.caption_slice, layout.retrieval_slice
    if layout.image:
        image_mask = None if valid[:, im].all() else valid[:, None, im]  # (B, 1, 1+P)
        blocks.append(segment_attention.Block(queries=im, keys=im, mask=image_mask))
    if layout.caption:
        seen = slice(0, cap.stop)                                  # image and caption keys
        s = np.arange(cap.start, cap.stop)[:, None]                # (Tc, 1) query position
        t = np.arange(cap.stop)[None, :]                           # (1, 1+P+Tc) key position
        causal = t <= s                                            # (Tc, 1+P+Tc)
        blocks.append(segment_attention.Block(
            queries=cap, keys=seen, mask=causal[None] & valid[:, None, seen]))  # (B, Tc, 1+P+Tc)
    if layout.retrieval:
        blocks.append(segment_attention.Block(queries=ret, keys=ret,
                                              mask=valid[:, None, ret]))  # (B, 1, Tr)
    return tuple(blocks)


# ----------------------------------------------------------------------------- embedding

def embed(params, cfg, images, cap_in, ret_ids, pad_id, cap_valid=None):
    """Embed ``[image | caption input | retrieval text]`` and build its block mask.

    Parameters
    ----------
    params : the model params (``"patch"`` and ``"text"`` are used).   cfg : ModelConfig.
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
    seq : Sequence(x (B, S, D), mask (B, S, S), blocks, modality (N,), rows (U,), layout).
    cache : EmbedCache, for :func:`embed_backward`.
    """
    B = images.shape[0]
    layout = Layout(image=1 + cfg.num_patches,
                    caption=0 if cap_in is None else cap_in.shape[1],
                    retrieval=0 if ret_ids is None else ret_ids.shape[1])
    S = layout.length
    x = np.empty((B, S, cfg.width), dtype=cfg.np_dtype)            # (B, S, D)
    x[:, layout.image_slice], c_patch = patch_embed.forward(images, params["patch"],
                                                            cfg.patch)  # (B, 1+P, D)
    valid = np.ones((B, S), dtype=bool)                            # (B, S) key validity
    c_cap = c_ret = None
    if cap_in is not None:
        x[:, layout.caption_slice], c_cap = token_embed.forward(cap_in, params["text"])
        valid[:, layout.caption_slice] = cap_in != pad_id if cap_valid is None else cap_valid
    if ret_ids is not None:
        x[:, layout.retrieval_slice], c_ret = token_embed.forward(ret_ids, params["text"])
        valid[:, layout.retrieval_slice] = ret_ids != pad_id
    seg, pos = segments(layout)                                    # (S,), (S,)
    mask = block_mask(seg, pos, valid)                             # (B, S, S)
    blocks = attention_blocks(layout, valid)                       # the same, by blocks
    modality = np.repeat((seg != SEG_IMAGE)[None], B, axis=0).reshape(-1).astype(np.int64)
    rows = np.flatnonzero(valid)                                   # (U,) non-pad tokens
    seq = Sequence(x=x, mask=mask, blocks=blocks, modality=modality, rows=rows, layout=layout)
    cache = EmbedCache(layout=layout, patch=c_patch, caption=c_cap, retrieval=c_ret,
                       text=params["text"])
    return seq, cache


def embed_backward(dx, cache):
    """Reverse of :func:`embed`: ``(dpatch, dtext)`` from ``dx`` (B, S, D).

    The images get no gradient; the token table's two uses add (module docstring).
    """
    layout = cache.layout
    _, dpatch = patch_embed.backward(dx[:, layout.image_slice], cache.patch)
    dtext = tree.zeros_like(cache.text)
    if cache.caption is not None:
        dtext = tree.add(dtext, token_embed.backward(dx[:, layout.caption_slice],
                                                     cache.caption))
    if cache.retrieval is not None:
        dtext = tree.add(dtext, token_embed.backward(dx[:, layout.retrieval_slice],
                                                     cache.retrieval))
    return dpatch, dtext
