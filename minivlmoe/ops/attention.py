"""Multi-head self-attention with sparse Q, K, V and output projections, and masks.

Math
----
For tokens ``x`` (B, S, D), H heads of width Dh = D / H, and four sparse linear
layers q, k, v, o (each weight (D, D))::

    q = x Wq^T + bq,  k = x Wk^T + bk,  v = x Wv^T + bv          # (B, S, D) each
    split heads: 'b s (h e) -> b h s e'                          # (B, H, S, Dh) each
    scores[b,h,s,t] = q[b,h,s] . k[b,h,t] / sqrt(Dh)             # (B, H, S, S)
    scores[b,h,s,t] = -inf  where mask[b,s,t] is False           # a masked key
    p[b,h,s,:] = softmax(scores[b,h,s,:])                        # (B, H, S, S)
    ctx[b,h,s] = sum_t p[b,h,s,t] v[b,h,t]                       # (B, H, S, Dh)
    merge heads: 'b h s e -> b s (h e)'                          # (B, S, D)
    y = ctx Wo^T + bo                                            # (B, S, D)

The three input projections run as ONE product with the stacked weight ``[Wq; Wk; Wv]``
(3D, D) when all three take sparse_linear's dense path (:func:`project_qkv`), and the head
split is a view of its (N, 3D) output (:func:`split_qkv`).  The model computes attention
by segments (minivlmoe/ops/segment_attention.py), which shares these projections; this
masked form serves everything else and is the tests' oracle.

Masks
-----
``mask[b, s, t]`` is True when query ``s`` may attend to key ``t``.  The scores of the
other keys are set to ``-inf`` and the softmax op (:mod:`minivlmoe.ops.softmax`) runs
over the allowed keys only::

    p[s, t] = exp(scores[s, t] - m_s) / sum_{t' allowed} exp(scores[s, t'] - m_s)  if allowed
    p[s, t] = 0                                                                     otherwise
    m_s = max over allowed t of scores[s, t]      (stable: every exponent is <= 0)

so a masked key gets *exactly* zero probability (its exponential is exp(-inf) = 0, not
a tiny number).  A query row with no allowed key at all (every score ``-inf``) gets
all-zero weights from the softmax op: its context is 0 and its output is just the bias
``bo``; no NaN appears in forward or backward.  :func:`make_mask` builds key-padding,
causal and prefix-causal masks.

Backward (derived in docs/ops/attention.md), for ``dy`` (B, S, D)::

    dctx, dWo, dbo = o.backward(dy);  split heads                # (B, H, S, Dh)
    dp = dctx v^T                                                # (B, H, S, S)
    dv = p^T dctx                                                # (B, H, S, Dh)
    dscores = softmax.backward(dp) / sqrt(Dh)                    # p * (dp - sum_t p dp), scaled
    dq = dscores k,  dk = dscores^T q                            # (B, H, S, Dh)
    merge heads; dx = q.backward(dq) + k.backward(dk) + v.backward(dv)   # x forks 3 ways

Masked entries have p = 0, so their ``dscores`` is 0 too: the mask needs no separate
treatment in backward.  Every row of ``dscores`` sums to 0, so the key bias gets a zero
gradient, ``dbk = sum_(b,t) dk = 0``: adding ``bk`` shifts each score row by the constant
``q[s] . bk / sqrt(Dh)``, which softmax ignores.  We keep ``bk`` so that all four
projections are the same layer; it simply never learns.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import linear, softmax, sparse_linear
from .sums import column_sum
from ..tree import with_values
from .._checks import (check_array, check_bool, check_cache, check_grad, check_int,
                       check_params, check_same_dtype)

PROJECTIONS = ("q", "k", "v", "o")


def _check_heads(heads, d):
    heads = check_int("heads", heads, 1)
    if d % heads:
        raise ValueError(f"heads must divide the width D={d}, got heads={heads}")
    return heads


def init(rng, d, heads, density=1.0, dtype=np.float32):
    """Create ``{"q", "k", "v", "o"}``, each a sparse linear layer (D -> D) at ``density``.

    ``heads`` is only checked here (it must divide ``d``); it is passed again to forward.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    d = check_int("d", d, 1)
    _check_heads(heads, d)
    return {name: sparse_linear.init(rng, d, d, density, dtype) for name in PROJECTIONS}


