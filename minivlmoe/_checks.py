"""Input validation shared by every module.

Each helper raises ``ValueError`` or ``TypeError`` with a message that names the
argument, what was expected and what arrived, e.g.
``ValueError("x must have 2 dimensions (N, Din), got shape (3, 4, 5)")``.

Checked once per public call
----------------------------
Every op checks its arguments, so each op can be called on its own.  Inside the model
the same arrays pass through many ops, and a finiteness scan of every activation at
every hop is a pass over the data that finds nothing new: the model checked its
inputs and its parameters when the call began, and finite inputs give finite
activations (an overflow still shows as a non-finite loss, which training stops on).
So :func:`checked_inputs` opens a region in which :func:`check_array` skips its O(n)
finiteness scan; its O(1) checks (type, dtype, rank) stay.  Only the model's public
entry points open it (``minivlmoe.model.forward``, ``minivlmoe.moe.moe_layer.forward``),
after their own full checks (:func:`check_finite_tree` on their parameters).
"""

from __future__ import annotations

import contextlib
import numbers

import numpy as np
import scipy.sparse as sp


def shorten(value, limit=200):
    """``value`` (a str as is, anything else as its ``repr``) on one line (runs of white
    space folded to one space) and cut to about ``limit`` characters, for echoing into
    messages."""
    text = " ".join((value if isinstance(value, str) else repr(value)).split())
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def error_line(error):
    """An exception as one line for a message: ``"<Type>: <text>"`` (white space folded,
    cut by :func:`shorten`), or just the type when it has no text."""
    text = shorten(str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_bool(name, value):
    """Require a ``bool`` (or ``numpy.bool_``); anything merely truthy is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} "
                        f"{shorten(repr(value))}")
    return bool(value)


def check_dtype(name, dtype):
    """Require float32 or float64 (a dtype, a type or its name); return the ``np.dtype``."""
    try:
        dt = None if dtype is None else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.float32, np.float64):
        got = dt if dt is not None else shorten(repr(dtype))
        raise TypeError(f"{name} must be float32 or float64, got {got}")
    return dt


def check_params(name, params, keys):
    """Require a dict holding at least ``keys``; return it."""
    if not isinstance(params, dict):
        raise TypeError(f"{name} must be a dict with keys {list(keys)}, got "
                        f"{type(params).__name__} {shorten(repr(params))}")
    missing = [key for key in keys if key not in params]
    if missing:
        raise ValueError(f"{name} must have the keys {list(keys)}, missing {missing} "
                         f"(got {shorten(repr(sorted(map(str, params))))})")
    return params


def check_rng(name, rng):
    """Require a ``numpy.random.Generator``."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{name} must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


_CHECKED_DEPTH = 0     # > 0 inside checked_inputs(): finiteness scans are skipped


@contextlib.contextmanager
def checked_inputs():
    """A region whose inputs the public call that opens it has already checked in full:
    :func:`check_array` skips its finiteness scans inside it (module docstring)."""
    global _CHECKED_DEPTH
    _CHECKED_DEPTH += 1
    try:
        yield
    finally:
        _CHECKED_DEPTH -= 1


def check_finite_tree(name, tree, prefix=""):
    """Every float value of a nested dict of ndarray / csr_array leaves must be finite
    (one scan per leaf); the error names the leaf, e.g. ``params['blocks.0.ln1.gamma']``.
    What a public call runs on its parameters before it opens :func:`checked_inputs`."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            check_finite_tree(name, value, f"{prefix}.{key}" if prefix else str(key))
        return tree
    values = tree.data if isinstance(tree, sp.csr_array) else tree
    if (isinstance(values, np.ndarray) and values.dtype.kind == "f"
            and not np.isfinite(values).all()):
        raise ValueError(f"{name}[{prefix!r}] must be finite, got NaN or inf value(s)")
    return tree


def check_array(name, x, *, ndim=None, axes=None, dtype_kind="f", finite=True):
    """Validate a NumPy array argument and return it.

    Parameters
    ----------
    name : str, the argument's name used in error messages.
    x : the value to check.
    ndim : int or None, required number of dimensions.
    axes : str or None, axis letters for the message, e.g. "(N, Din)".
    dtype_kind : "f" (floating), "i" (integer), "b" (bool) or None (any).
    finite : bool, reject NaN and inf (floating arrays only; skipped inside
        :func:`checked_inputs`).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        what = f" {axes}" if axes else ""
        raise ValueError(f"{name} must have {ndim} dimensions{what}, got shape {x.shape}")
    if dtype_kind == "f" and x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if dtype_kind == "i" and x.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if dtype_kind == "b" and x.dtype != np.bool_:
        raise TypeError(f"{name} must have dtype bool, got {x.dtype}")
    if finite and not _CHECKED_DEPTH and x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} must be finite, got {bad} NaN or inf value(s)")
    return x


def check_cache(cache, cache_type):
    """Require the cache a forward returned (a backward's second argument)."""
    if not isinstance(cache, cache_type):
        raise TypeError(f"cache must be the {cache_type.__name__} returned by forward, got "
                        f"{type(cache).__name__}")
    return cache


def check_grad(name, g, shape=None, dtype=None):
    """Require an upstream gradient: a real number when ``shape == ()``, else a float
    array of ``shape`` (None entries match any size) and ``dtype``.  O(1): no pass over
    ``g`` (a NaN gradient gives NaN gradients, as it should)."""
    if shape == () and not isinstance(g, np.ndarray):
        return check_float(name, g)
    check_array(name, g, finite=False)
    if shape is not None:
        check_shape(name, g, shape)
    if dtype is not None and g.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} (the forward's), "
                        f"got {g.dtype}")
    return g


def check_shape(name, x, expected, axes=None):
    """Require ``x.shape == expected`` (``None`` entries match any size)."""
    ok = len(x.shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, x.shape)
    )
    if not ok:
        want = tuple("?" if e is None else e for e in expected)
        what = f" {axes}" if axes else ""
        raise ValueError(f"{name} must have shape {want}{what}, got {x.shape}")
    return x


def check_same_dtype(name, x, ref_name, ref):
    """Require ``x.dtype == ref.dtype`` (no silent up- or down-casting)."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    return x


def check_csr(name, w, shape=None):
    """Require a canonical ``scipy.sparse.csr_array`` (sorted indices, no duplicates)."""
    if not isinstance(w, sp.csr_array):
        raise TypeError(f"{name} must be a scipy.sparse.csr_array, got {type(w).__name__}")
    if shape is not None and w.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {w.shape}")
    if not w.has_canonical_format:
        raise ValueError(f"{name} must be in canonical format (sorted indices, no duplicates)")
    return w


def check_int(name, value, low=None, high=None):
    """Require an integer in ``[low, high]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} "
                        f"{shorten(repr(value))}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def check_float(name, value, low=None, high=None, low_open=False, high_open=False):
    """Require a finite real number in the given (half-)open or closed interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} "
                        f"{shorten(repr(value))}")
    value = float(value)
    bad = not np.isfinite(value)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{hb}, got {value}")
    return value


def check_choice(name, value, choices):
    """Require ``value`` to be one of ``choices``."""
    try:
        ok = value in choices
    except TypeError:                                            # unhashable, e.g. a list
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {shorten(repr(sorted(choices)))}, "
                         f"got {shorten(repr(value))}")
    return value
