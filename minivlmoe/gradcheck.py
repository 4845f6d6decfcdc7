"""Finite-difference gradient checking, used by the tests, the CLI and the docs.

The method (see docs/backprop.md):

* Draw a random upstream gradient ``dout`` with the shape of the output and define the
  scalar ``L(inputs) = sum(out * dout)``.  Then ``dL/dinput`` is exactly what a
  backward pass returns when it is fed ``dout``.
* Compare each analytic entry ``a = dL/dθ_i`` with the centered difference
  ``n = (L(θ + h e_i) - L(θ - h e_i)) / (2h)`` in float64.  The truncation error is
  O(h²) and the round-off error O(eps·|L|/h); h = 1e-6 balances them.
* Error of one entry::

      err_i = |a_i - n_i| / max(|a_i| + |n_i|, floor),
      floor = max(1e-2 * max_j(|a_j| + |n_j|),  4 eps S / (h tol),  1e-300)

  where ``S = sum |out * dout|`` is the size of the terms of L and ``eps`` the float64
  machine epsilon.  While the floor is the first term, every denominator is at most
  ``max_j(|a_j| + |n_j|)``, so the check is at least as strict as the norm-wise
  ``max|a - n| / max(|a| + |n|)``; it keeps entries ~100x smaller than the largest from
  failing on round-off.  The second term is the round-off of the centered difference
  itself (``~ eps S / h``) divided by the tolerance: an argument whose gradients are all
  tiny next to L (a saturated GELU, an expert that gets one token) is held to the
  absolute accuracy that finite differences can deliver, ``tol/4`` of it, no finer.
* Small arguments (at most ``max_full`` entries) are checked entry by entry; larger
  ones on ``n_sample`` random entries plus ``n_directions`` random directional
  derivatives ``<a, v>`` against ``(L(θ + h v) - L(θ - h v)) / (2h)``.

Every differentiable argument must be accounted for: a float ``ndarray`` or a
``csr_array`` leaf of the inputs either gets a gradient from the backward, or the case
names it in ``skip`` with the reason it is not checked (e.g. attention's key bias, whose
true gradient is exactly zero).  A missing gradient, a gradient for a skipped argument,
or a skip naming no differentiable argument is an error, so a backward cannot pass by
leaving something out.  Integer and boolean arrays and non-array values are constants.

A sparse weight (``csr_array``) is perturbed only on its stored entries, and its
gradient must be a ``csr_array`` with byte-identical ``indices`` and ``indptr``.
During the analytic pass every input and ``dout`` is made read-only, so a forward or
backward that writes into its arguments fails loudly.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import scipy.sparse as sp

from .tree import flatten, tree_map


class GradcheckCase(NamedTuple):
    """One op to check.

    Fields
    ------
    op : str, name shown in reports (e.g. "sparse_linear").
    inputs : nested dict of float64 ``ndarray`` / ``csr_array`` leaves (and any other
        non-differentiable values such as integer ids or masks).
    forward : ``inputs -> (out, cache)``; ``out`` an array or a scalar.
    backward : ``(dout, cache) -> grads``, a nested dict holding a gradient for each
        differentiable leaf of ``inputs`` under the same keys.
    h : finite-difference step.
    tol : maximum accepted error (see the module docstring).
    skip : ``{dotted path: reason}`` of differentiable leaves deliberately left
        unchecked; the backward must return no gradient for them.
    """

    op: str
    inputs: dict
    forward: Callable[[dict], tuple]
    backward: Callable[[Any, Any], dict]
    h: float = 1e-6
    tol: float = 1e-6
    skip: Mapping[str, str] = {}


class GradcheckRow(NamedTuple):
    """Result for one (op, argument) pair; ``worst`` = (index, analytic, numeric).

    A skipped argument gives a row with ``skipped`` = the case's reason, ``checked`` = 0
    and ``passed`` = True (a skip is not a failure).
    """

    op: str
    argument: str
    shape: tuple
    max_rel_error: float
    checked: int
    passed: bool
    worst: tuple
    skipped: str = ""


def is_differentiable(leaf):
    """A float ``ndarray`` or a ``csr_array``: a leaf that needs a gradient or a skip."""
    return (isinstance(leaf, sp.csr_array)
            or (isinstance(leaf, np.ndarray) and np.issubdtype(leaf.dtype, np.floating)))


def _check_accounted(case, leaves, grads):
    """Every differentiable leaf has a gradient or a skip reason, and nothing else does."""
    differentiable = [path for path, leaf in leaves.items() if is_differentiable(leaf)]
    unknown = sorted(set(grads) - set(leaves))
    if unknown:
        raise AssertionError(f"{case.op}: backward returned gradients for unknown "
                             f"arguments {unknown}")
    bad_skip = sorted(set(case.skip) - set(differentiable))
    if bad_skip:
        raise AssertionError(f"{case.op}: skip names {bad_skip}, expected differentiable "
                             f"arguments among {differentiable}")
    skipped_but_returned = sorted(set(grads) & set(case.skip))
    if skipped_but_returned:
        raise AssertionError(f"{case.op}: backward returned gradients for skipped "
                             f"arguments {skipped_but_returned}")
    missing = [path for path in differentiable if path not in grads and path not in case.skip]
    if missing:
        raise AssertionError(f"{case.op}: backward returned no gradient for differentiable "
                             f"arguments {missing} (check them, or name each in the "
                             "case's skip with a reason)")


def _copy_leaf(leaf):
    if isinstance(leaf, sp.csr_array):
        return sp.csr_array((leaf.data.copy(), leaf.indices.copy(), leaf.indptr.copy()),
                            shape=leaf.shape)
    if isinstance(leaf, np.ndarray):
        return np.array(leaf, order="C", copy=True)
    return leaf


def _buffer(leaf):
    """Flat writable view of the values that a perturbation changes."""
    return leaf.data if isinstance(leaf, sp.csr_array) else leaf.reshape(-1)


def _set_writeable(tree, flag):
    for leaf in flatten(tree).values():
        for arr in ((leaf.data, leaf.indices, leaf.indptr) if isinstance(leaf, sp.csr_array)
                    else (leaf,) if isinstance(leaf, np.ndarray) else ()):
            arr.flags.writeable = flag


def _index_of(leaf, flat_index):
    """Human-readable index of the ``flat_index``-th perturbed value."""
    if isinstance(leaf, sp.csr_array):
        row = int(np.searchsorted(leaf.indptr, flat_index, side="right") - 1)
        return (row, int(leaf.indices[flat_index]))
    return tuple(int(i) for i in np.unravel_index(flat_index, leaf.shape))


def _analytic_values(op, path, leaf, grad):
    if isinstance(leaf, sp.csr_array):
        if not isinstance(grad, sp.csr_array):
            raise AssertionError(f"{op}: gradient of sparse {path} must be a csr_array, "
                                 f"got {type(grad).__name__}")
        same = (grad.shape == leaf.shape
                and np.array_equal(grad.indptr, leaf.indptr)
                and np.array_equal(grad.indices, leaf.indices))
        if not same:
            raise AssertionError(f"{op}: gradient of {path} does not have the weight's "
                                 "sparsity pattern (indices/indptr differ)")
        return np.asarray(grad.data, dtype=np.float64)
    grad = np.asarray(grad)
    if grad.shape != leaf.shape:
        raise AssertionError(f"{op}: gradient of {path} has shape {grad.shape}, "
                             f"expected {leaf.shape}")
    return np.asarray(grad, dtype=np.float64).reshape(-1)


def roundoff_floor(scale, h, tol):
    """``4 eps S / (h tol)``: the round-off of a centered difference of a sum of terms of
    total size ``S = scale``, divided by the tolerance (module docstring)."""
    return 4.0 * np.finfo(np.float64).eps * scale / (h * tol)


def rel_errors(a, n, abs_floor=0.0):
    """Entry-wise errors ``|a - n| / max(|a| + |n|, floor)`` (module docstring);
    ``abs_floor`` is the round-off term of the floor."""
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    mag = np.abs(a) + np.abs(n)
    floor = max(1e-300, 1e-2 * float(mag.max(initial=0.0)), abs_floor)
    return np.abs(a - n) / np.maximum(mag, floor)


def check_case(case, rng, *, max_full=256, n_sample=48, n_directions=8):
    """Check every differentiable argument of ``case``; return a list of GradcheckRow
    (the checked arguments in the backward's order, then one row per skipped argument).

    Raises AssertionError if a differentiable argument has neither a gradient nor a
    skip reason, or a skipped or unknown argument has a gradient."""
    inputs = tree_map(_copy_leaf, case.inputs)
    _set_writeable(inputs, False)
    out, cache = case.forward(inputs)
    out = np.asarray(out, dtype=np.float64)
    dout = rng.standard_normal(out.shape)
    dout.flags.writeable = False
    if out.ndim == 0:
        dout = float(dout)
    abs_floor = roundoff_floor(float(np.sum(np.abs(out * dout))), case.h, case.tol)
    grads = flatten(case.backward(dout, cache))
    _set_writeable(inputs, True)
    leaves = flatten(inputs)
    _check_accounted(case, leaves, grads)

    def loss():
        value, _ = case.forward(inputs)
        return float(np.sum(np.asarray(value, dtype=np.float64) * dout))

    rows = []
    for path, grad in grads.items():
        leaf = leaves[path]
        buf = _buffer(leaf)
        if buf.dtype != np.float64:
            raise ValueError(f"{case.op}: gradcheck needs float64 inputs, {path} is {buf.dtype}")
        analytic = _analytic_values(case.op, path, leaf, grad)
        size = buf.size
        idx = np.arange(size) if size <= max_full else rng.choice(size, n_sample, replace=False)
        numeric = np.empty(len(idx))
        for j, i in enumerate(idx):
            orig = buf[i]
            buf[i] = orig + case.h
            up = loss()
            buf[i] = orig - case.h
            down = loss()
            buf[i] = orig
            numeric[j] = (up - down) / (2 * case.h)
        err = rel_errors(analytic[idx], numeric, abs_floor) if size else np.zeros(0)
        worst_j = int(np.argmax(err)) if size else 0
        max_err = float(err[worst_j]) if size else 0.0
        worst = ((_index_of(leaf, int(idx[worst_j])), float(analytic[idx[worst_j]]),
                  float(numeric[worst_j])) if size else ((), 0.0, 0.0))
        checked = len(idx)
        if size > max_full:
            orig = buf.copy()
            for _ in range(n_directions):
                v = rng.standard_normal(size)
                buf[:] = orig + case.h * v
                up = loss()
                buf[:] = orig - case.h * v
                down = loss()
                buf[:] = orig
                a_dir = float(analytic @ v)
                n_dir = (up - down) / (2 * case.h)
                scale = max(1e-300, abs_floor,
                            1e-2 * float(np.linalg.norm(analytic) * np.linalg.norm(v)))
                e = abs(a_dir - n_dir) / max(abs(a_dir) + abs(n_dir), scale)
                if e > max_err:
                    max_err, worst = e, ("direction", a_dir, n_dir)
                checked += 1
        shape = leaf.shape
        rows.append(GradcheckRow(op=case.op, argument=path, shape=shape, max_rel_error=max_err,
                                 checked=checked, passed=bool(max_err <= case.tol), worst=worst))
    for path, reason in case.skip.items():
        rows.append(GradcheckRow(op=case.op, argument=path, shape=leaves[path].shape,
                                 max_rel_error=0.0, checked=0, passed=True,
                                 worst=((), 0.0, 0.0), skipped=reason))
    return rows


def assert_gradients(case, rng, **kwargs):
    """Run :func:`check_case` and raise AssertionError naming op, argument, index, values."""
    rows = check_case(case, rng, **kwargs)
    failed = [r for r in rows if not r.passed]
    if failed:
        lines = [f"gradcheck failed for op {r.op!r}, argument {r.argument!r} at index "
                 f"{r.worst[0]}: analytic={r.worst[1]:.10g}, numeric={r.worst[2]:.10g}, "
                 f"error={r.max_rel_error:.3g} > tol={case.tol:g}" for r in failed]
        raise AssertionError("\n".join(lines))
    if not any(not r.skipped for r in rows):
        raise AssertionError(f"{case.op}: backward returned no gradients to check")
    return rows
