"""Sparse upcycling: a trained dense run becomes an MoE run (Komatsuzaki et al., ICLR 2023).

Conversion (:func:`upcycle_params`)
-----------------------------------
At every MoE position of the new config (``ModelConfig.layer_kinds``) the parent's dense
FFN is copied into each of the E experts of every pool (one pool in "shared" mode, an
image and a text pool in "modality" mode), and the pool gets a freshly initialized router;
every other weight (embeddings, attention, layer norms, the dense FFNs elsewhere, the
heads) is copied unchanged.  With ``noise > 0`` each expert's stored weight values get
independent Gaussian noise of std ``noise * rms(weight)`` (biases are copied exactly); the
default is 0, exact copies: the fresh router already sends different tokens to different
experts, so their gradients differ from the first step and the copies drift apart.

Widths: a dense run's FFN at a MoE position has width ``expert_hidden * top_k`` of its
config (:mod:`minivlmoe.model_config`), so the upcycled config takes
``expert_hidden = parent.expert_hidden * parent.top_k`` (each expert has the parent's
shape).  With ``top_k = K >= 2`` every expert is still a full copy, so a token runs through
K copies: the active FFN compute at MoE positions is K times the parent's (the upcycled
model is not at equal compute with its parent, unlike ``train --experts``).  A
"modality" config with K >= 2 and a fusion layer at a MoE position is refused: that
dense fusion FFN would have width ``expert_hidden * K``, which the parent does not have.

The gate scaling (what the converted model computes before any training)
-------------------------------------------------------------------------
The MoE layer computes ``y[n] = sum_{j kept} g[n, j] FFN_{top[n, j]}(x[n])``; all experts
equal the parent's ``FFN``, so ``y[n] = s[n] FFN(x[n])`` with ``s[n] = sum_{j kept} g[n, j]``:

* renormalized gates (the default for K >= 2) and no dropped assignment: ``s = 1``, the
  upcycled model computes exactly what its parent computes;
* raw top-1 gates (the default for K = 1): ``s[n] = p_max[n]``, the router's largest
  probability, about ``1/E`` for a fresh router; with a zero router ``s = 1/E`` exactly
  (ties go to expert 0), so the model equals its parent with every upcycled ``fc2``
  (weight and bias) scaled by ``1/E``; tests/test_upcycle.py checks both relations;
* a dropped assignment (capacity) contributes 0 to ``s``.

So the default top-1 upcycled model starts with its MoE branches shrunk to about a
quarter (E = 4): the residual stream keeps the rest of the parent, and training
recovers (docs/compression.md has the measurement).

The run (:func:`upcycle_run`)
-----------------------------
The output is an ordinary run folder (``eval``, ``caption``, ``retrieve``, ``train
--resume`` work on it): its config is the parent's with the new model and ``steps`` new
steps (warmup ``min(parent's, steps // 5)``, the same peak learning rate and cosine
schedule over the new steps), the same data and seed.  The converted parameters are
written as a step-0 checkpoint and training resumes from it
(:func:`minivlmoe.train.train`), so the loop, the evaluations and the checkpoints are
the ones of every run.  The AdamW moments are *reset* (zeros, step 0): the schedule
restarts with a warmup, and the parent's moments of one FFN would be wrong for E experts
that each see about 1/E of the tokens.  ``DIR/upcycle.json`` records the parent, the
choices and the test losses of the converted model at step 0.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .. import atomic, evaluate, optim
from .._checks import check_choice, check_float, check_int
from ..model_config import check_config
from ..moe import experts as moe_experts
from ..moe.moe_config import MODALITIES

UPCYCLE_MODES = ("shared", "modality")
UPCYCLE_NAME = "upcycle.json"


class UpcycleError(ValueError):
    """A run that cannot be upcycled (not dense, bad expert counts); one line."""


def copy_tree(tree):
    """A deep copy of a parameter tree (CSR weights keep their patterns)."""
    if isinstance(tree, dict):
        return {k: copy_tree(v) for k, v in tree.items()}
    return tree.copy()


def upcycle_config(parent_cfg, *, num_experts, top_k=1, mode="shared"):
    """The MoE config of a dense parent: ``mode`` experts, E = ``num_experts``, K =
    ``top_k``, each expert the parent's FFN width at MoE positions (module docstring).

    Raises UpcycleError (a ValueError) when the parent is not dense or modality mode with
    K >= 2 would change a fusion layer's width; ValueError (naming the argument) when
    ``num_experts < 2``, ``top_k`` is not in [1, num_experts] or ``mode`` is unknown.
    """
    check_config(parent_cfg)
    if parent_cfg.experts != "dense":
        raise UpcycleError(f"the parent run must be dense (experts='dense'), got "
                           f"experts={parent_cfg.experts!r}")
    num_experts = check_int("num_experts", num_experts, 2)
    top_k = check_int("top_k", top_k, 1, num_experts)
    check_choice("mode", mode, UPCYCLE_MODES)
    width = parent_cfg.expert_hidden * parent_cfg.top_k       # the parent's FFN at MoE positions
    cfg = dataclasses.replace(parent_cfg, experts=mode, num_experts=num_experts, top_k=top_k,
                              expert_hidden=width)
    for i, ((kind, hidden), (_, phidden)) in enumerate(zip(cfg.layer_kinds(),
                                                           parent_cfg.layer_kinds())):
        if kind == "ffn" and hidden != phidden:
            raise UpcycleError(f"mode {mode!r} with top_k={top_k} gives the dense FFN of "
                               f"block {i} width {hidden}, but the parent's is {phidden}; "
                               f"use top_k=1 or mode 'shared'")
    return cfg


def moe_blocks(cfg):
    """Indices of the blocks of ``cfg`` that have a MoE layer."""
    return [i for i, (kind, _) in enumerate(cfg.layer_kinds()) if kind in ("moe", "split")]


def _noisy(ffn_params, noise, rng):
    """A copy of one FFN's params with noise on the stored weight values."""
    out = copy_tree(ffn_params)
    if noise > 0:
        for layer in out.values():
            W = layer["W"]
            rms = float(np.sqrt(np.mean(np.square(W.data, dtype=np.float64)))) if W.nnz else 0.0
            W.data += (noise * rms * rng.standard_normal(W.nnz)).astype(W.dtype)  # (nnz,)
    return out


