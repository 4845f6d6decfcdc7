"""A compressed run: convert a trained run's parameters, then fine-tune them in a new run folder.

:func:`compress_run` loads a run's checkpoint, converts its parameters (magnitude
pruning, :mod:`minivlmoe.compress.prune`; or low rank,
:func:`minivlmoe.compress.lowrank.lowrank_params`), writes an ordinary run folder whose
step-0 checkpoint holds the converted parameters with *reset* AdamW moments and fresh
generators (``train_cfg.seed``, as a new run), and fine-tunes it with
:func:`minivlmoe.train.train` (``resume=True``: the same loop, progress line,
evaluation, history and checkpoints as any run).

The run's config.json is the parent's, with the fine-tuning's TrainConfig (``steps`` =
the fine-tuning steps, ``warmup_steps``, ``lr``, ``eval_every = 0``), the model's
``density`` set to the pruning density, and a ``"compressed"`` entry (:data:`KEY`):
method, density, structure, schedule, the parent, the pruned paths and the sha256 of
every sparse pattern (:func:`minivlmoe.compress.prune.pattern_digest`).  A pruned
pattern is not what :func:`minivlmoe.model.init` draws, so
:func:`minivlmoe.run_checkpoint.load_checkpoint` checks the stored patterns against that
digest instead (:func:`check_patterns`); ``eval``, ``caption``, ``retrieve`` and
``train --resume`` then work on the folder as on any run.

Gradual pruning runs the loop in segments: train to the next pruning step
(``stop_at``), prune the parameters of that checkpoint, remap the moments onto the new
pattern (:func:`minivlmoe.compress.prune.remap_moments`), rewrite config.json and the
checkpoint with the new digest, continue.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import NamedTuple

import numpy as np

from .. import atomic, checkpoint, optim, train
from ..run_checkpoint import load_checkpoint
from ..run_folder import CKPT_NAME, CONFIG_NAME, METRICS_NAME, new_run_folder, read_metrics
from ..runs import run_config
from ..tree import flatten
from ..userdata import open_source
from . import prune

KEY = "compressed"      # the config.json entry of a compressed run
METHODS = ("magnitude", "lowrank")
LR_FACTOR = 3.0         # default fine-tuning peak lr / the parent's (finetune_config)


class CompressResult(NamedTuple):
    """What :func:`compress_run` returns.

    out : the run folder.   record : the final evaluation (a metrics.jsonl record).
    parent_record : the parent's last metrics.jsonl record, or None.
    bytes_before, bytes_after : sizes of the parent's and the new ckpt.npz.
    params_bytes_before, params_bytes_after : bytes of the parameters' arrays alone.
    entry : the config's ``"compressed"`` entry.   report : lowrank's per-layer report.
    """

    out: str
    record: dict
    parent_record: dict | None
    bytes_before: int
    bytes_after: int
    params_bytes_before: int
    params_bytes_after: int
    entry: dict
    report: list | None


def params_bytes(params):
    """Bytes of every array of ``params`` (a sparse leaf: data, indices and indptr)."""
    total = 0
    for leaf in flatten(params).values():
        if hasattr(leaf, "indptr"):
            total += leaf.data.nbytes + leaf.indices.nbytes + leaf.indptr.nbytes
        else:
            total += np.asarray(leaf).nbytes
    return int(total)


def check_patterns(config, params, opt_state, fail):
    """A compressed run's stored patterns against its config (called on load).

    ``fail(problem)`` raises.  The sha256 of the parameters' sparse patterns must equal
    ``config["compressed"]["pattern_sha256"]``, and each moment of a sparse weight must
    have the weight's nnz.  Returns how far the parent's training can have moved a
    value that is not decayed (:func:`minivlmoe.run_checkpoint._adam_reach` of the
    parent's TrainConfig and step, recorded in the entry), for the logit-scale check.
    """
    from ..run_checkpoint import _adam_reach
    from ..runs import TrainConfig

    entry = config.get(KEY)
    if not isinstance(entry, dict) or not isinstance(entry.get("pattern_sha256"), str):
        fail(f"config[{KEY!r}] must be a dict with a 'pattern_sha256' string")
    digest = prune.pattern_digest(params)
    if digest != entry["pattern_sha256"]:
        fail(f"the sparse patterns of the parameters do not match the run's config "
             f"(sha256 {entry['pattern_sha256'][:12]}... recorded, {digest[:12]}... stored)")
    flat = flatten(params)
    for part in ("m", "v"):
        for path, moment in flatten(opt_state.get(part, {})).items():
            leaf = flat.get(path)
            if hasattr(leaf, "nnz") and np.shape(moment) != (leaf.nnz,):
                fail(f"opt_state[{part!r}][{path!r}] must have shape ({leaf.nnz},) (the "
                     f"stored entries of params[{path!r}]), got {np.shape(moment)}")
    parent = entry.get("parent")
    try:
        return _adam_reach(TrainConfig.from_dict(parent["train"]), int(parent["step"]))
    except (KeyError, TypeError, ValueError) as e:
        fail(f"config[{KEY!r}]['parent'] must hold the parent's 'train' config and 'step' "
             f"({type(e).__name__}: {str(e)[:100]})")


def _fresh_training_state(train_cfg, n_train):
    """Generators and data stream of a new run of ``train_cfg.seed`` (as train.train)."""
    data_ss, model_ss, _ = np.random.SeedSequence(train_cfg.seed).spawn(3)
    stream = train.BatchStream(n_train, train_cfg.batch_size, np.random.default_rng(data_ss))
    return np.random.default_rng(model_ss), stream


def _save(path, params, opt_state, step, config, model_rng, stream, extra):
    checkpoint.save(path, params=params, opt_state=opt_state, step=step, config=config,
                    rng_state={"model": model_rng.bit_generator.state},
                    extra={"stream": stream.state(), **extra})


def _write_config(out, config):
    atomic.atomic_write(os.path.join(out, CONFIG_NAME),
                        (json.dumps(config, indent=2) + "\n").encode("utf-8"))


def finetune_config(parent_cfg, steps, lr=None, warmup=None):
    """The TrainConfig of a fine-tuning: ``steps`` steps, peak lr ``lr`` (default
    :data:`LR_FACTOR` times the parent's), warmup ``warmup`` (default a twentieth of the
    steps), evaluation at the end only; data, batch size and seed as the parent.

    Pruning to a low density leaves the model far from any optimum of the new pattern,
    and a short fine-tuning has to move far: on the default preset at density 0.1 (300
    steps, oneshot) the test R@1 rose with the peak lr from 1e-3 to 1e-2 (the parent's
    peak is 3e-3; docs/compression.md has the table), so the default is 3x the parent's.
    """
    lr = parent_cfg.lr * LR_FACTOR if lr is None else lr
    warmup = steps // 20 if warmup is None else warmup
    return dataclasses.replace(parent_cfg, steps=steps, lr=lr, warmup_steps=warmup,
                               eval_every=0)


def convert(params, model_cfg, *, method="magnitude", density=None, structure="unstructured",
            keep_ends=True, rank=None, energy=None):
    """(new_params, new_model_cfg, entry, report) of one conversion (no fine-tuning)."""
    if method == "magnitude":
        new_params, names = prune.prune_params(params, density, structure,
                                               keep_ends=keep_ends)
        new_cfg = dataclasses.replace(model_cfg, density=density)
        return new_params, new_cfg, {"pruned": names}, None
    if method == "lowrank":
        from .lowrank import lowrank_params     # minivlmoe/compress/lowrank.py

        new_params, new_cfg, report = lowrank_params(params, model_cfg, rank=rank,
                                                     energy=energy)
        return new_params, new_cfg, {"rank": rank, "energy": energy}, report
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def compress_run(parent, out, *, method="magnitude", density=None, structure="unstructured",
                 schedule="oneshot", finetune_steps=None, interval=None, lr=None,
                 keep_ends=True, rank=None, energy=None, data_path=None,
                 progress=sys.stderr):
    """Compress the run in folder ``parent`` into a new run folder ``out`` and fine-tune it.

    Parameters
    ----------
    parent : a run folder (its ckpt.npz is loaded and checked).
    out : the new run folder (created; an earlier run in it is replaced).
    method : "magnitude" (``density``, ``structure``, ``schedule``, ``interval``,
        ``keep_ends``: :func:`minivlmoe.compress.prune.prune_params`) or "lowrank"
        (``rank`` or ``energy``; one-shot).
    finetune_steps : int >= 1; default a fifth of the parent's steps.
    lr : the fine-tuning's peak learning rate (default 3x the parent's).
    data_path : where the parent's data file is now, if it moved.
    progress : text stream of the progress lines, or None.

    Returns
    -------
    CompressResult
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "magnitude":
        density = prune.check_float("density", density, 0.0, 1.0, low_open=True)
        structure = prune.check_choice("structure", structure, prune.STRUCTURES)
        schedule = prune.check_choice("schedule", schedule, prune.SCHEDULES)
    elif schedule != "oneshot":
        raise ValueError(f"schedule must be 'oneshot' for method 'lowrank', got {schedule!r}")
    parent_ckpt = os.path.join(parent, CKPT_NAME)
    ckpt, model_cfg, parent_train, tokenizer = load_checkpoint(parent_ckpt)
    if KEY in ckpt.config:
        raise ValueError(f"parent must be an uncompressed run, but {parent} is already "
                         f"compressed ({ckpt.config[KEY].get('method')})")
    steps = (max(1, parent_train.steps // 5) if finetune_steps is None
             else prune.check_int("finetune_steps", finetune_steps, 1))
    train_cfg = finetune_config(parent_train, steps, lr)
    data = None if "data" not in ckpt.config else open_source(ckpt.config["data"], data_path)
    plan = (prune.prune_schedule(steps, density, schedule, interval, model_cfg.density)
            if method == "magnitude" else [(0, None)])
    first_density = plan[0][1] if plan[0][0] == 0 else model_cfg.density  # gradual: as parent
    params, new_cfg, entry, report = convert(
        ckpt.params, model_cfg, method=method, density=first_density, structure=structure,
        keep_ends=keep_ends, rank=rank, energy=energy)
    if method == "magnitude":
        new_cfg = dataclasses.replace(model_cfg, density=density)
    entry = {"method": method, **({"density": density, "structure": structure,
                                    "schedule": schedule, "keep_ends": keep_ends,
                                    "pattern_density": first_density,
                                    "prunings": [list(p) for p in plan]}
                                   if method == "magnitude" else {}),
             **entry, "finetune_steps": steps,
             "parent": {"path": os.path.abspath(parent), "step": ckpt.step,
                        "train": parent_train.to_dict()},
             "pattern_sha256": prune.pattern_digest(params)}
    base = run_config(new_cfg, train_cfg, tokenizer, ckpt.config.get("preset"),
                      data=None if data is None else data.source)
    config = {**base, KEY: entry}
    new_run_folder(out, config)
    model_rng, stream = _fresh_training_state(train_cfg, train_cfg.n_train)
    ckpt_path = os.path.join(out, CKPT_NAME)
    _save(ckpt_path, params, optim.init_state(params), 0, config, model_rng, stream,
          {"sums": {}, "count": 0, "elapsed_s": 0.0})
    stops = [t for t, _ in plan if t > 0] + [steps]
    result = None
    for i, stop in enumerate(stops):
        result = train.train(new_cfg, train_cfg, out, data=data, resume=True,
                             stop_at=stop, progress=progress, preset=base["preset"],
                             extra_config={KEY: entry})
        if stop == steps:
            break
        entry = _prune_checkpoint(out, config, entry, plan[i][1], structure,  # gradual
                                  keep_ends)
        config = {**base, KEY: entry}
    record = result.evaluations[-1] if result.evaluations else read_metrics(out)[-1]
    parent_metrics = read_metrics(parent) if os.path.isfile(
        os.path.join(parent, METRICS_NAME)) else []
    return CompressResult(out=out, record=record,
                          parent_record=parent_metrics[-1] if parent_metrics else None,
                          bytes_before=os.path.getsize(parent_ckpt),
                          bytes_after=os.path.getsize(ckpt_path),
                          params_bytes_before=params_bytes(ckpt.params),
                          params_bytes_after=params_bytes(result.params), entry=entry,
                          report=report)


def _prune_checkpoint(out, config, entry, density, structure, keep_ends):
    """One gradual pruning of the checkpoint in ``out``: prune to ``density``, remap the
    moments, save it and config.json with the new digest.  Returns the new entry."""
    path = os.path.join(out, CKPT_NAME)
    ckpt = checkpoint.load(path, expected_config=config)
    params, _ = prune.prune_params(ckpt.params, density, structure, keep_ends=keep_ends)
    opt_state = prune.remap_moments(ckpt.opt_state, ckpt.params, params)
    entry = {**entry, "pattern_density": density, "pattern_sha256": prune.pattern_digest(params)}
    new_config = {**config, KEY: entry}
    checkpoint.save(path, params=params, opt_state=opt_state, step=ckpt.step,
                    config=new_config, rng_state=ckpt.rng_state, extra=ckpt.extra)
    _write_config(out, new_config)
    return entry


def format_result(result, *, builtin=True):
    """The lines ``compress`` prints: the final evaluation, against the parent, and bytes."""
    from ..evaluate import format_report

    lines = [format_report(result.record, builtin=builtin)]
    if result.parent_record is not None:
        keys = ("i2t_r1", "t2i_r1", "caption_exact", "test_caption")
        lines.append("vs the parent:  " + "  ".join(
            f"{k} {result.parent_record[k]:.3f} -> {result.record[k]:.3f}"
            for k in keys if k in result.parent_record and k in result.record))
    lines.append(f"ckpt.npz bytes: {result.bytes_before:,} -> {result.bytes_after:,} "
                 f"({result.bytes_after / result.bytes_before:.3f}x; parameters alone "
                 f"{result.params_bytes_before:,} -> {result.params_bytes_after:,})")
    lines.append(f"run folder: {result.out}")
    return "\n".join(lines)
