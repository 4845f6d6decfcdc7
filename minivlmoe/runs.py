"""A run: its configuration, the presets, and the files of its folder.

A run is a (ModelConfig, TrainConfig, Tokenizer) triple.  :data:`PRESETS` names three
(tiny, default, large); :func:`preset_configs` builds one with overrides, and
:func:`make_data` draws its train and test splits from the built-in world
(:func:`minivlmoe.world.make_splits` with ``train_cfg.data_seed``).

The run folder
--------------
``DIR/config.json`` holds :func:`run_config`'s description of the run (read back by
:func:`parse_run_config`; the same dict is stored in every checkpoint).
``DIR/metrics.jsonl`` holds one JSON line per evaluation (:func:`append_jsonl`,
:func:`read_metrics`; :func:`truncate_metrics` drops the lines written after the
checkpoint a resumed run continues from).  ``DIR/history.jsonl`` holds one JSON line
per training step (step, lr, grad_norm and the losses), written in blocks at every
checkpoint, so it always ends at the checkpoint's step; :func:`read_history`,
:func:`truncate_history` keep it at one line per step 1..N across resumes.
``DIR/ckpt.npz`` is the checkpoint (:mod:`minivlmoe.checkpoint`); :func:`load_checkpoint`
also checks it against a freshly initialized model of its config.  The training loop
that writes these files is :mod:`minivlmoe.train`.

Crash safety: config.json and ckpt.npz are replaced atomically
(:func:`minivlmoe.atomic.atomic_write`), metrics.jsonl and history.jsonl are appended
in whole lines per ``write`` and ``fsync``ed, so a kill or a power cut leaves at worst a
torn last line, which :func:`read_jsonl` drops; the temporary files of killed writes are
removed by the next write and on resume (:func:`remove_run_temps`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os

import numpy as np
import scipy.sparse as sp

from . import atomic, checkpoint, model, optim
from .ops import contrastive
from .tree import flatten
from .model import EXPERT_MODES
from ._checks import check_choice, check_float, check_int
from .scenes import grammar_words, max_caption_words
from .tokenizer import Tokenizer
from .userdata import DataError, open_source, resolve
from .world import make_splits

RUN_FORMAT = "minivlmoe-run"
RUN_VERSION = 2                  # 2: the params key log_temp became log_logit_scale
DATA_RUN_VERSION = 3             # 3: version 2 + "data", the run's own data set (userdata.py)
CKPT_NAME = "ckpt.npz"
METRICS_NAME = "metrics.jsonl"
HISTORY_NAME = "history.jsonl"
CONFIG_NAME = "config.json"


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


def preset_configs(name="default", *, experts=None, dtype=None, data=None, patch=None,
                   **train_overrides):
    """(ModelConfig, TrainConfig) of preset ``name`` with optional overrides.

    ``experts`` and ``dtype`` override the model; any TrainConfig field (``steps``,
    ``seed``, ``batch_size``, ...) may be overridden by keyword (None = keep the
    preset's).  Overriding ``steps`` alone caps the warmup at a fifth of the steps.
    The text length and the vocabulary follow from the world (``max_objects``) and the
    tokenizer.  With ``data`` (a :class:`minivlmoe.userdata.UserData` or a (train, test)
    pair of datasets) they follow from the data instead (:func:`fit_to_data`; ``patch`` overrides the patch size).
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
    if data is not None:
        return fit_to_data(model_kw, tcfg, data, patch=patch)
    if patch is not None:
        model_kw["patch"] = patch
    tokenizer = builtin_tokenizer()
    mcfg = model.ModelConfig(vocab_size=tokenizer.vocab_size,
                             max_text_len=max_caption_words(tcfg.max_objects) + 2, **model_kw)
    return mcfg, tcfg


def default_patch(image_size, preferred=8):
    """The largest divisor of ``image_size`` that is at most ``preferred`` and at most
    ``image_size / 2`` (so an image has at least 4 patches), or 1."""
    return max([p for p in range(1, preferred + 1)
                if image_size % p == 0 and 2 * p <= image_size] or [1])


def fit_to_data(model_kw, train_cfg, data, *, patch=None):
    """(ModelConfig, TrainConfig) of a run on ``data`` (a UserData or a (train, test)
    pair of ImageCaptionDataset, :func:`minivlmoe.userdata.resolve`).

    The data set fixes the image size, the train and test sizes (the split of
    ``train_cfg.data_seed``), the vocabulary (:func:`data_tokenizer`) and the text
    length (longest training caption + 2; longer test captions are truncated).  The
    patch is ``patch``, else :func:`default_patch` of the model's patch.
    """
    splits, _, name = resolve(data, train_cfg.data_seed)
    if len(splits.train) < train_cfg.batch_size:
        raise ValueError(f"batch_size must be at most the {len(splits.train)} training "
                         f"pairs of {name}, got {train_cfg.batch_size}")
    train_cfg = dataclasses.replace(train_cfg, n_train=len(splits.train),
                                    n_test=len(splits.test))
    R = splits.train.image_size
    if patch is None:
        patch = default_patch(R, model_kw.get("patch", 8))
    patch = check_int("patch", patch, 1)
    if R % patch:
        raise ValueError(f"patch must divide the image size {R} of {name}, got {patch}")
    tokenizer = data_tokenizer(splits.train)
    mcfg = model.ModelConfig(**{**model_kw, "image_size": R, "patch": patch,
                                "vocab_size": tokenizer.vocab_size,
                                "max_text_len": tokenizer.max_words(splits.train.captions) + 2})
    return mcfg, train_cfg


def data_tokenizer(train):
    """The tokenizer of a run on its own data: every word of the training captions."""
    return Tokenizer.from_captions(train.captions)


def builtin_tokenizer():
    """The tokenizer of the built-in world (17 words, V = 21)."""
    return Tokenizer(grammar_words())


def run_config(model_cfg, train_cfg, tokenizer, preset=None, data=None):
    """The JSON-able description of a run (DIR/config.json; stored in checkpoints).

    ``data`` is the source of a run on its own data (``UserData.source``): such a run is
    version 3 with a "data" entry; a run on the built-in world stays version 2, without.
    """
    config = {"format": RUN_FORMAT, "version": RUN_VERSION, "preset": preset,
              "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
              "tokenizer": tokenizer.to_dict()}
    if data is not None:
        config.update(version=DATA_RUN_VERSION, data=dict(data))
    return config


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
    if d.get("version") not in (RUN_VERSION, DATA_RUN_VERSION):
        raise ValueError(f"unknown run config version {d.get('version')!r} "
                         f"(this minivlmoe reads versions {RUN_VERSION} and "
                         f"{DATA_RUN_VERSION})")
    if ("data" in d) != (d["version"] == DATA_RUN_VERSION):
        raise ValueError(f"a run config of version {d['version']} must "
                         f"{'' if d['version'] == DATA_RUN_VERSION else 'not '}have a "
                         f"'data' entry")
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


def run_splits(config, model_cfg, train_cfg, tokenizer, data_path=None):
    """The (train, test) splits a saved run was trained on, from its config dict.

    The built-in world is drawn again (:func:`make_data`); a run's own data file is read
    again and verified (:func:`minivlmoe.userdata.open_source`; ``data_path`` if it
    moved), and its training captions must still give the run's tokenizer.
    """
    if "data" not in config:
        if data_path is not None:
            raise DataError(f"the run was trained on the built-in world, so a data file "
                            f"does not apply ({os.fspath(data_path)})")
        return make_data(train_cfg, model_cfg.image_size)
    data = open_source(config["data"], data_path)
    splits = data.splits(train_cfg.data_seed)
    if data_tokenizer(splits.train) != tokenizer or data.image_size != model_cfg.image_size:
        raise DataError(f"the data file does not give the run's vocabulary and image size "
                        f"({data.path})")
    return splits


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


def _check_finite(name, tree, fail, *, nonnegative=False):
    """Every value of every leaf of ``tree`` finite (and >= 0): one pass per array."""
    for path, leaf in flatten(tree).items():
        values = leaf.data if isinstance(leaf, sp.csr_array) else leaf
        finite = np.isfinite(values)
        if not finite.all():
            fail(f"{name}[{path!r}] has {values.size - np.count_nonzero(finite)} non-finite "
                 f"value(s) (NaN or inf)")
        if nonnegative and (values < 0).any():
            fail(f"{name}[{path!r}] has {np.count_nonzero(values < 0)} negative value(s) "
                 f"(a second moment is a mean of squares, >= 0)")


def _adam_reach(train_cfg, step):
    """How far ``step`` AdamW updates of this run can move one value that is not decayed.

    With ``m``, ``v`` the moment averages of update t, Cauchy-Schwarz gives
    ``|m_hat| / sqrt(v_hat) <= (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2))`` (7.27 for
    betas (0.9, 0.999)), so one update moves the value by at most that times
    ``lr_t <= lr``.  The bound adds 1% and 1e-5 per update for float32 rounding.
    """
    b1, b2 = train_cfg.adamw().betas
    rho = b1 * b1 / b2
    if rho >= 1.0:                                 # no finite bound for such betas
        return math.inf
    ratio = (1.0 - b1) / math.sqrt((1.0 - b2) * (1.0 - rho))
    return 1.01 * ratio * train_cfg.lr * step + 1e-5 * (step + 1)


def _check_logit_scale(ckpt, train_cfg, fail):
    """``log_logit_scale`` within what training can reach, and where exp() is finite.

    Training does not clamp it (CLIP clamps the logit scale at 100 = exp(4.6); a long
    run here may pass that, so no fixed bound is imposed): it starts at
    ``LOG_LOGIT_SCALE_INIT`` and is never weight-decayed, so after ``step`` updates it
    lies within :func:`_adam_reach` of that value.  The contrastive loss also needs
    ``exp(log_logit_scale)`` finite in the parameters' dtype.
    """
    value = float(ckpt.params["log_logit_scale"])
    reach = _adam_reach(train_cfg, ckpt.step)
    limit = float(np.log(np.finfo(ckpt.params["log_logit_scale"].dtype).max))
    if value > limit:
        fail(f"params['log_logit_scale'] = {value:.6g} exceeds log(max float) = "
             f"{limit:.2f}: exp() of it is not finite")
    if abs(value - contrastive.LOG_LOGIT_SCALE_INIT) > reach:
        fail(f"params['log_logit_scale'] = {value:.6g} is out of reach of training: "
             f"{ckpt.step} AdamW updates at lr <= {train_cfg.lr:g} move it at most "
             f"{reach:.4g} from its initial value {contrastive.LOG_LOGIT_SCALE_INIT:.4f}")


def _check_rng(name, state, fail):
    try:
        checkpoint.restore_rng(state)
    except (TypeError, ValueError) as e:
        fail(f"{name} is not a bit-generator state of a known kind ({str(e)[:200]})")


def _check_training_state(ckpt, train_cfg, fail):
    """The state :mod:`minivlmoe.train` saves to resume a run exactly.

    ``rng_state = {"model": <bit-generator state>}`` and ``extra = {"stream": {"epoch_rng":
    <bit-generator state>, "pos": int}, "sums": {loss name: float}, "count": int,
    "elapsed_s": float}`` (further keys are allowed).  One batch of ``batch_size`` is
    drawn per step and an epoch holds ``n_train // batch_size`` batches, so after step
    ``s >= 1`` the position in the epoch is ``batch_size * ((s - 1) % batches + 1)``.
    """
    kinds = {dict: "a dict", int: "an int", float: "a number"}

    def need(value, where, kind):
        ok = isinstance(value, (int, float) if kind is float else kind)
        if isinstance(value, bool) or not ok:
            fail(f"{where} must be {kinds[kind]}, got {type(value).__name__} {value!r:.100}")
        return value

    rng_state, extra, step = ckpt.rng_state, ckpt.extra, ckpt.step
    if "model" not in rng_state:
        fail("rng_state has no 'model' generator state (not saved by minivlmoe.train)")
    _check_rng("rng_state['model']", rng_state["model"], fail)
    need(extra, "extra (the training state)", dict)
    for key in ("stream", "sums", "count", "elapsed_s"):
        if key not in extra:
            fail(f"extra (the training state) has no {key!r}")
    stream = need(extra["stream"], "extra['stream']", dict)
    for key in ("epoch_rng", "pos"):
        if key not in stream:
            fail(f"extra['stream'] has no {key!r}")
    _check_rng("extra['stream']['epoch_rng']", stream["epoch_rng"], fail)
    pos = need(stream["pos"], "extra['stream']['pos']", int)
    b, n = train_cfg.batch_size, train_cfg.n_train
    expected = 0 if step == 0 else b * ((step - 1) % (n // b) + 1)
    if pos != expected:
        fail(f"extra['stream']['pos'] must be {expected} at step {step} (batches of {b} "
             f"from {n} pairs, in [0, n_train]), got {pos}")
    sums = need(extra["sums"], "extra['sums']", dict)
    for key, value in sums.items():
        need(value, f"extra['sums'][{key!r}]", float)
        if not math.isfinite(value):
            fail(f"extra['sums'][{key!r}] must be finite, got {value!r}")
    count = need(extra["count"], "extra['count']", int)
    if not 0 <= count <= step or (count == 0) != (not sums):
        fail(f"extra['count'] must be in [0, step={step}] and 0 exactly when "
             f"extra['sums'] is empty, got {count} with {len(sums)} sum(s)")
    elapsed = need(extra["elapsed_s"], "extra['elapsed_s']", float)
    if not 0 <= elapsed < math.inf:
        fail(f"extra['elapsed_s'] must be a finite number >= 0, got {elapsed!r}")


def load_checkpoint(path, expected_config=None):
    """Load a run's checkpoint and check it against the model its config describes.

    Returns ``(checkpoint, model_cfg, train_cfg, tokenizer)``.  Beyond
    :func:`minivlmoe.checkpoint.load`'s verification of the file, the parameters and the
    optimizer state must have exactly the keys, kinds, shapes and dtypes of a freshly
    initialized model of the saved config, and mean something:

    * the step is in ``[0, train.steps]`` and equals ``opt_state['step']``;
    * every parameter and both AdamW moments are finite, the second moments ``>= 0``;
    * ``log_logit_scale`` is within reach of training (:func:`_check_logit_scale`);
    * the training state (generators, data position, loss sums) is well-formed and in
      range (:func:`_check_training_state`).

    Every problem raises :class:`minivlmoe.checkpoint.CheckpointError` with one line
    naming the file and the array or value.
    """
    ckpt = checkpoint.load(path, expected_config=expected_config)

    def fail(problem):
        raise checkpoint.CheckpointError(f"checkpoint {os.fsdecode(path)}: {problem}") from None

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
    if not 0 <= ckpt.step <= train_cfg.steps:
        fail(f"step must be in [0, train.steps={train_cfg.steps}], got {ckpt.step}")
    opt_step = ckpt.opt_state["step"]
    if isinstance(opt_step, bool) or not isinstance(opt_step, int) or opt_step != ckpt.step:
        fail(f"opt_state['step'] must equal the checkpoint's step {ckpt.step}, got "
             f"{opt_step!r}")
    _check_finite("params", ckpt.params, fail)
    _check_finite("opt_state['m']", ckpt.opt_state["m"], fail)
    _check_finite("opt_state['v']", ckpt.opt_state["v"], fail, nonnegative=True)
    _check_logit_scale(ckpt, train_cfg, fail)
    _check_training_state(ckpt, train_cfg, fail)
    return ckpt, model_cfg, train_cfg, tokenizer


# ----------------------------------------------------------------------------- the run folder

class MetricsError(checkpoint.CheckpointError):
    """DIR/metrics.jsonl cannot be used; the message names the file and the line.

    A :class:`minivlmoe.checkpoint.CheckpointError`, so whatever reports an unusable
    checkpoint in one line (the CLI, a resume) reports an unusable run folder the same way.
    """


def remove_run_temps(out_dir):
    """Delete the temporary files killed writes of the run folder's files left behind.

    Only the names :func:`minivlmoe.atomic.atomic_write` gives the temporary files of
    DIR/ckpt.npz, DIR/config.json, DIR/metrics.jsonl and DIR/history.jsonl
    (``.ckpt.npz.<12 hex>.tmp``, ...) are removed; every other file stays.  Returns the
    removed names.
    """
    return [name for file in (CKPT_NAME, CONFIG_NAME, METRICS_NAME, HISTORY_NAME)
            for name in atomic.remove_stale_temps(os.path.join(out_dir, file))]


def new_run_folder(out_dir, config):
    """Start a run in ``out_dir``: config.json written, metrics and history empty, no
    checkpoint.

    The folder is created if needed; stale temporary files are removed
    (:func:`remove_run_temps`), an earlier run's checkpoint is deleted first (so a crash
    before the first save cannot pair the new config.json with an old checkpoint), then
    config.json, an empty metrics.jsonl and an empty history.jsonl are each written
    atomically.
    """
    os.makedirs(out_dir, exist_ok=True)
    remove_run_temps(out_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out_dir, CKPT_NAME))
    atomic.atomic_write(os.path.join(out_dir, CONFIG_NAME),
                            (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    atomic.atomic_write(os.path.join(out_dir, METRICS_NAME), b"")
    atomic.atomic_write(os.path.join(out_dir, HISTORY_NAME), b"")


def append_jsonl(path, record):
    """Append ``record`` (a dict, or a list of dicts) as JSON lines to ``path`` and flush
    them to disk.

    All the lines go out in one ``write`` on a file opened for appending (a loop only if
    the system writes part of it, e.g. on a full disk), then one ``fsync``: a crash can
    tear only the last line, which :func:`read_jsonl` then drops.  A record that is not
    JSON (NaN, ...) raises before the file is opened.
    """
    records = [record] if isinstance(record, dict) else list(record)
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    line = memoryview(text.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        while line:
            line = line[os.write(fd, line):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path):
    """The records of a JSON-lines file (empty list if none), a torn last line dropped.

    A last line that is not valid JSON is what a crash while appending leaves (a prefix
    of the record, or zeros after a power cut); it is dropped.  Any other line that is
    not a JSON object with an integer ``step`` raises :class:`MetricsError` naming the
    file and the line number.  Blank lines are skipped.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    lines = [(n, line) for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if n == lines[-1][0]:
                break                                            # torn by a crash: dropped
            raise MetricsError(f"{path}: line {n} of {lines[-1][0]} is not valid JSON "
                               f"({type(e).__name__}: {e}); only a torn last line can be "
                               f"dropped") from None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise MetricsError(f"{path}: line {n} is not a metrics record (a JSON object "
                               f"with an integer 'step'), got {line[:80]!r}")
        records.append(record)
    return records


def read_metrics(out_dir):
    """The records of DIR/metrics.jsonl (empty list if none)."""
    return read_jsonl(os.path.join(out_dir, METRICS_NAME))


def read_history(out_dir):
    """The per-step records of DIR/history.jsonl (empty list if none)."""
    return read_jsonl(os.path.join(out_dir, HISTORY_NAME))


def truncate_metrics(out_dir, step):
    """Drop records past ``step`` (written after the checkpoint we resume from)."""
    truncate_jsonl(os.path.join(out_dir, METRICS_NAME), step)


def truncate_history(out_dir, step):
    """Keep DIR/history.jsonl's lines of steps 1..``step`` (the checkpoint's)."""
    truncate_jsonl(os.path.join(out_dir, HISTORY_NAME), step)


def truncate_jsonl(path, step):
    """Rewrite ``path`` without the records whose ``"step"`` is past ``step``.

    Also drops a torn last line (:func:`read_jsonl`); the file is rewritten atomically.
    """
    records = [r for r in read_jsonl(path) if r["step"] <= step]
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    atomic.atomic_write(path, text.encode("utf-8"))