def upcycle_params(parent_params, parent_cfg, cfg, fresh_params, *, noise=0.0, rng=None):
    """The upcycled parameter tree (module docstring).

    Parameters
    ----------
    parent_params : the dense parent's params (not modified).
    parent_cfg : its ModelConfig (experts="dense").
    cfg : the MoE config, from :func:`upcycle_config`.
    fresh_params : ``model.init(rng, cfg)``, whose routers are used (nothing else of it).
    noise : float >= 0, relative std of the noise on the experts' weights (0: exact copies).
    rng : numpy.random.Generator for the noise (needed when noise > 0).

    Returns
    -------
    params : keyed like ``model.init(., cfg)``; expert ``e`` of every pool at block i is
        (a noisy) copy of ``parent_params["blocks"][str(i)]["ffn"]``.
    """
    check_config(cfg)
    noise = check_float("noise", noise, 0.0)
    if noise > 0 and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator when noise > 0, got "
                        f"{type(rng).__name__}")
    if upcycle_config(parent_cfg, num_experts=cfg.num_experts, top_k=cfg.top_k,
                      mode=cfg.experts) != cfg:
        raise ValueError("cfg must be upcycle_config(parent_cfg, ...) of the same experts, "
                         "top_k and mode")
    params = copy_tree(parent_params)
    names = moe_experts.expert_names(cfg.num_experts)
    for i in moe_blocks(cfg):
        block = params["blocks"][str(i)]
        parent_ffn = block.pop("ffn")
        fresh = fresh_params["blocks"][str(i)]["moe"]
        pools = {"shared": fresh} if cfg.experts == "shared" else fresh
        upcycled = {name: {"router": copy_tree(pool["router"]),
                           "experts": {e: _noisy(parent_ffn, noise, rng) for e in names}}
                    for name, pool in pools.items()}
        block["moe"] = upcycled["shared"] if cfg.experts == "shared" else {
            m: upcycled[m] for m in MODALITIES}
        params["blocks"][str(i)] = {k: block[k] for k in ("ln1", "attn", "ln2", "moe")}
    return {k: params[k] for k in fresh_params}


