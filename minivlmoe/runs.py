"""A run's configuration: TrainConfig, the presets, and the data a run trains on.

A run is a (ModelConfig, TrainConfig, Tokenizer) triple.  :data:`PRESETS` names four
(tiny, default, large, scaling); :func:`preset_configs` builds one with overrides, and
:func:`make_data` draws its train and test splits from the built-in world
(:func:`minivlmoe.world.make_splits` with ``train_cfg.data_seed``).  A run on its own
data takes its sizes and vocabulary from the data (:func:`fit_to_data`) and finds it
again through its config (:func:`run_splits`).

:func:`run_config` is the JSON-able description of a run, written to DIR/config.json
and stored in every checkpoint; :func:`parse_run_config` reads it back.  The files of
the run folder are in :mod:`minivlmoe.run_folder`; loading a run's checkpoint and
checking what its numbers mean is :func:`minivlmoe.run_checkpoint.load_checkpoint`; the
training loop that writes them is :mod:`minivlmoe.train`.
"""

from __future__ import annotations

import dataclasses
import os

from . import model, model_config, optim
from .model_config import EXPERT_MODES
from ._checks import check_choice, check_float, check_int, error_line
from .scenes import grammar_words, max_caption_words
from .tokenizer import Tokenizer
from .userdata import DataError, open_source, resolve
from .world import make_splits

RUN_FORMAT = "minivlmoe-run"
RUN_VERSION = 2                  # 2: the params key log_temp became log_logit_scale
DATA_RUN_VERSION = 3             # 3: version 2 + "data", the run's own data set (userdata.py)


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
    # Wider and deeper, on the scaling preset's world (three objects, 65536 pairs).  Its
    # first version (6000 steps of 96 on 16384 pairs: 35 epochs) was never run to the
    # end; docs/experiments.md says why it changed.
    "large": (dict(width=96, heads=4, layers=6, mlp_hidden=192, num_experts=8,
                   embed_dim=96, patch=8),
              dict(steps=2400, batch_size=64, lr=2e-3, warmup_steps=120, eval_every=800,
                   n_train=65536, n_test=1024, max_objects=3)),
    # The scaling study's regime (docs/experiments.md): the default model with an MoE
    # FFN in every layer (modality mode: the top layer is the dense fusion layer), on
    # the three-object world with 65536 training pairs (1200 x 64 draws: 1.17 epochs,
    # most pairs are seen once), so that no model can overfit its training set.
    "scaling": (dict(width=64, heads=4, layers=4, mlp_hidden=128, num_experts=8,
                     embed_dim=64, patch=8, moe_every=1),
                dict(steps=1200, batch_size=64, lr=3e-3, warmup_steps=60, eval_every=600,
                     n_train=65536, n_test=512, max_objects=3)),
}


def preset_configs(name="default", *, experts=None, dtype=None, data=None, patch=None,
                   **train_overrides):
    """(ModelConfig, TrainConfig) of preset ``name`` with optional overrides.

    ``experts`` and ``dtype`` override the model; any TrainConfig field (``steps``,
    ``seed``, ``batch_size``, ...) may be overridden by keyword (None = keep the
    preset's).  Overriding ``steps`` alone caps the warmup at a fifth of the steps.
    The text length and the vocabulary follow from the world (``max_objects``) and the
    tokenizer.  With ``data`` (a :class:`minivlmoe.userdata.UserData` or a (train, test)
    pair of datasets) they follow from the data instead (:func:`fit_to_data`; ``patch``
    overrides the patch size).
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
    mcfg = model_config.ModelConfig(vocab_size=tokenizer.vocab_size,
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
    mcfg = model_config.ModelConfig(**{**model_kw, "image_size": R, "patch": patch,
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
        return (model_config.ModelConfig.from_dict(d["model"]), TrainConfig.from_dict(d["train"]),
                Tokenizer.from_dict(d["tokenizer"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid run config ({error_line(e)})") from None


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