def make_mask(valid=None, *, S=None, causal=False, prefix=0):
    """Build a boolean attention mask, True where query ``s`` may attend to key ``t``.

    Parameters
    ----------
    valid : (B, S) bool or None.  Key padding: ``valid[b, t] == False`` masks key ``t``
        for every query of item ``b``.  None means every position is valid.
    S : int, the sequence length; needed when ``valid`` is None, else must match it.
    causal : bool, allow only ``t <= s``.
    prefix : int in [0, S].  Prefix-causal mask (e.g. image tokens, then caption tokens):
        positions ``< prefix`` see the whole prefix and nothing after it, positions
        ``>= prefix`` see the prefix and are causal among themselves, i.e.
        ``t <= max(s, prefix - 1)``.  ``prefix > 0`` implies causal after the prefix.

    Returns
    -------
    mask : (B, S, S) bool when ``valid`` is given, else (1, S, S).
    """
    if valid is not None:
        check_array("valid", valid, ndim=2, axes="(B, S)", dtype_kind="b")
        if S is not None and check_int("S", S, 1) != valid.shape[1]:
            raise ValueError(f"S must equal valid.shape[1]={valid.shape[1]}, got {S}")
        S = valid.shape[1]
    elif S is None:
        raise ValueError("S must be given when valid is None, got S=None")
    S = check_int("S", S, 1)
    prefix = check_int("prefix", prefix, 0, S)
    check_bool("causal", causal)
    s = np.arange(S)[:, None]                                      # (S, 1) query position
    t = np.arange(S)[None, :]                                      # (1, S) key position
    if causal or prefix > 0:
        allowed = t <= np.maximum(s, prefix - 1)                   # (S, S)
    else:
        allowed = np.ones((S, S), dtype=bool)                      # (S, S)
    if valid is None:
        return allowed[None]                                       # (1, S, S)
    return allowed[None] & valid[:, None, :]                       # (B, S, S) keys masked


class QKVCache(NamedTuple):
    """What :func:`project_qkv_backward` needs.

    Fields
    ------
    x2 : (N, D) the projections' input, flattened (the fused product's saved input).
    Wd : (3D, D) the stacked dense weights ``[Wq; Wk; Wv]`` when the three projections ran
        as one product, else None.
    W : the three csr weights (their patterns, for the gradients) when fused, else None.
    lin : dict {"q","k","v"} of linear caches when they ran as three products, else None.
    lead : (B, S), the input's leading shape.
    """

    x2: np.ndarray
    Wd: np.ndarray | None
    W: tuple | None
    lin: dict | None
    lead: tuple


def project_qkv(x, params, heads):
    """The Q, K and V projections of ``x`` (B, S, D), head-split: ``(qkv, cache)``.

    ``qkv`` is one (3, B, H, S, Dh) view (:func:`split_qkv`): ``qkv[0], qkv[1], qkv[2]``
    are q, k, v.  When
    all three weights take sparse_linear's dense path (density 1, or >= DENSE_ABOVE) they
    run as ONE product with the stacked weight ``[Wq; Wk; Wv]`` (3D, D): one BLAS call
    over a 3x wider output instead of three, and one head split.  Otherwise (low-density
    patterns, factored layers) each is its own :func:`linear.forward`.  Both give the same
    numbers to rounding.
    """
    B, S, D = x.shape
    dense = [None if linear.is_factored(params[n]) else sparse_linear.dense_weight(params[n]["W"])
             for n in ("q", "k", "v")]
    x2 = x.reshape(B * S, D)                                       # (N, D) 'b s d -> (b s) d'
    if all(w is not None for w in dense):
        for n in ("q", "k", "v"):          # what sparse_linear.forward would check
            sparse_linear.check_layer(f"params['{n}']", params[n])
        Wd = np.concatenate(dense)                                 # (3D, D) [Wq; Wk; Wv]
        bd = np.concatenate([params[n]["b"] for n in ("q", "k", "v")])  # (3D,)
        y = x2 @ Wd.T                                              # (N, 3D) one BLAS product
        y += bd                                                    # (N, 3D) in place
        cache = QKVCache(x2=x2, Wd=Wd, W=tuple(params[n]["W"] for n in ("q", "k", "v")),
                         lin=None, lead=(B, S))
    else:
        lin = {}
        y = np.empty((B * S, 3 * D), dtype=x.dtype)                # (N, 3D)
        for i, n in enumerate(("q", "k", "v")):
            y[:, i * D:(i + 1) * D], lin[n] = linear.forward(x2, params[n])  # (N, D)
        cache = QKVCache(x2=x2, Wd=None, W=None, lin=lin, lead=(B, S))
    return split_qkv(y, B, S, heads), cache                        # (3, B, H, S, Dh) a view