def upcycle_run(parent_dir, out_dir, *, num_experts, top_k=1, mode="shared", steps=None,
                noise=0.0, data_path=None, progress=None):
    """Upcycle the run in ``parent_dir`` into a new run in ``out_dir`` and train it.

    Parameters
    ----------
    parent_dir : a dense run folder (its ckpt.npz).
    out_dir : the new run folder (created; an earlier run's checkpoint there is replaced).
    num_experts, top_k, mode : the MoE (:func:`upcycle_config`).
    steps : new training steps (default: half the parent's configured steps).
    noise : relative std of the experts' weight noise (0: exact copies).
    data_path : where the parent's data file is now, if it moved (runs on their own data).
    progress : a text stream for the training progress line, or None.

    Returns
    -------
    (train.TrainResult, info) with ``info`` the dict written to DIR/upcycle.json.

    Raises
    ------
    UpcycleError for a parent that cannot be upcycled; CheckpointError for a missing or
    damaged parent run; OSError when the folder cannot be written.
    """
    def convert(parent_cfg, parent_params):
        cfg = upcycle_config(parent_cfg, num_experts=num_experts, top_k=top_k, mode=mode)
        return cfg, lambda seed, fresh_params: upcycle_params(
            parent_params, parent_cfg, cfg, fresh_params, noise=noise,
            rng=np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3]))

    return continue_run(parent_dir, out_dir, convert, steps=steps, data_path=data_path,
                        progress=progress,
                        info={"num_experts": num_experts, "top_k": top_k, "mode": mode,
                              "noise": noise})


def continue_run(parent_dir, out_dir, convert=None, *, steps=None, data_path=None,
                 progress=None, info=None):
    """A new run in ``out_dir`` that starts from the weights of the run in ``parent_dir``.

    ``convert(parent_cfg, parent_params)`` returns ``(cfg, make)``, and
    ``make(seed, fresh_params)`` the new run's params given ``model.init`` of ``cfg``
    from the run's seed (None: the parent's model and weights unchanged, i.e. the parent
    trained further with a new schedule, the baseline of docs/compression.md).  The new
    run: the parent's train config with ``steps`` (default half the parent's), warmup
    ``min(parent's, steps // 5)``; AdamW moments reset; a step-0 checkpoint, then
    :func:`minivlmoe.train.train` resumes it.  Returns ``(TrainResult, info)``, ``info``
    (written to DIR/upcycle.json) completed with the parent and the test losses of the
    parent and of the new run at step 0.
    """
    from .. import run_folder
    from ..run_checkpoint import load_checkpoint
    from ..runs import run_config
    from ..train import _data_setup, _fresh_state, train
    from ..userdata import open_source

    ckpt, parent_cfg, parent_train, tokenizer = load_checkpoint(
        os.path.join(parent_dir, run_folder.CKPT_NAME))
    if convert is None:
        cfg, make = parent_cfg, (lambda seed, fresh_params: copy_tree(ckpt.params))
    else:
        cfg, make = convert(parent_cfg, ckpt.params)
    steps = check_int("steps", parent_train.steps // 2 if steps is None else steps, 1)
    train_cfg = dataclasses.replace(parent_train, steps=steps,
                                    warmup_steps=min(parent_train.warmup_steps, steps // 5))
    data = None if "data" not in ckpt.config else open_source(ckpt.config["data"], data_path)
    splits, new_tokenizer, source = _data_setup(cfg, train_cfg, data)
    if new_tokenizer != tokenizer:
        raise UpcycleError(f"the parent's data no longer gives its vocabulary ({parent_dir})")
    config = run_config(cfg, train_cfg, tokenizer, ckpt.config.get("preset"), data=source)

    state = _fresh_state(cfg, train_cfg, len(splits.train))     # fresh routers, data order
    state.params = make(train_cfg.seed, state.params)
    state.opt_state = optim.init_state(state.params)          # moments reset (docstring)
    state.prior_updates = ckpt.step + int(ckpt.extra.get("prior_updates", 0))
    start = evaluate.evaluate(state.params, cfg, splits.test, tokenizer, decode=False)
    parent = evaluate.evaluate(ckpt.params, parent_cfg, splits.test, tokenizer, decode=False)
    info = {"parent": os.path.abspath(parent_dir), "parent_step": ckpt.step, **(info or {}),
            "steps": steps, "optimizer_moments": "reset", "moe_blocks": moe_blocks(cfg),
            "data": source,
            "parent_test": _test_losses(parent), "step0_test": _test_losses(start)}

    run_folder.new_run_folder(out_dir, config)
    state.save(os.path.join(out_dir, run_folder.CKPT_NAME), config, 0.0)
    atomic.atomic_write(os.path.join(out_dir, UPCYCLE_NAME),
                        (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    result = train(cfg, train_cfg, out_dir, data=data, resume=True,
                   preset=ckpt.config.get("preset"), progress=progress)
    return result, info


def _test_losses(results):
    """The test losses and retrieval figures of an evaluation (no decoding)."""
    return {k: results[k] for k in ("test_caption", "test_contrastive", "i2t_r1", "t2i_r1")}
