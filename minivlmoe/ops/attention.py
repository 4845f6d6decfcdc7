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


class Cache(NamedTuple):
    """What backward needs.

    Fields
    ------
    lin : dict {"q","k","v","o"} of linear caches (sparse_linear or lowrank_linear) (the projections' inputs).
    q, k, v : (B, H, S, Dh) the projected, head-split queries, keys and values
        (q and k for dk and dq, v for dp).
    probs : (B, H, S, S) attention weights ``p`` (rows sum to 1 over allowed keys, are
        exactly 0 on masked keys, all 0 for fully masked rows); needed for dv and the
        softmax backward.
    scale : float, 1/sqrt(Dh).
    """

    lin: dict
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    probs: np.ndarray
    scale: float


def _split_heads(a, heads):
    """'b s (h e) -> b h s e'."""
    B, S, D = a.shape
    return a.reshape(B, S, heads, D // heads).transpose(0, 2, 1, 3)   # (B, H, S, Dh)


def _merge_heads(a):
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
    cache : Cache (fields ``lin``, ``q``, ``k``, ``v``, ``probs``, ``scale``).
    """
    check_array("x", x, ndim=3, axes="(B, S, D)")
    B, S, D = x.shape
    heads = _check_heads(heads, D)
    check_params("params", params, PROJECTIONS)
    for name in PROJECTIONS:
        shape, w_name, W = linear.check(f"params['{name}']", params[name])  # W or A B
        if shape != (D, D):
            raise ValueError(f"{w_name} must have shape (D, D)=({D}, {D}), got {W.shape}")
        check_same_dtype("x", x, w_name, W)
    if mask is not None:
        mask = _check_mask(mask, B, S)
    scale = 1.0 / float(np.sqrt(D // heads))                       # a Python float keeps float32
    lin = {}
    q, lin["q"] = linear.forward(x, params["q"])                   # (B, S, D)
    k, lin["k"] = linear.forward(x, params["k"])                   # (B, S, D)
    v, lin["v"] = linear.forward(x, params["v"])                   # (B, S, D)
    q, k, v = (_split_heads(a, heads) for a in (q, k, v))          # (B, H, S, Dh) each
    scores = q @ k.transpose(0, 1, 3, 2)                           # (B, H, S, S)
    scores *= scale                                                # (B, H, S, S) in place
    if mask is not None:
        allowed = mask[..., None, :, :] if mask.ndim == 3 else mask  # (B|1, 1, S, S) or (S, S)
        np.copyto(scores, -np.inf, where=~allowed)                 # (B, H, S, S) masked keys
    probs, _ = softmax.forward(scores, axis=-1)                    # (B, H, S, S) 0 where masked
    ctx = probs @ v                                                # (B, H, S, Dh)
    y, lin["o"] = linear.forward(_merge_heads(ctx), params["o"])         # (B, S, D)
    return y, Cache(lin=lin, q=q, k=k, v=v, probs=probs, scale=scale)


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
    lead, d_out, _ = linear.output(cache.lin["o"])
    check_grad("dy", dy, lead + (d_out,), cache.q.dtype)
    lin, q, k, v, p, scale = cache
    heads = q.shape[1]
    dparams = {}
    # y = o(merge(ctx))
    dctx, dparams["o"] = linear.backward(dy, lin["o"])             # (B, S, D)
    dctx = _split_heads(dctx, heads)                               # (B, H, S, Dh)
    # ctx = p @ v
    dp = dctx @ v.transpose(0, 1, 3, 2)                            # (B, H, S, S)
    dv = p.transpose(0, 1, 3, 2) @ dctx                            # (B, H, S, Dh)
    # p = softmax(scores), masked scores at -inf: dscores = 0 wherever p = 0
    dscores = softmax.backward(dp, softmax.Cache(p=p, axis=3))     # (B, H, S, S)
    # scores = (q @ k^T) * scale  (a masked score is a constant -inf: no gradient)
    dscores *= scale                                               # (B, H, S, S) in place
    dq = dscores @ k                                               # (B, H, S, Dh)
    dk = dscores.transpose(0, 1, 3, 2) @ q                         # (B, H, S, Dh)
    # q, k, v = proj(x): x forks into three branches, their gradients add
    dxq, dparams["q"] = linear.backward(_merge_heads(dq), lin["q"])         # (B, S, D)
    dxk, dparams["k"] = linear.backward(_merge_heads(dk), lin["k"])         # (B, S, D)
    dxv, dparams["v"] = linear.backward(_merge_heads(dv), lin["v"])         # (B, S, D)
    dx = dxq + dxk + dxv                                           # (B, S, D)
    return dx, {name: dparams[name] for name in PROJECTIONS}
