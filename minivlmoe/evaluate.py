"""Evaluation driver: every number a training run reports about the test split.

What is measured (definitions of the metrics themselves: minivlmoe/metrics.py)
------------------------------------------------------------------------------
* **retrieval** -- every test image is embedded alone and every test caption alone
  (the dual encoder); ``sim = img_emb @ txt_emb.T`` (B, B) holds cosine similarities.
  Image-to-text recall@k asks, for each image, whether one of the k most similar
  captions has the image's caption *text*; text-to-image the converse.  The keys given
  to :func:`metrics.retrieval_recall` are caption-text ids (:func:`caption_keys`), so
  when two test images share the caption "a small red circle" either caption is a
  correct answer for either image.  Image-to-text ranks *distinct* caption texts
  (``distinct_texts=True``, the default: the test split repeats many captions, and
  counting each copy of a wrong caption as its own rank would push the right one out
  of the top 5 by duplication alone); text-to-image ranks the images, one query per
  caption row.  ``heldout_*`` repeats the same with only the
  held-out-combination images (or their captions) as *queries*, still searching the
  whole test split (built-in world only).
* **zero-shot attributes** -- for the test images with exactly one object, each
  attribute (color, shape, size) is classified by text prompts: the prompts of "red"
  are every caption "a {size} red {shape}", the score of "red" is the similarity of
  the image to its best-matching red prompt, and the prediction is the class with
  the highest score.  No classifier is trained.  Built-in world only: a run on its
  own data (minivlmoe/userdata.py) has no records, and these metrics are skipped.
* **captioning** -- greedy decoding from every test image (fusion mode); exact match
  of the decoded caption with the reference, and corpus BLEU-4 over words.
  ``heldout_caption_exact`` is the exact match on held-out-combination images.
* **losses and experts** -- the training losses on one batch of test pairs (eval
  mode: no router noise) and the model's expert statistics from that forward pass:
  per MoE layer and per expert pool, the fraction of each modality's tokens sent to
  each expert and the dropped-token fraction; and ``router_entropy``, the mean entropy
  of the router's probabilities per MoE layer and pool (how sure the routers are;
  ``minivlmoe routes`` plots it over training).

Everything is batched (the embeddings and the captions by minivlmoe/inference.py);
nothing loops over test items in Python except string work (decoding ids to words).
"""

from __future__ import annotations

import numpy as np

from . import inference, metrics, model
from .data import ImageCaptionDataset
from .scenes import COLORS, SHAPES, SIZES
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, normalize

ZERO_SHOT_ATTRIBUTES = ("color", "shape", "size")


def caption_keys(captions):
    """(B,) int ids of the caption texts: equal captions get equal ids (compared in
    :func:`minivlmoe.tokenizer.normalize`'d form, the words the model sees)."""
    texts = [normalize(c) for c in captions]
    _, keys = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    return keys.reshape(-1).astype(np.int64)                            # (B,)


def retrieval(img_emb, txt_emb, keys, heldout=None):
    """Recall@1/5 both ways over the whole split, plus held-out queries if any."""
    sim = img_emb @ txt_emb.T                                           # (B, B)
    out = metrics.retrieval_recall(sim, keys, keys, ks=(1, 5))
    if heldout is not None and heldout.any():
        i2t = metrics.retrieval_recall(sim[heldout], keys[heldout], keys, ks=(1, 5))
        t2i = metrics.retrieval_recall(sim[:, heldout], keys, keys[heldout], ks=(1, 5))
        out.update({f"heldout_{k}": v for k, v in i2t.items() if k.startswith("i2t")})
        out.update({f"heldout_{k}": v for k, v in t2i.items() if k.startswith("t2i")})
    return {k: float(v) for k, v in out.items()}


def zero_shot_prompts(attribute):
    """For each value of ``attribute``, the list of one-object captions that name it."""
    values = {"color": COLORS, "shape": SHAPES, "size": SIZES}[attribute]
    prompts = []
    for value in values:
        prompts.append([f"a {size} {color} {shape}"
                        for size in SIZES for color in COLORS for shape in SHAPES
                        if value in (size, color, shape)])
    return values, prompts


