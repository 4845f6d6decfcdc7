"""Fixtures and gradient-check cases of the whole model (minivlmoe/model.py).

* :func:`tiny_config`, :func:`tiny_params`, :func:`tiny_batch` -- a tiny float64 model,
  well-conditioned parameters and a random batch;
* :func:`directional_case` -- a GradcheckCase checking one random directional derivative
  per parameter leaf (:func:`directional_leaves` names the coefficients);
* :func:`lowrank_config` -- a tiny config with every linear layer but the routers factored;
* :func:`gradcheck_cases` -- one case per expert mode, then the :data:`ROUTER_TASK`
  cases (auxiliary losses off, so the router's gradient is the task's alone) and the
  factored model, for ``minivlmoe gradcheck``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

from .. import model, model_config
from ..gradcheck import GradcheckCase
from ..tree import flatten, unflatten, with_values


# every auxiliary-loss weight at 0: the router then learns from the task loss alone
NO_AUX = dict(load_balance=0.0, z_loss=0.0, importance=0.0, entropy_local=0.0,
              entropy_global=0.0)
# (expert mode, label, tiny_config overrides) of the whole-model cases whose router
# gradient is the task's alone and non-zero: top-2 renormalized over 3 experts (with
# k = E the renormalizer would be 1 and its term vanish) and top-1 raw.  Top-1
# renormalized (task_blind_top1) would give the router exactly zero task gradient.
ROUTER_TASK = (("shared", "k=2 renorm", dict(num_experts=3, top_k=2, **NO_AUX)),
               ("modality", "k=1 raw", dict(top_k=1, renormalize=False, **NO_AUX)))


def tiny_config(experts="shared", **overrides):
    """A tiny float64 config for gradient checks (width 8, 2 layers, 2 experts, dropless,
    top-1 with the default gates: raw, so the router gets a task gradient)."""
    base = dict(image_size=4, patch=2, channels=2, vocab_size=7, max_text_len=5, width=8,
                heads=2, layers=2, mlp_hidden=6, experts=experts, num_experts=2, top_k=1,
                capacity_factor=None, moe_every=1, fusion_layers=1, density=1.0,
                embed_dim=4, load_balance=0.1, z_loss=0.01, importance=0.1,
                entropy_local=0.1, entropy_global=0.1, dtype="float64")
    base.update(overrides)
    return model_config.ModelConfig(**base)


def lowrank_config(experts="shared", rank=3, **overrides):
    """:func:`tiny_config` with every linear layer except the MoE routers factored at
    ``rank`` (attention, FFNs, experts, the patch projection and the three heads)."""
    cfg = tiny_config(experts, **overrides)
    plain = model.init(np.random.default_rng(0), cfg)
    paths = sorted({path.rsplit(".", 1)[0] for path in flatten(plain)
                    if path.endswith(".W") and ".router." not in path})
    return dataclasses.replace(cfg, lowrank={path: rank for path in paths})


def tiny_params(rng, cfg):
    """:func:`minivlmoe.model.init`, then the embedding tables rescaled from std 0.02 to std 1.

    With std-0.02 embeddings every first LayerNorm divides by ~0.02, so the loss has a
    large curvature there and centered differences lose digits; gradient checks use
    these better-conditioned parameters instead.
    """
    params = model.init(rng, cfg)
    for group, key in (("patch", "cls"), ("patch", "pos"), ("text", "tok"), ("text", "pos")):
        params[group][key] *= 50.0
    return params


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
        losses, _, cache = model.forward(perturbed(a["c"]), cfg, images, ids, pad_id=pad_id,
                                         keys=keys)
        return losses["total"], cache

    def bwd(dout, cache):
        g = flatten(model.backward(dout, cache))                   # gradient of dout * total
        dc = {}
        for group, paths in groups.items():
            values = [g[p].data if isinstance(g[p], sp.csr_array) else g[p] for p in paths]
            dc[group] = np.array([np.sum(gv * directions[p])
                                  for gv, p in zip(values, paths)])  # (leaves,)
        return {"c": dc}

    coeffs = {group: np.zeros(len(paths)) for group, paths in groups.items()}
    return GradcheckCase(name, {"c": coeffs}, fwd, bwd, h=1e-5)


def router_task_case_name(mode, label):
    """The gradcheck op name of a :data:`ROUTER_TASK` case."""
    return f"model(experts={mode}, {label}, no aux)"


def gradcheck_cases(rng):
    """Tiny float64 whole-model cases (both objectives on): one per expert mode (top-1
    raw gates, every auxiliary loss on), one per :data:`ROUTER_TASK` setting, and the
    modality mode with image experts only and with text experts only."""
    settings = [(f"model(experts={mode})", mode, {}) for mode in model_config.EXPERT_MODES]
    settings += [(router_task_case_name(mode, label), mode, overrides)
                 for mode, label, overrides in ROUTER_TASK]
    cases = []
    for name, mode, overrides in settings:
        cfg = tiny_config(mode, **overrides)
        params = tiny_params(rng, cfg)
        images, ids = tiny_batch(rng, cfg)
        cases.append(directional_case(name, params, cfg, images, ids,
                                      pad_id=0, keys=np.array([0, 1, 0]), rng=rng))
    cfg = lowrank_config("shared")       # factored layers (A, B leaves) everywhere
    params = tiny_params(rng, cfg)
    images, ids = tiny_batch(rng, cfg)
    cases.append(directional_case("model(experts=shared, lowrank rank 3)", params, cfg, images,
                                  ids, pad_id=0, keys=np.array([0, 1, 0]), rng=rng))
    for where in ("image", "text"):       # VL-MoE's ablation: experts for one modality only
        cfg = tiny_config("modality", moe_modalities=where)
        params = tiny_params(rng, cfg)
        images, ids = tiny_batch(rng, cfg)
        cases.append(directional_case(f"model(modality mode, {where} experts only)",
                                      params, cfg, images, ids, pad_id=0,
                                      keys=np.array([0, 1, 0]), rng=rng))
    return cases
