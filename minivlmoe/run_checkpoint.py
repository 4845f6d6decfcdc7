"""A run's checkpoint loaded and checked for meaning: :func:`load_checkpoint`.

:func:`minivlmoe.checkpoint.load` verifies the file (manifest, shapes, dtypes, checksums);
:func:`load_checkpoint` also parses the run's config
(:func:`minivlmoe.runs.parse_run_config`) and checks the checkpoint against a freshly
initialized model of that config: the same keys, kinds, shapes and dtypes
(:func:`_check_like`), finite values and non-negative second moments
(:func:`_check_finite`), a ``log_logit_scale`` within reach of training
(:func:`_adam_reach`, :func:`_check_logit_scale`) and a well-formed training state
(:func:`_check_training_state`).  Every problem is one
:class:`minivlmoe.checkpoint.CheckpointError` line naming the file and the value.
"""

from __future__ import annotations

import math
import os

import numpy as np
import scipy.sparse as sp

from . import checkpoint, model, optim
from .ops import contrastive
from .rng_state import restore_rng
from .runs import parse_run_config
from .tree import flatten


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


def _check_logit_scale(ckpt, train_cfg, fail, prior=0.0):
    """``log_logit_scale`` within what training can reach, and where exp() is finite.

    Training does not clamp it (CLIP clamps the logit scale at 100 = exp(4.6); a long
    run here may pass that, so no fixed bound is imposed): it starts at
    ``LOG_LOGIT_SCALE_INIT`` and is never weight-decayed, so after ``step`` updates it
    lies within :func:`_adam_reach` of that value (plus ``prior``, the reach of the
    parent's training for a compressed run).  The contrastive loss also needs
    ``exp(log_logit_scale)`` finite in the parameters' dtype.
    """
    value = float(ckpt.params["log_logit_scale"])
    # a run started from another run's weights (an upcycled run) adds that run's updates,
    # bounded at this run's peak lr (an upcycled run keeps its parent's lr)
    updates = ckpt.extra.get("prior_updates", 0) if isinstance(ckpt.extra, dict) else 0
    if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
        fail(f"extra['prior_updates'] must be an int >= 0, got {updates!r:.100}")
    reach = _adam_reach(train_cfg, ckpt.step + updates) + prior
    limit = float(np.log(np.finfo(ckpt.params["log_logit_scale"].dtype).max))
    if value > limit:
        fail(f"params['log_logit_scale'] = {value:.6g} exceeds log(max float) = "
             f"{limit:.2f}: exp() of it is not finite")
    if abs(value - contrastive.LOG_LOGIT_SCALE_INIT) > reach:
        parent = f" and the parent's training" if prior else ""
        fail(f"params['log_logit_scale'] = {value:.6g} is out of reach of training: "
             f"{ckpt.step + updates} AdamW updates at lr <= {train_cfg.lr:g}{parent} move it "
             f"at most {reach:.4g} from its initial value "
             f"{contrastive.LOG_LOGIT_SCALE_INIT:.4f}")


def _check_rng(name, state, fail):
    try:
        restore_rng(state)
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
    if "compressed" in ckpt.config:  # a pruned pattern, not init's: check it, build on it
        from .compress.finetune import check_patterns

        prior = check_patterns(ckpt.config, ckpt.params, ckpt.opt_state, fail)
        opt_template = optim.init_state(ckpt.params)
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
    _check_logit_scale(ckpt, train_cfg, fail, prior if "compressed" in ckpt.config else 0.0)
    _check_training_state(ckpt, train_cfg, fail)
    return ckpt, model_cfg, train_cfg, tokenizer
