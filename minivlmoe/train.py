"""Training loop: presets, the step loop, periodic evaluation, checkpoints and resume.

One run
-------
``train(model_cfg, train_cfg, out_dir)`` draws the built-in world's train and test
splits (:func:`minivlmoe.data.make_splits` with ``train_cfg.data_seed``), initializes
the model from ``train_cfg.seed`` and repeats ``train_cfg.steps`` times::

    idx                = stream.next()                 # (B,) a shuffled batch of pairs
    losses, grads, st  = model.loss_and_grads(params, cfg, images[idx], ids[idx],
                                              keys=keys[idx], rng=model_rng, train=True)
    optim.step(params, grads, opt_state, adamw)        # AdamW, in place

Every ``eval_every`` steps and at the end it runs :func:`minivlmoe.evaluate.evaluate`
on the test split, appends one JSON line to ``DIR/metrics.jsonl`` and writes
``DIR/ckpt.npz`` (atomically, :mod:`minivlmoe.checkpoint`).  ``DIR/config.json`` holds
the run's configuration.  A progress line goes to stderr at most every
``PROGRESS_EVERY_S`` seconds.

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

Tokens per second counts each pair's input tokens once: (1 + P) image tokens plus T
text tokens per pair.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from . import checkpoint, evaluate, model, optim
from .model import EXPERT_MODES
from .timing import NULL_TIMER
from ._checks import check_choice, check_float, check_int
from .data import grammar_words, make_splits, max_caption_words
from .tokenizer import PAD_ID, Tokenizer

RUN_FORMAT = "minivlmoe-run"
RUN_VERSION = 2                  # 2: the params key log_temp became log_logit_scale
CKPT_NAME = "ckpt.npz"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
PROGRESS_EVERY_S = 2.0


# ----------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything about a run that is not the model (validated on construction).

    Fields
    ------
    steps : int >= 1, optimizer updates.
    batch_size : int >= 2, pairs per step.
    lr, warmup_steps, weight_decay, min_lr_ratio, max_grad_norm : AdamW and its schedule
        (:class:`minivlmoe.optim.AdamWConfig`; the cosine ends at ``steps``).
    eval_every : int >= 0, steps between evaluations and checkpoints (0: only at the end).
    seed : int >= 0, model initialization, data order and router noise.
    data_seed : int >= 0, the built-in world's train and test images.
    n_train, n_test : int >= 2, sizes of the two splits.
    max_objects : int in [1, 3], objects per image (the main difficulty knob).
    noise : float in [0, 0.5], pixel noise of the images.
    heldout_fraction : float in [0, 1], share of test images with a held-out pair.
    """

    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 0
    seed: int = 0
    data_seed: int = 0
    n_train: int = 4096
    n_test: int = 512
    max_objects: int = 2
    noise: float = 0.0
    heldout_fraction: float = 0.2

    def __post_init__(self):
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 2)
        check_float("lr", self.lr, 0.0, low_open=True)
        check_int("warmup_steps", self.warmup_steps, 0, self.steps)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float("max_grad_norm", self.max_grad_norm, 0.0, low_open=True)
        check_int("eval_every", self.eval_every, 0)
        check_int("seed", self.seed, 0)
        check_int("data_seed", self.data_seed, 0)
        check_int("n_train", self.n_train, self.batch_size)
        check_int("n_test", self.n_test, 2)
        check_int("max_objects", self.max_objects, 1, 3)
        check_float("noise", self.noise, 0.0, 0.5)
        check_float("heldout_fraction", self.heldout_fraction, 0.0, 1.0)

    def adamw(self):
        """The optimizer configuration of this run."""
        return optim.AdamWConfig(lr=self.lr, weight_decay=self.weight_decay,
                                 warmup_steps=self.warmup_steps, total_steps=self.steps,
                                 min_lr_ratio=self.min_lr_ratio,
                                 max_grad_norm=self.max_grad_norm)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - fields:
            raise ValueError(f"train config must be a dict with keys among {sorted(fields)}, "
                             f"got {d!r:.200}")
        return cls(**d)