def split_qkv(y, B, S, heads):
    """The head-split view of a (B*S, 3D) array ``[q | k | v]``: (3, B, H, S, Dh),
    '(b s) (r h e) -> r b h s e'.  No copy: the products that read it take strided
    matrices, and the view's inverse (:func:`project_qkv_backward`) is a free reshape.
    Backward builds its gradient the same way, on a zero (B*S, 3D) buffer."""
    D = y.shape[1] // 3
    qkv = y.reshape(B, S, 3, heads, D // heads)                    # (B, S, 3, H, Dh)
    return qkv.transpose(2, 0, 3, 1, 4)                            # (3, B, H, S, Dh) view


def project_qkv_backward(dqkv, cache):
    """Reverse of :func:`project_qkv`: ``(dx, {"q", "k", "v": dparams})`` from ``dqkv``
    (3, B, H, S, Dh)."""
    B, S = cache.lead
    N, D = cache.x2.shape
    dy = dqkv.transpose(1, 3, 0, 2, 4).reshape(N, 3 * D)           # (N, 3D) 'r b h s e -> (b s) (r h e)', free for a split_qkv view
    dparams = {}
    if cache.Wd is not None:
        # y = x2 Wd^T + bd  ->  dx = dy Wd,  dWd = dy^T x2,  dbd = sum_n dy
        dx = dy @ cache.Wd                                         # (N, D)
        dWd = dy.T @ cache.x2                                      # (3D, D)
        dbd = column_sum(dy)                                       # (3D,)
        for i, (n, W) in enumerate(zip(("q", "k", "v"), cache.W)):
            rows = slice(i * D, (i + 1) * D)
            dparams[n] = {"W": with_values(W, sparse_linear.pattern_values(W, dWd[rows])),
                          "b": dbd[rows]}
    else:
        dx = np.zeros((N, D), dtype=dy.dtype)                      # (N, D) x forks 3 ways
        for i, n in enumerate(("q", "k", "v")):
            dxi, dparams[n] = linear.backward(dy[:, i * D:(i + 1) * D], cache.lin[n])
            dx += dxi                                              # (N, D) forks join
    return dx.reshape(B, S, D), dparams                            # (B, S, D)


def attend_masked(q, k, v, scale, mask):
    """The masked core: ``(ctx, probs)`` from q, k, v (B, H, S, Dh) and a mask
    broadcastable to (B, S, S) (or None)."""
    scores = q @ k.transpose(0, 1, 3, 2)                           # (B, H, S, S)
    scores *= scale                                                # (B, H, S, S) in place
    if mask is not None:
        allowed = mask[..., None, :, :] if mask.ndim == 3 else mask  # (B|1, 1, S, S) or (S, S)
        np.copyto(scores, -np.inf, where=~allowed)                 # (B, H, S, S) masked keys
    probs, _ = softmax.forward(scores, axis=-1)                    # (B, H, S, S) 0 where masked
    return probs @ v, probs                                        # (B, H, S, Dh), (B, H, S, S)


def attend_masked_backward(dctx, q, k, v, probs, scale):
    """Reverse of :func:`attend_masked`: ``(dq, dk, dv)``, each (B, H, S, Dh)."""
    # ctx = p @ v
    dp = dctx @ v.transpose(0, 1, 3, 2)                            # (B, H, S, S)
    dv = probs.transpose(0, 1, 3, 2) @ dctx                        # (B, H, S, Dh)
    # p = softmax(scores), masked scores at -inf: dscores = 0 wherever p = 0
    dscores = softmax.backward(dp, softmax.Cache(p=probs, axis=3))  # (B, H, S, S)
    # scores = (q @ k^T) * scale  (a masked score is a constant -inf: no gradient)
    dscores *= scale                                               # (B, H, S, S) in place
    dq = dscores @ k                                               # (B, H, S, Dh)
    dk = dscores.transpose(0, 1, 3, 2) @ q                         # (B, H, S, Dh)
    return dq, dk, dv


def check_inputs(x, params, heads):
    """Validate ``x`` (B, S, D), ``heads`` and the four projections; returns ``heads``."""
    check_array("x", x, ndim=3, axes="(B, S, D)")
    D = x.shape[2]
    heads = _check_heads(heads, D)
    check_params("params", params, PROJECTIONS)
    for name in PROJECTIONS:
        shape, w_name, W = linear.check(f"params['{name}']", params[name])  # W or A B
        if shape != (D, D):
            raise ValueError(f"{w_name} must have shape (D, D)=({D}, {D}), got {W.shape}")
        check_same_dtype("x", x, w_name, W)
    return heads


class Cache(NamedTuple):
    """What backward needs.

    Fields
    ------
    qkv : QKVCache of the Q/K/V projections (one fused product or three).
    o : the output projection's linear cache (sparse_linear or lowrank_linear).
    q, k, v : (B, H, S, Dh) the projected, head-split queries, keys and values
        (q and k for dk and dq, v for dp).
    probs : (B, H, S, S) attention weights ``p`` (rows sum to 1 over allowed keys, are
        exactly 0 on masked keys, all 0 for fully masked rows); needed for dv and the
        softmax backward.
    scale : float, 1/sqrt(Dh).
    """

    qkv: QKVCache
    o: object
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    probs: np.ndarray
    scale: float


def split_heads(a, heads):
    """'b s (h e) -> b h s e'."""
    B, S, D = a.shape
    return a.reshape(B, S, heads, D // heads).transpose(0, 2, 1, 3)   # (B, H, S, Dh)


def merge_heads(a):
    """'b h s e -> b s (h e)' (inverse of :func:`_split_heads`)."""
    B, H, S, Dh = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, S, H * Dh)              # (B, S, D)


def _check_mask(mask, B, S):
    check_array("mask", mask, dtype_kind="b")
    ok = mask.ndim in (2, 3)
    if ok:
        try:
            np.broadcast_shapes(mask.shape, (B, S, S))
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"mask must be broadcastable to (B, S, S)=({B}, {S}, {S}), "
                         f"got shape {mask.shape}")
    return mask


