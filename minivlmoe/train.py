"""Training loop: the data order, the step loop, periodic evaluation, checkpoints and resume.

One run
-------
``train(model_cfg, train_cfg, out_dir)`` draws the built-in world's train and test
splits (:func:`minivlmoe.runs.make_data` with ``train_cfg.data_seed``; with
``data=UserData(path)`` it splits your data set instead), initializes
the model from ``train_cfg.seed`` and repeats ``train_cfg.steps`` times::

    idx                = stream.next()                 # (B,) a shuffled batch of pairs
    losses, grads, st  = model.loss_and_grads(params, cfg, images[idx], ids[idx],
                                              keys=keys[idx], rng=model_rng, train=True)
    optim.step(params, grads, opt_state, adamw)        # AdamW, in place

Every ``eval_every`` steps and at the end it runs :func:`minivlmoe.evaluate.evaluate`
on the test split, appends one JSON line to ``DIR/metrics.jsonl`` and writes
``DIR/ckpt.npz`` (atomically, :mod:`minivlmoe.checkpoint`); just before, the steps since
the last checkpoint go to ``DIR/history.jsonl`` (one line per step: lr, grad_norm and the
losses), so the history ends at the checkpoint's step and a resume truncates it to that
step, like metrics.jsonl.  ``DIR/config.json`` holds the run's configuration (the
configurations and presets: :mod:`minivlmoe.runs`; the files: :mod:`minivlmoe.run_folder`).  A progress line goes to
stderr at most every ``PROGRESS_EVERY_S`` seconds.

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
Step ``s``'s losses are checked as soon as they are known, before anything is logged
or saved.  Training stops with :class:`TrainingDiverged` (the CLI prints it as one line
and exits 1) when

* any loss of the step is NaN or infinite, or
* the total loss exceeds ``DIVERGENCE_FACTOR`` (10) times the lowest running mean seen
  so far in this call, the running mean being the mean of the last
  ``DIVERGENCE_WINDOW`` (20) step losses (of all the steps so far while fewer than 20
  have run), or
* after the first update, the model's forward or backward (or an evaluation) fails on
  the updated parameters with a FloatingPointError or a ValueError about non-finite
  values (the data and the configuration are unchanged since the first step, so only
  the parameters can have gone wrong), or
* an evaluation returns a NaN or infinite figure (then neither its metrics line nor
  its checkpoint is written).

A normal run's loss starts at its highest (about 6.8 for tiny, 8.4 for default) and
decreases with per-step noise; the largest ratio of a step's loss to the reference
measured on normal runs is 3.2 (tiny, 1000 steps, overfitting to a loss of 0.25) and
1.3 (default, 300 steps), so the factor 10 leaves a margin of 3.  ``--lr 10`` on tiny
breaks it at step 3 (353 > 10 x 6.80), ``--lr 100`` at step 2.  The reference starts
again after a resume.  Nothing of a step that breaks the rule is logged or saved, so
the checkpoint on disk is the one of the last evaluation before it.  (That checkpoint's own loss is only measured by the next step:
when the divergence starts with the very update before an evaluation, only its test
figures, which must be finite, vouch for it.)

Gradients are clipped on *every* step of a normal run (norms 2 to 90 against
``max_grad_norm = 1``; with AdamW, which divides by the gradients' running RMS, a
constant clipping factor changes almost nothing), so being clipped is not a warning
sign by itself.  A warning line is printed once per evaluation interval (at the
evaluation, and at a ``stop_at`` end) when on more than half of the interval's steps
the gradient norm exceeded ``CLIP_WARN_RATIO`` (1000) times ``max_grad_norm``: ten
times the largest ratio a normal run shows (about 90, at initialization).

Tokens per second counts each pair's input tokens once: (1 + P) image tokens plus T
text tokens per pair.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from . import checkpoint, evaluate, model, optim
from ._checks import check_int
from .data import minibatch_indices
from .run_checkpoint import load_checkpoint
from .run_folder import (CKPT_NAME, HISTORY_NAME, METRICS_NAME, append_jsonl, new_run_folder,
                         remove_run_temps, truncate_history, truncate_metrics)
from .runs import TrainConfig, builtin_tokenizer, data_tokenizer, make_data, run_config
from .timing import NULL_TIMER
from .tokenizer import PAD_ID
from .userdata import resolve

PROGRESS_EVERY_S = 2.0
DIVERGENCE_FACTOR = 10.0    # a step's total loss above this many times the reference ...
DIVERGENCE_WINDOW = 20      # ... the lowest mean of this many consecutive step losses
CLIP_WARN_RATIO = 1000.0    # warn when most steps' grad norm exceed this x max_grad_norm
_SHOW = 200                 # characters of an echoed value in a message


def _short(text):
    text = " ".join(str(text).split())
    return text if len(text) <= _SHOW else text[:_SHOW - 3] + "..."


class TrainingDiverged(FloatingPointError):
    """Training stopped because the loss diverged (module docstring, "Divergence").

    The message names the step, the loss and the rule broken, and the checkpoint kept
    (the last one written before the rule broke).  Attributes: ``step`` (the step that
    broke the rule), ``loss`` (its total loss, may be NaN or inf; None if the forward
    failed), ``checkpoint`` (path of the checkpoint kept on disk, or None) and
    ``checkpoint_step``.
    """

    def __init__(self, message, *, step, loss=None, checkpoint=None, checkpoint_step=None):
        super().__init__(message)
        self.step, self.loss = step, loss
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step


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
        stream.rng = checkpoint.restore_rng(state["epoch_rng"])
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


def _fmt_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Progress:
    """The stderr progress line, written at most every PROGRESS_EVERY_S seconds.

    tokens/s and the ETA come from the (time, step) pairs of the last 50 steps since the
    start or the last evaluation, the start or the evaluation's end included, so the very
    first line and the first line after an evaluation have them too.
    """

    def __init__(self, stream, total_steps, tokens_per_step, step=0):
        self.stream, self.total, self.tokens = stream, total_steps, tokens_per_step
        self.last = -math.inf
        # (time, step) of the last steps since the start or the last evaluation
        self.window = collections.deque([(time.perf_counter(), step)], maxlen=51)

    def update(self, step, losses, lr, elapsed):
        now = time.perf_counter()
        self.window.append((now, step))
        if self.stream is None or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        (t0, s0), (t1, s1) = self.window[0], self.window[-1]
        rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0      # steps per second
        eta = (self.total - step) / rate if rate > 0 else 0.0
        speed = f"{rate * self.tokens:,.0f}" if rate > 0 else "?"
        print(f"step {step:>5}/{self.total} | loss {losses['total']:.4f} "
              f"(con {losses['contrastive']:.3f} cap {losses['caption']:.3f} "
              f"aux {losses['aux']:.4f}) | lr {lr:.2e} | {speed} tok/s | "
              f"{_fmt_time(elapsed)} elapsed, ETA {_fmt_time(eta) if rate > 0 else '?'}",
              file=self.stream, flush=True)

    def evaluating(self, step, n_test):
        """Say that an evaluation starts (it takes seconds with no other output)."""
        if self.stream is not None:
            print(f"step {step:>5}/{self.total} | evaluating on {n_test} test pairs ...",
                  file=self.stream, flush=True)

    def evaluation(self, record):
        self.window.clear()                  # the evaluation's pause is not a slow step
        self.window.append((time.perf_counter(), record["step"]))
        if self.stream is not None:
            print(f"eval @ step {record['step']}: i2t R@1 {record['i2t_r1']:.3f}  "
                  f"t2i R@1 {record['t2i_r1']:.3f}  caption exact "
                  f"{record.get('caption_exact', float('nan')):.3f}  BLEU-4 "
                  f"{record.get('bleu4', float('nan')):.3f}", file=self.stream, flush=True)


class _DivergenceCheck:
    """The divergence rule on the step losses (module docstring, "Divergence")."""

    def __init__(self):
        self.window = collections.deque(maxlen=DIVERGENCE_WINDOW)     # last K totals
        self.best = math.inf                       # lowest mean of the window so far

    def problem(self, losses):
        """None if the step's losses keep the rule, else what is wrong (one line)."""
        bad = [f"{k}={v}" for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            return f"non-finite loss ({_short(', '.join(bad))})"
        total = losses["total"]
        if self.best > 0 and total > DIVERGENCE_FACTOR * self.best:
            return (f"total loss {total:.4g} > {DIVERGENCE_FACTOR:g} x {self.best:.4g}, "
                    f"the lowest mean of {DIVERGENCE_WINDOW} consecutive step losses so far")
        self.window.append(total)
        self.best = min(self.best, sum(self.window) / len(self.window))
        return None


def _non_finite(tree, path=""):
    """'key=value' of every NaN or infinite float in a nested dict/list of a record."""
    if isinstance(tree, dict):
        return [b for k, v in tree.items() for b in _non_finite(v, f"{path}.{k}" if path
                                                                     else str(k))]
    if isinstance(tree, (list, tuple)):
        return [b for i, v in enumerate(tree) for b in _non_finite(v, f"{path}[{i}]")]
    if isinstance(tree, float) and not math.isfinite(tree):
        return [f"{path}={tree}"]
    return []


def _blew_up(error):
    """Is ``error``, raised by the model on updated parameters, a sign of divergence?

    FloatingPointError always; ValueError when it is a finiteness check of an op's input
    (the library's checks say "must be finite").  Anything else is a bug: re-raised.
    """
    return isinstance(error, FloatingPointError) or (isinstance(error, ValueError)
                                                     and "finite" in str(error))


class _ClipMonitor:
    """Counts the steps whose gradient norm exceeds CLIP_WARN_RATIO x max_grad_norm."""

    def __init__(self, max_grad_norm):
        self.limit = None if max_grad_norm is None else CLIP_WARN_RATIO * max_grad_norm
        self.max_grad_norm = max_grad_norm
        self.norms, self.since = [], 0

    def add(self, grad_norm):
        self.norms.append(grad_norm)

    def report(self, step, stream):
        """Print the warning if more than half of the steps since the last report were
        clipped by more than CLIP_WARN_RATIO; start a new interval."""
        hard = 0 if self.limit is None else sum(n > self.limit for n in self.norms)
        if hard * 2 > len(self.norms):
            print(f"warning: gradient norm above {CLIP_WARN_RATIO:g} x max_grad_norm "
                  f"(= {self.max_grad_norm:g}) on {hard} of {len(self.norms)} steps "
                  f"since step {self.since} (median {float(np.median(self.norms)):.3g}): "
                  f"clipping dominates the gradients; check max_grad_norm and lr",
                  file=stream if stream is not None else sys.stderr, flush=True)
        self.norms, self.since = [], step


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

    def save(self, path, config, elapsed):
        checkpoint.save(path, params=self.params, opt_state=self.opt_state, step=self.step,
                        config=config, rng_state={"model": self.model_rng.bit_generator.state},
                        extra={"stream": self.stream.state(), "sums": self.sums,
                               "count": self.count, "elapsed_s": elapsed})


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
                         checkpoint.restore_rng(ckpt.rng_state["model"]),
                         BatchStream.from_state(n_train, train_cfg.batch_size,
                                                ckpt.extra["stream"]),
                         dict(ckpt.extra["sums"]), int(ckpt.extra["count"]),
                         float(ckpt.extra["elapsed_s"]))
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(
            f"checkpoint {os.fspath(path)}: no valid training state to resume from "
            f"({type(e).__name__}: {e})") from None


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
          progress=sys.stderr, preset=None, timer=None, decode_eval=True):
    """Train a model on the built-in world or your data; write metrics and checkpoints.

    Parameters
    ----------
    model_cfg : model.ModelConfig.   train_cfg : TrainConfig.
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

    Returns
    -------
    TrainResult(params, opt_state, step, history, evaluations, stopped)

    Raises
    ------
    checkpoint.CheckpointError if ``resume`` and the checkpoint is missing, damaged or
    from a different configuration, or metrics.jsonl is damaged before its last line
    (:class:`minivlmoe.run_folder.MetricsError`).  TrainingDiverged when the loss diverges
    (module docstring, "Divergence"; nothing of the diverged step is logged or saved).
    OSError when the run folder cannot be written (a failed checkpoint save leaves the
    previous checkpoint intact).
    """
    if not isinstance(model_cfg, model.ModelConfig):
        raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
    if not isinstance(train_cfg, TrainConfig):
        raise TypeError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
    if stop_at is not None:
        stop_at = check_int("stop_at", stop_at, 1, train_cfg.steps)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the folder of the run to continue)")
    t_start = time.perf_counter()
    splits, tokenizer, source = _data_setup(model_cfg, train_cfg, data)
    config = run_config(model_cfg, train_cfg, tokenizer, preset, data=source)
    images = splits.train.images.astype(model_cfg.dtype, copy=False)   # (Bn, R, R, Ch)
    ids = tokenizer.encode(splits.train.captions, model_cfg.max_text_len)  # (Bn, T)
    keys = evaluate.caption_keys(splits.train.captions)                # (Bn,)
    adamw = train_cfg.adamw()

    ckpt_path = None if out_dir is None else os.path.join(out_dir, CKPT_NAME)
    metrics_path = None if out_dir is None else os.path.join(out_dir, METRICS_NAME)
    history_path = None if out_dir is None else os.path.join(out_dir, HISTORY_NAME)
    if resume:
        remove_run_temps(out_dir)                  # left by writes a kill interrupted
        state = _resumed_state(ckpt_path, config, train_cfg, len(ids))
        truncate_metrics(out_dir, state.step)      # also drops a torn last line
        truncate_history(out_dir, state.step)
    else:
        state = _fresh_state(model_cfg, train_cfg, len(ids))
        if out_dir is not None:
            new_run_folder(out_dir, config)

    def elapsed():
        return state.elapsed0 + time.perf_counter() - t_start

    P = (model_cfg.image_size // model_cfg.patch) ** 2
    bar = _Progress(progress, train_cfg.steps,
                    train_cfg.batch_size * (1 + P + model_cfg.max_text_len), state.step)
    sections = timer if timer is not None else NULL_TIMER
    history, evaluations = [], []
    check, clips = _DivergenceCheck(), _ClipMonitor(adamw.max_grad_norm)
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
            losses, grads, _ = model.loss_and_grads(state.params, model_cfg, batch[0],
                                                    batch[1], pad_id=PAD_ID, keys=batch[2],
                                                    rng=state.model_rng, train=True,
                                                    timer=sections)
        except (FloatingPointError, ValueError) as e:
            if state.step == 0 or not _blew_up(e):    # initial parameters: not divergence
                raise
            raise diverged(state.step + 1, "the forward pass failed on the updated "
                           f"parameters ({type(e).__name__}: {_short(e)})") from e
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

        if state.step == train_cfg.steps or (train_cfg.eval_every
                                             and state.step % train_cfg.eval_every == 0):
            clips.report(state.step, progress)
            bar.evaluating(state.step, len(splits.test))
            try:
                record = _eval_record(state, model_cfg, train_cfg, splits.test, tokenizer,
                                      lr=info["lr"], elapsed=elapsed(), decode=decode_eval)
            except (FloatingPointError, ValueError) as e:
                if not _blew_up(e):
                    raise
                raise diverged(state.step, "the evaluation failed on the updated "
                               f"parameters ({type(e).__name__}: {_short(e)})") from e
            bad = _non_finite(record)
            if bad:                               # never logged, never saved
                raise diverged(state.step, "the evaluation gave non-finite values "
                               f"({_short(', '.join(bad))})")
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