# name -> (ModelConfig overrides, TrainConfig fields); see docs/running.md for timings.
PRESETS = {
    "tiny": (dict(width=32, heads=2, layers=2, mlp_hidden=64, num_experts=2, embed_dim=32,
                  patch=8, moe_every=1),
             dict(steps=30, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=15,
                  n_train=64, n_test=32, max_objects=1)),
    "default": (dict(width=64, heads=4, layers=4, mlp_hidden=128, num_experts=4,
                     embed_dim=64, patch=8),
                dict(steps=1500, batch_size=64, lr=3e-3, warmup_steps=60, eval_every=500,
                     n_train=8192, n_test=512, max_objects=2)),
    "large": (dict(width=96, heads=4, layers=6, mlp_hidden=192, num_experts=8,
                   embed_dim=96, patch=8),
              dict(steps=6000, batch_size=96, lr=1.5e-3, warmup_steps=200, eval_every=1000,
                   n_train=16384, n_test=1024, max_objects=3)),
}


def preset_configs(name="default", *, experts=None, dtype=None, **train_overrides):
    """(ModelConfig, TrainConfig) of preset ``name`` with optional overrides.

    ``experts`` and ``dtype`` override the model; any TrainConfig field (``steps``,
    ``seed``, ``batch_size``, ...) may be overridden by keyword (None = keep the
    preset's).  Overriding ``steps`` alone caps the warmup at a fifth of the steps.
    The text length and the vocabulary follow from the world (``max_objects``) and the
    tokenizer.
    """
    check_choice("preset", name, PRESETS)
    model_kw, train_kw = PRESETS[name]
    given = {k: v for k, v in train_overrides.items() if v is not None}
    if "steps" in given and "warmup_steps" not in given:   # keep warmup a small share
        given["warmup_steps"] = min(train_kw["warmup_steps"], given["steps"] // 5)
    train_kw = {**train_kw, **given}
    tcfg = TrainConfig(**train_kw)
    model_kw = dict(model_kw)
    if experts is not None:
        model_kw["experts"] = check_choice("experts", experts, EXPERT_MODES)
    if dtype is not None:
        model_kw["dtype"] = check_choice("dtype", dtype, ("float32", "float64"))
    tokenizer = builtin_tokenizer()
    mcfg = model.ModelConfig(vocab_size=tokenizer.vocab_size,
                             max_text_len=max_caption_words(tcfg.max_objects) + 2, **model_kw)
    return mcfg, tcfg


def builtin_tokenizer():
    """The tokenizer of the built-in world (17 words, V = 21)."""
    return Tokenizer(grammar_words())


def run_config(model_cfg, train_cfg, tokenizer, preset=None):
    """The JSON-able description of a run (DIR/config.json; stored in checkpoints)."""
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "preset": preset,
            "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
            "tokenizer": tokenizer.to_dict()}