def zero_shot(params, cfg, img_emb, records, tokenizer, *, batch_size=inference.BATCH_SIZE):
    """Zero-shot accuracy of each attribute on the one-object images of ``records``.

    A class's score is the similarity of its best-matching prompt (max over the class's
    prompts).  The mean of the prompt embeddings (CLIP's ensemble) fails here: the
    prompts of "circle" differ in color and size, and an image is far from the 11 of
    them with the wrong color or size, which drowns the one that matches.
    """
    single = np.flatnonzero(records.n_objects == 1)                     # (Bs,)
    if single.size == 0:
        return {}
    out = {}
    for attribute in ZERO_SHOT_ATTRIBUTES:
        values, prompts = zero_shot_prompts(attribute)
        flat = [p for group in prompts for p in group]
        ids = tokenizer.encode(flat, cfg.max_text_len)                  # (A*Pc, T)
        txt = inference.encode_texts(params, cfg, ids, pad_id=PAD_ID,
                                     batch_size=batch_size)             # (A*Pc, De)
        sim = img_emb[single] @ txt.T                                   # (Bs, A*Pc)
        class_sim = sim.reshape(single.size, len(values), -1).max(axis=2)  # (Bs, A)
        labels = getattr(records, attribute)[single, 0]                 # (Bs,)
        out[f"zs_{attribute}"] = float(metrics.zero_shot_accuracy(class_sim, labels))
    return out


def generate_captions(params, cfg, images, tokenizer, *, batch_size=inference.BATCH_SIZE):
    """Greedy captions (list of str) for (B, R, R, Ch) images."""
    ids = inference.greedy_decode(params, cfg, images, bos_id=BOS_ID, eos_id=EOS_ID,
                                  pad_id=PAD_ID, max_len=cfg.max_text_len,
                                  batch_size=batch_size)                # (B, T)
    return tokenizer.decode_batch(ids)


def captioning(hyps, refs, heldout=None):
    """Exact match and BLEU-4 of decoded captions, plus exact match on held-out images.

    The references are compared in normalized form (lowercase words, no punctuation)."""
    refs = [normalize(r) for r in refs]
    out = {"caption_exact": float(metrics.exact_match(hyps, refs)),
           "bleu4": float(metrics.bleu4([h.split() for h in hyps], [r.split() for r in refs]))}
    if heldout is not None and heldout.any():
        held = np.flatnonzero(heldout)
        out["heldout_caption_exact"] = float(metrics.exact_match(
            [hyps[i] for i in held], [refs[i] for i in held]))
    return out


def losses_and_experts(params, cfg, images, ids, keys):
    """Losses on one batch of test pairs in eval mode, the expert statistics, and the
    mean router entropy per MoE layer and pool (``router_entropy``, nats; read from the
    same forward's caches, no MoE layer: an empty dict)."""
    losses, stats, cache = model.forward(params, cfg, images, ids, pad_id=PAD_ID, keys=keys,
                                         rng=None, train=False)
    out = {f"test_{k}": float(v) for k, v in losses.items()}
    decisions = inference.routing_decisions(cache.tower, cfg.top_k)
    out["router_entropy"] = {
        layer: {pool: round(float(r.entropy.mean()), 6) if r.entropy.size else 0.0
                for pool, r in pools.items()}
        for layer, pools in decisions.items()}
    return out, stats


