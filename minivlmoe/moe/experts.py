"""A pool of E experts, each a two-layer FFN with its own sparse weights.

The experts run on the compact slot layout of minivlmoe/moe/dispatch.py: the M filled
slots are sorted by expert, so expert e's inputs are the contiguous rows
``xs[offsets[e]:offsets[e+1]]``.  One loop runs over the experts (never over
tokens)::

    Ys[offsets[e]:offsets[e+1]] = FFN_e(Xs[offsets[e]:offsets[e+1]])

Backward runs the same loop with ``ffn.backward``.  Each expert's weight gradient is
one matrix product over the tokens it received, written straight into the weight's
sparsity pattern; nothing is accumulated into a dense zero array.  An expert that
received no token is skipped in both passes, and only its gradient is an explicit
zero (the gradient must have the params' structure).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..ops import ffn, linear
from .._checks import (check_array, check_cache, check_grad, check_int, check_params,
                       check_same_dtype, shorten)
from ..tree import zeros_like


def expert_names(num_experts):
    """The param keys ``"e0", "e1", ...`` in expert order."""
    return [f"e{i}" for i in range(num_experts)]


def init(rng, d, hidden, num_experts, density=1.0, dtype=np.float32):
    """``{"e0": ffn params, ..., "e{E-1}": ffn params}``, each with its own pattern."""
    num_experts = check_int("num_experts", num_experts, 1)
    return {name: ffn.init(rng, d, hidden, density, dtype) for name in expert_names(num_experts)}


class Cache(NamedTuple):
    """``ffn`` : list of E ffn caches (None for an expert with no token);
    ``offsets`` (E+1,) the slot blocks; ``params``: the expert params (for the
    zero gradients of idle experts); ``shape``: (M, D) of the inputs."""

    ffn: list
    offsets: np.ndarray
    params: dict
    shape: tuple


def forward(xs, offsets, params):
    """Run each expert on its block of slots.

    Parameters
    ----------
    xs : (M, D) float array, slot inputs sorted by expert (dispatch.dispatch_forward).
    offsets : (E+1,) int, expert e owns rows ``offsets[e]:offsets[e+1]``.
    params : {"e0": ffn params, ...} with E entries.

    Returns
    -------
    ys : (M, D), C-contiguous, dtype of ``xs``.
    cache : Cache
    """
    check_array("xs", xs, ndim=2, axes="(M, D)")
    check_array("offsets", offsets, ndim=1, axes="(E+1,)", dtype_kind="i")
    if offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != xs.shape[0] \
            or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must be non-decreasing from 0 to the rows of xs "
                         f"({xs.shape[0]}) with at least 2 entries, got "
                         f"{shorten(offsets.tolist())}")
    names = expert_names(len(offsets) - 1)
    if not isinstance(params, dict) or sorted(params) != sorted(names):
        got = sorted(map(str, params)) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params must have the keys {shorten(names)} (one per expert of "
                         f"offsets), got {shorten(got)}")
    for name in names:                                           # O(E): widths and dtypes
        check_params(f"params['{name}']", params[name], ("fc1", "fc2"))
        (_, d), w1_name, w1 = linear.check(f"params['{name}']['fc1']",
                                           params[name]["fc1"])  # W or A B
        if d != xs.shape[1]:
            raise ValueError(f"xs must have shape (M, D={d}) (the width of "
                             f"{w1_name}), got {xs.shape}")
        check_same_dtype("xs", xs, w1_name, w1)
    ys = np.empty_like(xs, order="C")                            # (M, D)
    caches = []
    for e, name in enumerate(names):                             # loop over experts only
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi == lo:
            caches.append(None)
            continue
        ys[lo:hi], cache = ffn.forward(xs[lo:hi], params[name])  # (M_e, D)
        caches.append(cache)
    return ys, Cache(ffn=caches, offsets=offsets, params=params, shape=xs.shape)


def backward(dys, cache):
    """Gradients of :func:`forward`.

    Returns
    -------
    dxs : (M, D)
    dparams : {"e0": ffn grads, ...}, keyed like the params.
    """
    check_cache(cache, Cache)
    _, _, w1 = linear.check("params['e0']['fc1']", cache.params["e0"]["fc1"])  # W or A
    check_grad("dys", dys, cache.shape, w1.dtype)
    caches, offsets, params, shape = cache
    dxs = np.empty(shape, dtype=dys.dtype)                       # (M, D)
    dparams = {}
    for e, name in enumerate(expert_names(len(offsets) - 1)):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if caches[e] is None:                                    # no token: zero gradient
            dparams[name] = zeros_like(params[name])
            continue
        dxs[lo:hi], dparams[name] = ffn.backward(dys[lo:hi], caches[e])  # (M_e, D)
    return dxs, dparams