def parse_run_config(d):
    """(ModelConfig, TrainConfig, Tokenizer) from :func:`run_config`'s dict.

    Raises ValueError with a one-line message when the dict is not a run config.
    """
    if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
        raise ValueError(f"not a minivlmoe run config (format {RUN_FORMAT!r} expected)")
    if d.get("version") == 1:
        raise ValueError(f"run format version 1 is not supported: this minivlmoe reads "
                         f"version {RUN_VERSION} (log_temp was renamed log_logit_scale); "
                         f"retrain the run")
    if d.get("version") != RUN_VERSION:
        raise ValueError(f"unknown run config version {d.get('version')!r} "
                         f"(this minivlmoe reads version {RUN_VERSION})")
    try:
        return (model.ModelConfig.from_dict(d["model"]), TrainConfig.from_dict(d["train"]),
                Tokenizer.from_dict(d["tokenizer"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid run config ({type(e).__name__}: {e})") from None


def make_data(train_cfg, image_size):
    """The built-in world's (train, test) splits of a run."""
    return make_splits(train_cfg.data_seed, train_cfg.n_train, train_cfg.n_test,
                       image_size=image_size, max_objects=train_cfg.max_objects,
                       noise=train_cfg.noise, heldout_fraction=train_cfg.heldout_fraction)


# ----------------------------------------------------------------------------- checkpoints

def _check_like(name, tree, template, path, fail):
    """Check ``tree`` against ``template`` (same keys, leaf kinds, shapes and dtypes)."""
    if isinstance(template, dict):
        if not isinstance(tree, dict) or tree.keys() != template.keys():
            got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            fail(f"{name} at {path or '(root)'!r} must have the keys {sorted(template)}, "
                 f"got {got}")
        for k in template:
            _check_like(name, tree[k], template[k], f"{path}.{k}" if path else k, fail)
        return
    kind = type(template)
    if not isinstance(tree, kind) or (hasattr(template, "shape")
                                      and tree.dtype != template.dtype):
        fail(f"{name}[{path!r}] must be a {kind.__name__} of dtype "
             f"{getattr(template, 'dtype', '-')}, got {type(tree).__name__} "
             f"{getattr(tree, 'dtype', '')}")
    if hasattr(template, "shape") and tree.shape != template.shape:
        fail(f"{name}[{path!r}] must have shape {template.shape}, got {tree.shape}")


def load_checkpoint(path, expected_config=None):
    """Load a run's checkpoint and check it against the model its config describes.

    Returns ``(checkpoint, model_cfg, train_cfg, tokenizer)``.  Beyond
    :func:`minivlmoe.checkpoint.load`'s verification of the file, the parameters and the
    optimizer state must have exactly the keys, kinds, shapes and dtypes of a freshly
    initialized model of the saved config.  Every problem raises
    :class:`minivlmoe.checkpoint.CheckpointError` with one line naming the file.
    """
    ckpt = checkpoint.load(path, expected_config=expected_config)

    def fail(problem):
        raise checkpoint.CheckpointError(f"checkpoint {os.fspath(path)}: {problem}") from None

    try:
        model_cfg, train_cfg, tokenizer = parse_run_config(ckpt.config)
    except ValueError as e:
        fail(str(e))
    template = model.init(np.random.default_rng(0), model_cfg)
    _check_like("params", ckpt.params, template, "", fail)
    opt_template = optim.init_state(template)
    if not isinstance(ckpt.opt_state, dict) or ckpt.opt_state.keys() != opt_template.keys():
        fail(f"opt_state must have the keys {sorted(opt_template)}")
    for part in ("m", "v"):
        _check_like(f"opt_state[{part!r}]", ckpt.opt_state[part], opt_template[part], "", fail)
    if ckpt.opt_state["step"] != ckpt.step:
        fail(f"opt_state['step'] must equal the checkpoint's step {ckpt.step}, got "
             f"{ckpt.opt_state['step']!r}")
    return ckpt, model_cfg, train_cfg, tokenizer


# ----------------------------------------------------------------------------- data order

class BatchStream:
    """Shuffled batches of ``range(n)``, one permutation per epoch, resumable exactly.

    Each epoch draws ``rng.permutation(n)`` and yields its consecutive ``batch_size``
    slices; the incomplete tail of a permutation is dropped (every batch is full).
    :meth:`state` is the generator's state *before* the current epoch's permutation
    was drawn plus the offset into it; :meth:`from_state` redraws the same permutation
    from that state, which also leaves the generator where it was.
    """

    def __init__(self, n, batch_size, rng):
        self.n = check_int("n", n, 1)
        self.batch_size = check_int("batch_size", batch_size, 1, n)
        self.rng = rng
        self._new_epoch()

    def _new_epoch(self):
        self.epoch_state = self.rng.bit_generator.state
        self.order = self.rng.permutation(self.n)                      # (n,)
        self.pos = 0

    def next(self):
        """The next (batch_size,) int64 index array."""
        if self.pos + self.batch_size > self.n:
            self._new_epoch()
        idx = self.order[self.pos:self.pos + self.batch_size]          # (b,)
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
        stream.pos = check_int("pos", state["pos"], 0, n)
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


def _append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(out_dir):
    """The records of DIR/metrics.jsonl (empty list if none)."""
    path = os.path.join(out_dir, METRICS_NAME)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(out_dir, step):
    """Drop records past ``step`` (written after the checkpoint we resume from)."""
    records = [r for r in read_metrics(out_dir) if r["step"] <= step]
    path = os.path.join(out_dir, METRICS_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
    os.replace(tmp, path)


def _fmt_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Progress:
    """The stderr progress line, written at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, stream, total_steps, tokens_per_step):
        self.stream, self.total, self.tokens = stream, total_steps, tokens_per_step
        self.last = -math.inf
        # (time, step) of the last 50 steps since the last evaluation: tokens/s and ETA
        self.window = collections.deque(maxlen=50)

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

    def evaluation(self, record):
        self.window.clear()                  # the evaluation's pause is not a slow step
        if self.stream is not None:
            print(f"eval @ step {record['step']}: i2t R@1 {record['i2t_r1']:.3f}  "
                  f"t2i R@1 {record['t2i_r1']:.3f}  caption exact "
                  f"{record.get('caption_exact', float('nan')):.3f}  BLEU-4 "
                  f"{record.get('bleu4', float('nan')):.3f}", file=self.stream, flush=True)


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


def train(model_cfg, train_cfg, out_dir=None, *, resume=False, stop_at=None,
          progress=sys.stderr, preset=None, timer=None, decode_eval=True):
    """Train a model on the built-in world; write metrics and checkpoints to ``out_dir``.

    Parameters
    ----------
    model_cfg : model.ModelConfig.   train_cfg : TrainConfig.
    out_dir : str or None; None writes nothing (no resume then).
    resume : continue from ``out_dir/ckpt.npz`` (whose config must equal this one).
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
    from a different configuration.
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
    tokenizer = builtin_tokenizer()
    config = run_config(model_cfg, train_cfg, tokenizer, preset)
    splits = make_data(train_cfg, model_cfg.image_size)
    images = splits.train.images.astype(model_cfg.dtype, copy=False)   # (Bn, R, R, Ch)
    ids = tokenizer.encode(splits.train.captions, model_cfg.max_text_len)  # (Bn, T)
    keys = evaluate.caption_keys(splits.train.captions)                # (Bn,)
    adamw = train_cfg.adamw()

    ckpt_path = None if out_dir is None else os.path.join(out_dir, CKPT_NAME)
    metrics_path = None if out_dir is None else os.path.join(out_dir, METRICS_NAME)
    if resume:
        state = _resumed_state(ckpt_path, config, train_cfg, len(ids))
        _truncate_metrics(out_dir, state.step)
    else:
        state = _fresh_state(model_cfg, train_cfg, len(ids))
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(config, indent=2) + "\n")
            open(metrics_path, "w", encoding="utf-8").close()

    def elapsed():
        return state.elapsed0 + time.perf_counter() - t_start

    P = (model_cfg.image_size // model_cfg.patch) ** 2
    bar = _Progress(progress, train_cfg.steps,
                    train_cfg.batch_size * (1 + P + model_cfg.max_text_len))
    sections = timer if timer is not None else NULL_TIMER
    history, evaluations = [], []
    last = stop_at if stop_at is not None else train_cfg.steps
    while state.step < last:
        with sections.section("data"):
            idx = state.stream.next()                                  # (B,)
            batch = images[idx], ids[idx], keys[idx]
        losses, grads, _ = model.loss_and_grads(state.params, model_cfg, batch[0], batch[1],
                                                pad_id=PAD_ID, keys=batch[2],
                                                rng=state.model_rng, train=True,
                                                timer=sections)
        with sections.section("optimizer"):
            info = optim.step(state.params, grads, state.opt_state, adamw)
        state.step += 1
        losses = {k: float(losses[k]) for k in _loss_keys(losses)}
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"the loss became non-finite at step {state.step}: "
                                     f"{losses}")
        history.append({"step": state.step, "lr": info["lr"],
                        "grad_norm": info["grad_norm"], **losses})
        for k, v in losses.items():
            state.sums[k] = state.sums.get(k, 0.0) + v
        state.count += 1
        bar.update(state.step, losses, info["lr"], elapsed())

        if state.step == train_cfg.steps or (train_cfg.eval_every
                                             and state.step % train_cfg.eval_every == 0):
            record = _eval_record(state, model_cfg, train_cfg, splits.test, tokenizer,
                                  lr=info["lr"], elapsed=elapsed(), decode=decode_eval)
            evaluations.append(record)
            bar.evaluation(record)
            if out_dir is not None:
                _append_jsonl(metrics_path, record)
                state.save(ckpt_path, config, elapsed())
        elif out_dir is not None and state.step == last:
            state.save(ckpt_path, config, elapsed())    # stop_at: a checkpoint to resume
    return TrainResult(state.params, state.opt_state, state.step, history, evaluations,
                       stopped=state.step < train_cfg.steps)