def evaluate(params, cfg, dataset, tokenizer, *, batch_size=inference.BATCH_SIZE,
             decode=True, loss_batch=256):
    """All test metrics of ``params`` on ``dataset`` as one flat JSON-able dict.

    Parameters
    ----------
    params, cfg : the model's parameters and its ModelConfig.
    dataset : ImageCaptionDataset (``heldout`` and ``records`` are used when present).
    tokenizer : the Tokenizer the model was trained with.
    batch_size : images or captions per forward pass.
    decode : also run greedy decoding (the slowest part) for the caption metrics.
    loss_batch : number of test pairs for the test losses and the expert statistics.

    Returns
    -------
    dict with i2t_r1, i2t_r5, t2i_r1, t2i_r5 (and heldout_* variants), zs_color,
    zs_shape, zs_size, caption_exact, bleu4, heldout_caption_exact, test_total and the
    other test losses, "router_entropy" ({layer: {pool: mean entropy}}) and "experts"
    (the model's expert statistics, JSON-able).
    """
    if not isinstance(dataset, ImageCaptionDataset):
        raise TypeError(f"dataset must be an ImageCaptionDataset, got {type(dataset).__name__}")
    dtype = np.dtype(cfg.dtype)
    images = dataset.images.astype(dtype, copy=False)                   # (B, R, R, Ch)
    ids = tokenizer.encode(dataset.captions, cfg.max_text_len,
                           truncate=True)                               # (B, T)
    keys = caption_keys(dataset.captions)                               # (B,)
    img_emb = inference.encode_images(params, cfg, images,
                                      batch_size=batch_size)            # (B, De)
    txt_emb = inference.encode_texts(params, cfg, ids, pad_id=PAD_ID,
                                     batch_size=batch_size)             # (B, De)
    out = retrieval(img_emb, txt_emb, keys, dataset.heldout)
    if dataset.records is not None:
        out.update(zero_shot(params, cfg, img_emb, dataset.records, tokenizer,
                             batch_size=batch_size))
    if decode:
        hyps = generate_captions(params, cfg, images, tokenizer, batch_size=batch_size)
        out.update(captioning(hyps, dataset.captions, dataset.heldout))
    n = min(loss_batch, len(dataset))
    test_losses, stats = losses_and_experts(params, cfg, images[:n], ids[:n], keys[:n])
    out.update(test_losses)
    out["experts"] = to_jsonable(stats)
    return out


def to_jsonable(value):
    """Nested dicts/lists of NumPy scalars and small arrays -> plain Python values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if hasattr(value, "_asdict"):                       # a NamedTuple: keep field names
        return to_jsonable(value._asdict())
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):
        return round(value, 6)
    return value


def format_report(results, *, builtin=True):
    """A few human-readable lines of an :func:`evaluate` result.

    ``builtin=False`` (a run on its own data): the held-out and zero-shot lines say
    "n/a (user data)", as those metrics exist only for the built-in world.
    """
    def get(key):
        v = results.get(key)
        return "  n/a" if v is None else f"{v:5.3f}"

    lines = [
        f"retrieval  i2t R@1 {get('i2t_r1')}  R@5 {get('i2t_r5')}   "
        f"t2i R@1 {get('t2i_r1')}  R@5 {get('t2i_r5')}",
        f"held-out   i2t R@1 {get('heldout_i2t_r1')}  t2i R@1 {get('heldout_t2i_r1')}  "
        f"caption exact {get('heldout_caption_exact')}" if builtin else
        "held-out   n/a (user data: the built-in world's held-out pairs only)",
        f"captions   exact {get('caption_exact')}  BLEU-4 {get('bleu4')}",
        f"zero-shot  color {get('zs_color')}  shape {get('zs_shape')}  size {get('zs_size')}"
        if builtin else "zero-shot  n/a (user data: the built-in world's attributes only)",
        f"test loss  total {get('test_total')}  contrastive {get('test_contrastive')}  "
        f"caption {get('test_caption')}  aux {get('test_aux')}",
    ]
    lines += format_experts(results.get("experts"))
    return "\n".join(lines)


def format_experts(stats):
    """Lines describing expert usage by modality (none for the dense model).

    ``stats`` is the model's statistics (``{"moe": {layer: {"pools": {pool: {"usage"
    (2, E) image/text token counts per expert, "dropped_fraction"}}}}}``).
    """
    layers = (stats or {}).get("moe") or {}
    if not layers:
        return []
    lines = ["experts    share of each modality's routed tokens per expert; dropped fraction"]
    for layer, layer_stats in layers.items():
        for pool, s in layer_stats["pools"].items():
            usage = np.asarray(s["usage"] if s["usage"] is not None else [s["load"]], float)
            parts = []
            for name, row in zip(("image", "text"), usage):
                if row.sum() > 0:
                    share = row / row.sum()                                  # (E,)
                    parts.append(f"{name} [" + " ".join(f"{x:.2f}" for x in share) + "]")
            lines.append(f"  {layer:<9} {pool:<6} " + "  ".join(parts)
                         + f"  dropped {s['dropped_fraction']:.3f}")
    return lines
