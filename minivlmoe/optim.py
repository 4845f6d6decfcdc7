"""AdamW with decoupled weight decay, a warmup + cosine schedule and global-norm clipping.

The update (derived in docs/training.md), for every parameter value ``w`` with
gradient ``g`` at update number ``t = 1, 2, ...``::

    g      <- g * min(1, max_grad_norm / ||grads||)       global-norm clipping
    m      <- beta1 * m + (1 - beta1) * g                 first moment
    v      <- beta2 * v + (1 - beta2) * g^2               second moment
    m_hat   = m / (1 - beta1^t)                           bias corrections
    v_hat   = v / (1 - beta2^t)
    w      <- w - lr_t * weight_decay * w                 decoupled decay (decayed leaves only)
    w      <- w - lr_t * m_hat / (sqrt(v_hat) + eps)      Adam step

``lr_t = lr_at(t, cfg)`` rises linearly from 0 to ``lr`` over ``warmup_steps`` updates,
then follows a half cosine down to ``min_lr_ratio * lr`` at ``total_steps`` and stays
there.  The decay is *decoupled* (Loshchilov & Hutter): it is not added to ``g``, so it
never passes through ``m`` and ``v`` and every decayed weight shrinks by the same factor
``1 - lr_t * weight_decay`` per step, whatever its gradient history.

Sparse weights
--------------
A leaf that is a ``scipy.sparse.csr_array`` is updated through its ``.data`` only; its
gradient must carry exactly the same pattern (equal ``indices`` and ``indptr``).  The
moments of such a leaf are dense arrays shaped like ``leaf.data`` (nnz,), so the
optimizer never sees, stores or creates an entry outside the pattern.

Which leaves decay
------------------
:func:`decays` decides from the leaf's dotted path (as made by
:func:`minivlmoe.tree.flatten`): weight matrices (last key ``"W"``), the two factors
of a low-rank layer (``"A"``, ``"B"``, minivlmoe/ops/lowrank_linear.py) and token
embedding tables (last key ``"tok"``) decay; biases, layer-norm gains and shifts, the
class and position embeddings, temperatures and every other leaf do not.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.sparse as sp

from ._checks import check_float, check_int
from .tree import flatten, tree_map, with_values

DECAYED_KEYS = ("W", "A", "B", "tok")  # last path component of the leaves that weight decay shrinks


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamWConfig:
    """Hyperparameters of :func:`step` (validated on construction).

    Fields
    ------
    lr : peak learning rate, > 0.
    betas : (beta1, beta2), each in [0, 1): decay rates of the two moment averages.
    eps : > 0, added to ``sqrt(v_hat)`` in the denominator.
    weight_decay : >= 0, decoupled decay rate (multiplied by the scheduled lr).
    warmup_steps : int >= 0, updates of linear warmup from 0 to ``lr``.
    total_steps : int >= max(1, warmup_steps), update at which the cosine reaches its floor.
    min_lr_ratio : in [0, 1], the floor as a fraction of ``lr``.
    max_grad_norm : > 0, or None for no clipping.
    """

    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        check_float("lr", self.lr, 0.0, low_open=True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        for name, beta in zip(("betas[0]", "betas[1]"), self.betas):
            check_float(name, beta, 0.0, 1.0, high_open=True)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        check_float("eps", self.eps, 0.0, low_open=True)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("total_steps", self.total_steps, max(1, self.warmup_steps))
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.max_grad_norm is not None:
            check_float("max_grad_norm", self.max_grad_norm, 0.0, low_open=True)


def decays(path):
    """True if weight decay applies to the leaf at dotted ``path`` (e.g. "blocks.0.ffn.W")."""
    return path.rsplit(".", 1)[-1] in DECAYED_KEYS


def lr_at(step, cfg):
    """Learning rate of update number ``step`` (1-based; ``step=0`` is the start).

    ``lr * step / warmup_steps`` during warmup (``step < warmup_steps``), then
    ``lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)`` with ``r = min_lr_ratio`` and
    progress ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to 1.
    Both pieces give the peak ``lr`` at ``step = warmup_steps``; from ``total_steps``
    on the rate stays at ``min_lr_ratio * lr``.
    """
    step = check_int("step", step, 0)
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = cfg.total_steps - cfg.warmup_steps
    progress = 1.0 if span == 0 else min(1.0, (step - cfg.warmup_steps) / span)
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _values(leaf):
    """The array of values an update writes into: ``.data`` of a csr leaf, else the leaf."""
    return leaf.data if isinstance(leaf, sp.csr_array) else leaf


def init_state(params):
    """Zero moments for ``params``: ``{"step": 0, "m": tree, "v": tree}``.

    ``m`` and ``v`` mirror ``params`` key for key; each leaf is a dense zero array
    shaped like the parameter's values (``leaf.data`` (nnz,) for a csr weight) and of
    its dtype.  ``step`` counts the updates applied so far.
    """
    _check_leaves("params", flatten(params))
    m = tree_map(lambda leaf: np.zeros_like(_values(leaf)), params)
    v = tree_map(lambda leaf: np.zeros_like(_values(leaf)), params)
    return {"step": 0, "m": m, "v": v}


def global_norm(grads):
    """``sqrt(sum of squares of every gradient value)``, accumulated in float64."""
    total = 0.0
    for g in flatten(grads).values():
        vals = np.asarray(_values(g), dtype=np.float64).reshape(-1)   # (size,)
        total += float(vals @ vals)
    return math.sqrt(total)


def _clip_scale(norm, max_norm):
    """Factor that brings a global norm ``norm`` down to ``max_norm`` (1 if already below)."""
    if max_norm is None or norm <= max_norm:
        return 1.0
    return max_norm / norm


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients by one factor so that their global norm is at most ``max_norm``.

    Returns ``(clipped, norm)``: a new tree (the input is not modified; a csr gradient
    keeps its pattern) and the global norm *before* clipping.  Below the threshold the
    values are copied unchanged.
    """
    max_norm = check_float("max_norm", max_norm, 0.0, low_open=True)
    norm = global_norm(grads)
    scale = _clip_scale(norm, max_norm)

    def scaled(g):
        if isinstance(g, sp.csr_array):
            return with_values(g, g.data * g.dtype.type(scale))
        out = np.array(g, copy=True)                             # same shape, even 0-d
        out *= out.dtype.type(scale)
        return out

    return tree_map(scaled, grads), norm


