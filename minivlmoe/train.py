"""Training loop: the data order, the step loop, periodic evaluation, checkpoints and resume.

One run
-------
``train(model_cfg, train_cfg, out_dir)`` draws the built-in world's train and test
splits (:func:`minivlmoe.runs.make_data` with ``train_cfg.data_seed``; with
``data=UserData(path)`` it splits your data set instead), initializes
the model from ``train_cfg.seed`` and repeats ``train_cfg.steps`` times::

    idx                = stream.next()                 # (B,) a shuffled batch of pairs
    losses, grads, st  = model.loss_and_grads(params, cfg, images[idx], ids[idx],
                                              keys=keys[idx], rng=model_rng, train=True,
                                              all_losses=False)   # weighted aux only
    optim.step(params, grads, opt_state, adamw)        # AdamW, in place

Every ``eval_every`` steps and at the end it runs :func:`minivlmoe.evaluate.evaluate`
on the test split, appends one JSON line to ``DIR/metrics.jsonl`` and writes
``DIR/ckpt.npz`` (atomically, :mod:`minivlmoe.checkpoint`); just before, the steps since
the last checkpoint go to ``DIR/history.jsonl`` (one line per step: lr, grad_norm and the
losses), so the history ends at the checkpoint's step and a resume truncates it to that
step, like metrics.jsonl.  ``DIR/config.json`` holds the run's configuration (the
configurations and presets: :mod:`minivlmoe.runs`; the files:
:mod:`minivlmoe.run_folder`).  A progress line goes to stderr at most every
``PROGRESS_EVERY_S`` seconds (:class:`minivlmoe.progress.Progress`).

Randomness and resume
---------------------
Two generators, both seeded from ``train_cfg.seed``: ``data_rng`` draws one permutation
of the training pairs per epoch (:class:`BatchStream`), ``model_rng`` everything the
model draws (router noise).  A checkpoint stores the parameters, the AdamW state, the
step, ``model_rng``'s state and the data stream's position (the state of ``data_rng``
at the start of the current epoch plus the offset into that epoch's permutation), and
the running sums of the losses since the last evaluation.  Resuming restores all of
them, so the resumed run computes the same losses, bit for bit, as an uninterrupted
one (float32 and float64 alike; tests/test_train.py checks it).

Divergence and clipping
-----------------------
Each step's losses are checked as soon as they are known, before anything is logged or
saved, and each evaluation's figures before they are written: a step or an evaluation
that breaks the rule of :mod:`minivlmoe.divergence` stops training with
:class:`minivlmoe.divergence.TrainingDiverged`, and a warning line says when clipping
dominates the gradients (:class:`minivlmoe.divergence.ClipMonitor`).

Tokens per second counts each pair's input tokens once: (1 + P) image tokens plus T
text tokens per pair.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from . import checkpoint, evaluate, model, model_config, optim
from ._checks import check_bool, check_int, error_line, shorten
from .data import minibatch_indices
from .divergence import ClipMonitor, DivergenceCheck, TrainingDiverged, blew_up, non_finite
from .progress import Progress
from .rng_state import restore_rng
from .run_checkpoint import load_checkpoint
from .run_folder import (CKPT_NAME, HISTORY_NAME, METRICS_NAME, append_jsonl, new_run_folder,
                         remove_run_temps, truncate_history, truncate_metrics)
from .runs import TrainConfig, builtin_tokenizer, data_tokenizer, make_data, run_config
from .timing import NULL_TIMER
from .tokenizer import PAD_ID
from .userdata import resolve


# ----------------------------------------------------------------------------- data order

class BatchStream:
    """Shuffled batches of ``range(n)``, one permutation per epoch, resumable exactly.

    Each epoch is one pass of :func:`minivlmoe.data.minibatch_indices` with
    ``drop_last=True`` (the one shuffler: it draws ``rng.permutation(n)`` and yields its
    consecutive ``batch_size`` slices; the incomplete tail is dropped, so every batch is
    full).  :meth:`state` is the generator's state *before* the current epoch's
    permutation was drawn plus the offset into it; :meth:`from_state` redraws the same
    permutation from that state, which also leaves the generator where it was.
    """

    def __init__(self, n, batch_size, rng):
        self.n = check_int("n", n, 1)
        self.batch_size = check_int("batch_size", batch_size, 1, n)
        self.rng = rng
        self._new_epoch()

    def _new_epoch(self):
        self.epoch_state = self.rng.bit_generator.state
        self.batches = minibatch_indices(self.n, self.batch_size, self.rng, drop_last=True)
        self.pos = 0

    def next(self):
        """The next (batch_size,) int64 index array."""
        idx = next(self.batches, None)                                 # (b,)
        if idx is None:                                                # the epoch is over
            self._new_epoch()
            idx = next(self.batches)                                   # (b,)
        self.pos += self.batch_size
        return idx

    def state(self):
        return {"epoch_rng": self.epoch_state, "pos": self.pos}

    @classmethod
    def from_state(cls, n, batch_size, state):
        stream = cls.__new__(cls)
        stream.n, stream.batch_size = n, batch_size
        stream.rng = restore_rng(state["epoch_rng"])
        stream._new_epoch()
        pos = check_int("pos", state["pos"], 0, n)
        if pos % batch_size:
            raise ValueError(f"pos must be a multiple of batch_size={batch_size}, got {pos}")
        for _ in range(pos // batch_size):                             # replay the epoch
            stream.next()
        return stream


# ----------------------------------------------------------------------------- the loop

class TrainResult(NamedTuple):
    """What :func:`train` returns.

    params : the trained parameters.   opt_state : the AdamW state.
    step : the last step done.   history : list of per-step dicts (step, lr, grad_norm
    and the losses) for the steps run by *this* call.   evaluations : the records
    appended to metrics.jsonl by this call.   stopped : True if ``stop_at`` ended the
    call before ``steps``.
    """

    params: dict
    opt_state: dict
    step: int
    history: list
    evaluations: list
    stopped: bool


def _loss_keys(losses):
    return ("total", "contrastive", "caption", "aux") + tuple(
        k for k in losses if k not in ("total", "contrastive", "caption", "aux"))


@dataclasses.dataclass
class _RunState:
    """Everything a checkpoint must restore for the next step to be the same."""

    params: dict
    opt_state: dict
    step: int
    model_rng: np.random.Generator
    stream: BatchStream
    sums: dict            # loss sums since the last evaluation
    count: int            # steps in those sums
    elapsed0: float       # wall seconds of earlier sessions of this run
    prior_updates: int = 0  # AdamW updates of a parent run (minivlmoe/compress/upcycle.py)

    def save(self, path, config, elapsed):
        extra = {"stream": self.stream.state(), "sums": self.sums, "count": self.count,
                 "elapsed_s": elapsed}
        if self.prior_updates:                # only runs made from another run's weights
            extra["prior_updates"] = self.prior_updates
        checkpoint.save(path, params=self.params, opt_state=self.opt_state, step=self.step,
                        config=config, rng_state={"model": self.model_rng.bit_generator.state},
                        extra=extra)


def _fresh_state(model_cfg, train_cfg, n_train):
    """Initial parameters, optimizer state and generators from ``train_cfg.seed``."""
    data_ss, model_ss, init_ss = np.random.SeedSequence(train_cfg.seed).spawn(3)
    params = model.init(np.random.default_rng(init_ss), model_cfg)
    stream = BatchStream(n_train, train_cfg.batch_size, np.random.default_rng(data_ss))
    return _RunState(params, optim.init_state(params), 0, np.random.default_rng(model_ss),
                     stream, {}, 0, 0.0)


def _resumed_state(path, config, train_cfg, n_train):
    """The state saved in the checkpoint ``path`` (whose config must equal ``config``)."""
    ckpt, _, _, _ = load_checkpoint(path, expected_config=config)
    try:
        return _RunState(ckpt.params, ckpt.opt_state, ckpt.step,
                         restore_rng(ckpt.rng_state["model"]),
                         BatchStream.from_state(n_train, train_cfg.batch_size,
                                                ckpt.extra["stream"]),
                         dict(ckpt.extra["sums"]), int(ckpt.extra["count"]),
                         float(ckpt.extra["elapsed_s"]),
                         int(ckpt.extra.get("prior_updates", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(
            f"checkpoint {os.fspath(path)}: no valid training state to resume from "
            f"({error_line(e)})") from None


def _eval_record(state, model_cfg, train_cfg, test, tokenizer, *, lr, elapsed, decode):
    """Evaluate on the test split; the metrics.jsonl record (resets the loss sums)."""
    results = evaluate.evaluate(state.params, model_cfg, test, tokenizer, decode=decode)
    train_losses = {f"train_{k}": v / state.count for k, v in state.sums.items()}
    record = {"step": state.step, "elapsed_s": round(elapsed, 3),
              "epoch": round(state.step * train_cfg.batch_size / train_cfg.n_train, 3),
              "lr": lr,
              # the figures most people look for, also under their short names
              **{k: train_losses[f"train_{k}"] for k in ("total", "contrastive", "caption",
                                                         "aux")},
              **train_losses,
              **{k: v for k, v in results.items() if k != "experts"},
              "experts": results["experts"]}
    state.sums, state.count = {}, 0
    return record


def _data_setup(model_cfg, train_cfg, data):
    """(splits, tokenizer, source) of the built-in world (``data=None``) or your data
    (:func:`minivlmoe.userdata.resolve`), checking that the configs fit the data."""
    if data is None:
        return make_data(train_cfg, model_cfg.image_size), builtin_tokenizer(), None
    splits, source, name = resolve(data, train_cfg.data_seed)
    tokenizer = data_tokenizer(splits.train)
    want = {"model_cfg.image_size": (model_cfg.image_size, splits.train.image_size),
            "model_cfg.vocab_size": (model_cfg.vocab_size, tokenizer.vocab_size),
            "model_cfg.max_text_len": (model_cfg.max_text_len,
                                       tokenizer.max_words(splits.train.captions) + 2),
            "train_cfg.n_train": (train_cfg.n_train, len(splits.train)),
            "train_cfg.n_test": (train_cfg.n_test, len(splits.test))}
    for field, (got, expected) in want.items():
        if got != expected:
            raise ValueError(f"{field} must be {expected} for the data {name}, got {got}; "
                             f"build the configs with runs.preset_configs(..., data=data)")
    return splits, tokenizer, source


def train(model_cfg, train_cfg, out_dir=None, *, data=None, resume=False, stop_at=None,
          progress=sys.stderr, preset=None, timer=None, decode_eval=True, extra_config=None,
          parallel=None):
    """Train a model on the built-in world or your data; write metrics and checkpoints.

    Parameters
    ----------
    model_cfg : model_config.ModelConfig.   train_cfg : TrainConfig.
    out_dir : str or None; None writes nothing (no resume then).
    data : None (the built-in world of ``train_cfg``), a
        :class:`minivlmoe.userdata.UserData` (split with ``train_cfg.data_seed``; its
        file is recorded in config.json, so the CLI can reload the run) or a pair
        ``(train, test)`` of ImageCaptionDataset (a digest is recorded; reload it from
        Python).  Build the configs with ``runs.preset_configs(..., data=data)``; the
        tokenizer is every word of the training captions.
    resume : continue from ``out_dir/ckpt.npz`` (whose config must equal this one);
        metrics.jsonl keeps its records up to the checkpoint's step (a torn last line
        is dropped) and the temporary files of killed writes are removed.
        Without it a run starts afresh (:func:`minivlmoe.run_folder.new_run_folder`).
    stop_at : int or None; end this call after that step (saving a checkpoint), as if
        interrupted; the schedule still runs to ``train_cfg.steps``.
    progress : a text stream for the progress line, or None for silence.
    preset : the preset's name, recorded in config.json.
    timer : optional :class:`minivlmoe.timing.SectionTimer` (or any object with
        ``section(name)``).
    decode_eval : include greedy decoding (caption metrics) in the evaluations.
    extra_config : dict or None; entries added to the run's config (e.g. the
        ``"compressed"`` entry of a pruned run, :mod:`minivlmoe.compress.finetune`).
    parallel : None, or one rank's :class:`minivlmoe.parallel.ep_train.ExpertParallel`:
        its ``loss_and_grads`` replaces the model's, and only its ``writer`` (rank 0)
        touches ``out_dir`` (the others only read the checkpoint to resume) and evaluates.

    Returns
    -------
    TrainResult(params, opt_state, step, history, evaluations, stopped)

    Raises
    ------
    checkpoint.CheckpointError if ``resume`` and the checkpoint is missing, damaged or
    from a different configuration, or metrics.jsonl is damaged before its last line
    (:class:`minivlmoe.run_folder.MetricsError`).  TrainingDiverged when the loss diverges
    (:mod:`minivlmoe.divergence`; nothing of the diverged step is logged or saved).
    OSError when the run folder cannot be written (a failed checkpoint save leaves the
    previous checkpoint intact).
    """
    if not isinstance(model_cfg, model_config.ModelConfig):
        raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
    if not isinstance(train_cfg, TrainConfig):
        raise TypeError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
    if stop_at is not None:
        stop_at = check_int("stop_at", stop_at, 1, train_cfg.steps)
    resume = check_bool("resume", resume)
    decode_eval = check_bool("decode_eval", decode_eval)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the folder of the run to continue)")
    t_start = time.perf_counter()
    splits, tokenizer, source = _data_setup(model_cfg, train_cfg, data)
    config = {**run_config(model_cfg, train_cfg, tokenizer, preset, data=source),
              **(extra_config or {})}
    images = splits.train.images.astype(model_cfg.dtype, copy=False)   # (Bn, R, R, Ch)
    ids = tokenizer.encode(splits.train.captions, model_cfg.max_text_len)  # (Bn, T)
    keys = evaluate.caption_keys(splits.train.captions)                # (Bn,)
    adamw = train_cfg.adamw()

    ckpt_path = None if out_dir is None else os.path.join(out_dir, CKPT_NAME)
    metrics_path = None if out_dir is None else os.path.join(out_dir, METRICS_NAME)
    history_path = None if out_dir is None else os.path.join(out_dir, HISTORY_NAME)
    loss_and_grads = model.loss_and_grads if parallel is None else parallel.loss_and_grads
    writer = parallel is None or parallel.writer   # expert parallel: rank 0 writes
    if resume:
        if writer:
            remove_run_temps(out_dir)              # left by writes a kill interrupted
        state = _resumed_state(ckpt_path, config, train_cfg, len(ids))
        if writer:
            truncate_metrics(out_dir, state.step)  # also drops a torn last line
            truncate_history(out_dir, state.step)
    else:
        state = _fresh_state(model_cfg, train_cfg, len(ids))
        if out_dir is not None and writer:
            new_run_folder(out_dir, config)
    if not writer:
        out_dir = None                             # the other ranks write nothing

    def elapsed():
        return state.elapsed0 + time.perf_counter() - t_start

    P = (model_cfg.image_size // model_cfg.patch) ** 2
    bar = Progress(progress, train_cfg.steps,
                    train_cfg.batch_size * (1 + P + model_cfg.max_text_len), state.step)
    sections = timer if timer is not None else NULL_TIMER
    history, evaluations = [], []
    check, clips = DivergenceCheck(), ClipMonitor(adamw.max_grad_norm)
    saved_step = state.step if resume else None        # the checkpoint on disk
    written = 0                                 # history[:written] is in history.jsonl

    def diverged(step, problem, loss=None):
        kept = ckpt_path if saved_step is not None else None
        where = (f"the checkpoint of step {saved_step} is kept: {kept}" if kept else
                 "no checkpoint was written")
        return TrainingDiverged(f"training diverged at step {step}: {problem}; lower the "
                                f"learning rate (lr {train_cfg.lr:g}) ({where})",
                                step=step, loss=loss, checkpoint=kept,
                                checkpoint_step=saved_step if kept else None)

    last = stop_at if stop_at is not None else train_cfg.steps
    while state.step < last:
        with sections.section("data"):
            idx = state.stream.next()                                  # (B,)
            batch = images[idx], ids[idx], keys[idx]
        try:
            losses, grads, _ = loss_and_grads(state.params, model_cfg, batch[0], batch[1],
                                              pad_id=PAD_ID, keys=batch[2],
                                              rng=state.model_rng, train=True,
                                              all_losses=False, timer=sections)
        except (FloatingPointError, ValueError) as e:
            if state.step == 0 or not blew_up(e):    # initial parameters: not divergence
                raise
            raise diverged(state.step + 1, "the forward pass failed on the updated "
                           f"parameters ({error_line(e)})") from e
        with sections.section("optimizer"):
            info = optim.step(state.params, grads, state.opt_state, adamw)
        state.step += 1
        losses = {k: float(losses[k]) for k in _loss_keys(losses)}
        problem = check.problem(losses)
        if problem is not None:
            raise diverged(state.step, problem, losses["total"])
        clips.add(info["grad_norm"])
        history.append({"step": state.step, "lr": info["lr"],
                        "grad_norm": info["grad_norm"], **losses})
        for k, v in losses.items():
            state.sums[k] = state.sums.get(k, 0.0) + v
        state.count += 1
        bar.update(state.step, losses, info["lr"], elapsed())

        if writer and (state.step == train_cfg.steps or (
                train_cfg.eval_every and state.step % train_cfg.eval_every == 0)):
            clips.report(state.step, progress)
            bar.evaluating(state.step, len(splits.test))
            try:
                record = _eval_record(state, model_cfg, train_cfg, splits.test, tokenizer,
                                      lr=info["lr"], elapsed=elapsed(), decode=decode_eval)
            except (FloatingPointError, ValueError) as e:
                if not blew_up(e):
                    raise
                raise diverged(state.step, "the evaluation failed on the updated "
                               f"parameters ({error_line(e)})") from e
            bad = non_finite(record)
            if bad:                               # never logged, never saved
                raise diverged(state.step, "the evaluation gave non-finite values "
                               f"({shorten(', '.join(bad))})")
            evaluations.append(record)
            bar.evaluation(record)
            if out_dir is not None:
                append_jsonl(history_path, history[written:])
                written = len(history)
                append_jsonl(metrics_path, record)
                state.save(ckpt_path, config, elapsed())
                saved_step = state.step
        elif out_dir is not None and state.step == last:
            clips.report(state.step, progress)
            append_jsonl(history_path, history[written:])
            written = len(history)
            state.save(ckpt_path, config, elapsed())    # stop_at: a checkpoint to resume
    return TrainResult(params=state.params, opt_state=state.opt_state, step=state.step,
                       history=history, evaluations=evaluations,
                       stopped=state.step < train_cfg.steps)
