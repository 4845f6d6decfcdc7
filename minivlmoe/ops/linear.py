"""Every linear layer of the model: a sparse weight or a low-rank factorization of one.

The one place that picks the layer by its params' keys, so attention, the FFNs (and so
the experts), the patch embedding and the model's heads take either kind::

    {"W", "b"}       -> minivlmoe.ops.sparse_linear   y = x W^T + b
    {"A", "B", "b"}  -> minivlmoe.ops.lowrank_linear  y = (x A^T) B^T + b

An unfactored layer goes straight to ``sparse_linear`` (same calls, same arithmetic).
Which layers are factored is the model's ``ModelConfig.lowrank`` (minivlmoe/model.py);
converting a trained run is minivlmoe/compress/lowrank.py.
"""

from __future__ import annotations

from . import lowrank_linear, sparse_linear
from .._checks import check_csr, check_params


def is_factored(params):
    """True for low-rank params ``{"A", "B", "b"}`` (a dict without "W" that has "A")."""
    return isinstance(params, dict) and "A" in params and "W" not in params


def check(name, params):
    """Validate a linear layer's params of either kind.

    Returns ``(shape, weight_name, weight)``: ``shape`` = (Dout, Din) of the (product)
    weight, and the name and csr_array of the leaf to compare dtypes against (``W``, or
    the factor ``A``).
    """
    if is_factored(params):
        shape = lowrank_linear.check(name, params)
        return shape, f"{name}['A']", params["A"]
    check_params(name, params, ("W", "b"))
    W = check_csr(f"{name}['W']", params["W"])
    return W.shape, f"{name}['W']", W


def forward(x, params):
    """``y = x W^T + b`` with ``W`` stored as is or as ``B A``; returns (y, cache)."""
    if is_factored(params):
        return lowrank_linear.forward(x, params)
    return sparse_linear.forward(x, params)


def backward(dy, cache):
    """Gradients of :func:`forward`: ``(dx, dparams)`` keyed like the params."""
    if isinstance(cache, lowrank_linear.Cache):
        return lowrank_linear.backward(dy, cache)
    return sparse_linear.backward(dy, cache)


def output(cache):
    """``(lead, Dout, dtype)`` of the output of the layer whose cache this is (for
    checking an upstream gradient)."""
    last = cache.second if isinstance(cache, lowrank_linear.Cache) else cache
    return last.lead, last.W.shape[0], last.W.dtype