def _check_leaves(name, flat):
    for path, leaf in flat.items():
        if not isinstance(leaf, (np.ndarray, sp.csr_array)):
            raise TypeError(f"{name}[{path!r}] must be a numpy.ndarray or "
                            f"scipy.sparse.csr_array, got {type(leaf).__name__}")
        if leaf.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}[{path!r}] must have dtype float32 or float64, "
                            f"got {leaf.dtype}")


def _same_keys(name, flat, ref_name, ref):
    if flat.keys() != ref.keys():
        missing = sorted(ref.keys() - flat.keys())
        extra = sorted(flat.keys() - ref.keys())
        raise ValueError(f"{name} must have the leaves of {ref_name}; "
                         f"missing {missing}, unexpected {extra}")


def _check_step_inputs(p_flat, g_flat, m_flat, v_flat):
    """Validate everything before the first write, so a bad call changes nothing."""
    _check_leaves("params", p_flat)
    _same_keys("grads", g_flat, "params", p_flat)
    _same_keys("state['m']", m_flat, "params", p_flat)
    _same_keys("state['v']", v_flat, "params", p_flat)
    for path, w in p_flat.items():
        g = g_flat[path]
        if isinstance(w, sp.csr_array):
            if not isinstance(g, sp.csr_array):
                raise TypeError(f"grads[{path!r}] must be a csr_array like the weight, "
                                f"got {type(g).__name__}")
            if (g.shape != w.shape or not np.array_equal(g.indptr, w.indptr)
                    or not np.array_equal(g.indices, w.indices)):
                raise ValueError(f"grads[{path!r}] must have the sparsity pattern of "
                                 "params (equal shape, indices and indptr); it differs")
        elif not isinstance(g, np.ndarray) or g.shape != w.shape:
            raise ValueError(f"grads[{path!r}] must be an ndarray of shape {w.shape}, "
                             f"got {type(g).__name__} {getattr(g, 'shape', '')}")
        if g.dtype != w.dtype:
            raise TypeError(f"grads[{path!r}] must have the dtype of params ({w.dtype}), "
                            f"got {g.dtype}")
        values = _values(w)
        if not values.flags.writeable:
            raise ValueError(f"params[{path!r}] must be writeable (updated in place)")
        for mom, flat in (("m", m_flat), ("v", v_flat)):
            s = flat[path]
            if not isinstance(s, np.ndarray) or s.shape != values.shape or s.dtype != w.dtype:
                raise ValueError(f"state[{mom!r}][{path!r}] must be an ndarray of shape "
                                 f"{values.shape} and dtype {w.dtype}, got "
                                 f"{getattr(s, 'shape', type(s).__name__)} "
                                 f"{getattr(s, 'dtype', '')}")