def forward(x, params, heads, mask=None):
    """Multi-head scaled dot-product self-attention.

    Parameters
    ----------
    x : (B, S, D) float32 or float64.
    params : {"q","k","v","o"}, each sparse linear params with W (D, D), dtype of ``x``.
    heads : int H, must divide D.
    mask : bool array broadcastable to (B, S, S), True where query s may attend to
        key t (see :func:`make_mask`), or None for full attention.

    Returns
    -------
    y : (B, S, D), dtype of ``x``.
    cache : Cache (fields ``qkv``, ``o``, ``q``, ``k``, ``v``, ``probs``, ``scale``).
    """
    heads = check_inputs(x, params, heads)
    B, S, D = x.shape
    if mask is not None:
        mask = _check_mask(mask, B, S)
    scale = 1.0 / float(np.sqrt(D // heads))                       # a Python float keeps float32
    qkv, c_qkv = project_qkv(x, params, heads)                     # (3, B, H, S, Dh)
    q, k, v = qkv                                                  # (B, H, S, Dh) each
    ctx, probs = attend_masked(q, k, v, scale, mask)               # (B, H, S, Dh), (B, H, S, S)
    y, c_o = linear.forward(merge_heads(ctx), params["o"])        # (B, S, D)
    return y, Cache(qkv=c_qkv, o=c_o, q=q, k=k, v=v, probs=probs, scale=scale)


def backward(dy, cache):
    """Gradients of :func:`forward`.

    Parameters
    ----------
    dy : (B, S, D) upstream gradient.
    cache : Cache from :func:`forward`.

    Returns
    -------
    dx : (B, S, D)
    dparams : {"q","k","v","o"}, each {"W": csr_array with W's pattern, "b": (D,)}.
    """
    check_cache(cache, Cache)
    lead, d_out, _ = linear.output(cache.o)
    check_grad("dy", dy, lead + (d_out,), cache.q.dtype)
    heads = cache.q.shape[1]
    # y = o(merge(ctx))
    dctx, do = linear.backward(dy, cache.o)                        # (B, S, D)
    dctx = split_heads(dctx, heads)                               # (B, H, S, Dh)
    # ctx = attend(q, k, v)
    B, H, S, Dh = cache.q.shape
    dqkv = split_qkv(np.empty((B * S, 3 * H * Dh), dtype=cache.q.dtype), B, S, H)  # (3, B, H, S, Dh)
    dqkv[0], dqkv[1], dqkv[2] = attend_masked_backward(dctx, cache.q, cache.k, cache.v,
                                                       cache.probs, cache.scale)
    # q, k, v = proj(x): x forks into three branches, their gradients add
    dx, dparams = project_qkv_backward(dqkv, cache.qkv)            # (B, S, D)
    dparams["o"] = do
    return dx, {name: dparams[name] for name in PROJECTIONS}