def _raise_non_finite(g_flat):
    """Name the first gradient leaf holding NaN or inf (the global norm was not finite)."""
    for path, g in g_flat.items():
        if not np.all(np.isfinite(_values(g))):
            raise ValueError(f"grads[{path!r}] must be finite, got NaN or inf")
    raise ValueError("grads must have a finite global norm, got an overflow to inf "
                     "(every value is finite but their squares sum past float64's range)")


def step(params, grads, state, cfg):
    """Apply one AdamW update to ``params`` in place; advance ``state`` in place.

    Parameters
    ----------
    params : nested dict of float ndarray / csr_array leaves; ndarray leaves and the
        ``.data`` of csr leaves are overwritten, nothing is reallocated.
    grads : same keys; a csr weight's gradient has the weight's pattern.  Not modified.
    state : from :func:`init_state` (moments updated in place, ``step`` incremented).
    cfg : AdamWConfig.

    Returns
    -------
    dict(lr=learning rate used, grad_norm=global gradient norm before clipping)

    Every check runs before the first write: on an error nothing has changed.
    """
    if not isinstance(cfg, AdamWConfig):
        raise TypeError(f"cfg must be an AdamWConfig, got {type(cfg).__name__}")
    if not isinstance(state, dict) or not {"step", "m", "v"} <= state.keys():
        raise ValueError("state must be a dict with keys 'step', 'm', 'v' (from init_state), "
                         f"got {type(state).__name__} {sorted(getattr(state, 'keys', list)())}")
    p_flat, g_flat = flatten(params), flatten(grads)
    m_flat, v_flat = flatten(state["m"]), flatten(state["v"])
    _check_step_inputs(p_flat, g_flat, m_flat, v_flat)

    t = check_int("state['step']", state["step"], 0) + 1
    lr = lr_at(t, cfg)
    norm = global_norm(grads)
    if not math.isfinite(norm):         # one test for all: a NaN or inf value makes it so
        _raise_non_finite(g_flat)
    scale = _clip_scale(norm, cfg.max_grad_norm)
    beta1, beta2 = cfg.betas
    c1 = 1.0 - beta1 ** t                                        # bias corrections
    c2 = 1.0 - beta2 ** t
    for path, w in p_flat.items():
        values = _values(w)                                      # (size,) or leaf shape
        g = _values(g_flat[path]) * values.dtype.type(scale)     # clipped gradient
        m, v = m_flat[path], v_flat[path]
        m *= beta1
        m += (1.0 - beta1) * g                                   # m = b1 m + (1-b1) g
        v *= beta2
        v += (1.0 - beta2) * (g * g)                             # v = b2 v + (1-b2) g^2
        if decays(path) and cfg.weight_decay:
            values *= 1.0 - lr * cfg.weight_decay                # decoupled decay
        values -= lr * (m / c1) / (np.sqrt(v / c2) + cfg.eps)    # Adam step
    state["step"] = t
    return {"lr": lr, "grad_norm": norm}
