"""Magnitude pruning of sparse weights to new canonical CSR patterns.

What is pruned
--------------
Every ``"W"`` of a :mod:`minivlmoe.ops.sparse_linear` layer inside the transformer
blocks: attention q/k/v/o and the FFN and expert fc1/fc2 (:func:`prunable`).  These
are the matrix products that cost the FLOPs and the bytes (92% of the sparse weights of
the default preset).  What stays as it is:

* **the ends** (:data:`ENDS`: the patch projection, the image and text retrieval
  projections, the LM head), unless ``keep_ends=False``: the first layer sees every
  pixel and the last ones write every logit and embedding, so a pruned entry there
  removes information no later layer can recover (the usual choice since Han et al.
  2015 and Gale et al. 2019, "The State of Sparsity").  Measured on the default preset
  at density 0.1 (docs/compression.md): pruning them too loses 0.05-0.08 R@1 and 0.12
  caption exact match; kept, they are 8% of the parent's weights but 46% of what a model
  at density 0.1 stores;
* **routers** (``...router.W``, always): D x E numbers per pool, a rounding error of the
  model's size, and routing is discontinuous in them (a pruned logit flips the top-k
  choice of tokens near a tie, and with it the whole expert output);
* **biases, LayerNorm gains and shifts, the class token, the position tables, the token
  embedding and ``log_logit_scale``**: dense arrays.  A bias or a norm is O(D) numbers
  and O(D) work per token; an embedding is a table lookup (no product to save), and a
  zeroed entry of it would remove a feature of a token outright.

The rule (per weight, Z = ``max(1, round(density * Din))`` entries per row, the count
:func:`minivlmoe.ops.sparse_linear.init` uses)
---------------------------------------------------------------------------------------
* ``unstructured``: each row keeps its Z entries of largest ``|w|`` among those it
  stores (ties: the smaller column first);
* ``row-group``: rows come in groups of ``r = gcd(Dout, 16)`` consecutive rows (as in
  ``sparse_linear.init``); each group keeps the Z columns of largest group score
  ``sum_{rows o of the group} |W[o, i]|`` (a column a row does not store scores 0 for
  that row) and every row of the group stores exactly those columns, which is the
  structure :func:`minivlmoe.ops.sparse_linear.row_groups` detects and the grouped
  kernels exploit.

Z may not exceed the entries a row stores (pruning never adds entries); unstructured
pruning keeps a subset of the old pattern, row-group pruning too when the old pattern
already shares columns within each group (as ``init``'s does; otherwise a chosen column a
row did not store enters with the value 0).  Every pruned row has sorted unique indices
(canonical CSR), and density 1 returns the weight itself (:func:`prune_weight`).

Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune")
---------------------------------------------------------------
:func:`cubic_density` is the density at fine-tuning step t of n: ``d_t = D + (1 - D) (1
- t / n_p)^3`` for ``t < n_p``, then D, with the pruning ending at ``n_p`` (by default
3/4 of the fine-tuning steps, so the final pattern is fine-tuned too); the pattern is
recomputed every ``interval`` steps (:func:`prune_schedule`) and is fixed in between.

Optimizer moments
-----------------
:func:`remap_moments` gathers the AdamW moments of the kept entries onto the new pattern
(entries that are new get zero moments): at a gradual step the optimizer continues, and
for the kept entries that is exactly the state they would have had.  At the start of a
fine-tuning the moments are *reset* instead (:mod:`minivlmoe.compress.finetune`): the
fine-tuning is a new AdamW run with its own step count, warmup and schedule, and the
parent's moments with a restarted bias correction (``m / (1 - b1^t)`` at t = 1 divides by
0.1) would make the first update ten times too large.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import scipy.sparse as sp

from .._checks import check_choice, check_float, check_int
from ..tree import csr_on_pattern, flatten, unflatten

STRUCTURES = ("unstructured", "row-group")
SCHEDULES = ("oneshot", "gradual")
GROUP = 16            # rows per group at most, as sparse_linear.init's default
ROUTERS = ("router.W",)          # sparse weights never pruned (module docstring says why)
ENDS = ("patch.proj.W", "img_proj.W", "txt_proj.W", "lm_head.W")   # kept unless asked


def row_count(density, d_in):
    """Stored entries per row at ``density``: ``max(1, round(density * Din))``."""
    return max(1, int(round(density * d_in)))


def _dense_abs(W):
    """|W| as a dense (Dout, Din) array; entries not stored are 0."""
    return np.abs(W.toarray())                                   # (Dout, Din)


def _pattern_mask(W):
    """(Dout, Din) bool: True where W stores an entry."""
    mask = np.zeros(W.shape, dtype=bool)                         # (Dout, Din)
    rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))   # (nnz,)
    mask[rows, W.indices] = True
    return mask


def _top_columns(scores, stored, z):
    """Per row of ``scores`` (G, Din) (one group per row when unstructured: G = Dout), the
    z columns of largest score, stored columns before unstored ones, ties to the smaller
    column; sorted ascending.  (G, Z) int."""
    key = np.where(stored, -scores, np.inf)                      # (G, Din) unstored last
    idx = np.argsort(key, axis=1, kind="stable")[:, :z]          # (G, Z) stable: ties by column
    return np.sort(idx, axis=1)                                  # (G, Z)


def prune_weight(W, density, structure="unstructured", group=GROUP):
    """The magnitude-pruned copy of one sparse weight.

    Parameters
    ----------
    W : csr_array (Dout, Din), canonical.
    density : float in (0, 1]; every row keeps ``row_count(density, Din)`` entries.
    structure : "unstructured" or "row-group" (module docstring).
    group : int >= 1, rows per group at most for "row-group" (``gcd(Dout, group)``).

    Returns
    -------
    csr_array (Dout, Din) with int32 sorted indices, the kept values of ``W`` (0 for a
    kept column ``W`` did not store).  Density 1 returns ``W`` itself.
    """
    if not isinstance(W, sp.csr_array):
        raise TypeError(f"W must be a scipy.sparse.csr_array, got {type(W).__name__}")
    density = check_float("density", density, 0.0, 1.0, low_open=True)
    structure = check_choice("structure", structure, STRUCTURES)
    group = check_int("group", group, 1)
    d_out, d_in = W.shape
    if density == 1.0:
        return W                                                 # the identity
    z = row_count(density, d_in)
    fewest = int(np.diff(W.indptr).min()) if d_out else 0
    if z > fewest:
        raise ValueError(f"density must keep at most the {fewest} entries the sparsest row "
                         f"of W stores (density <= {fewest / d_in:.4g}), got {density} "
                         f"({z} per row)")
    absw = _dense_abs(W)                                         # (Dout, Din)
    stored = _pattern_mask(W)                                    # (Dout, Din)
    if structure == "unstructured":
        cols = _top_columns(absw, stored, z)                     # (Dout, Z)
    else:
        r = math.gcd(d_out, group)                               # rows per group
        score = absw.reshape(d_out // r, r, d_in).sum(axis=1)    # (G, Din)
        any_stored = stored.reshape(d_out // r, r, d_in).any(axis=1)  # (G, Din)
        cols = np.repeat(_top_columns(score, any_stored, z), r, axis=0)  # (Dout, Z)
    rows = np.repeat(np.arange(d_out), z)                        # (Dout*Z,)
    flat_cols = cols.reshape(-1)                                 # (Dout*Z,)
    dense = W.toarray()                                          # (Dout, Din)
    data = dense[rows, flat_cols].astype(W.dtype, copy=False)    # (Dout*Z,)
    indptr = np.arange(0, d_out * z + 1, z, dtype=np.int32)      # (Dout+1,)
    return csr_on_pattern(data, flat_cols.astype(np.int32), indptr, (d_out, d_in))


def prunable(path, leaf, keep_ends=True):
    """True for the sparse weights :func:`prune_params` prunes: not a router's, and not
    one of the :data:`ENDS` when ``keep_ends``."""
    kept = ROUTERS + ENDS if keep_ends else ROUTERS
    return isinstance(leaf, sp.csr_array) and not path.endswith(kept)


def prune_params(params, density, structure="unstructured", group=GROUP, keep_ends=True):
    """A new parameter tree with every :func:`prunable` weight pruned; every other leaf
    is shared with ``params``.  Returns ``(new_params, names)``, names the pruned paths."""
    flat = flatten(params)
    out, names = {}, []
    for path, leaf in flat.items():
        if prunable(path, leaf, keep_ends):
            out[path] = prune_weight(leaf, density, structure, group)
            names.append(path)
        else:
            out[path] = leaf
    return unflatten(out), names


def remap_moments(state, old_params, new_params):
    """AdamW state on ``new_params``' patterns (a new dict).

    A sparse weight's moments are (nnz,) arrays aligned with its ``data``
    (:func:`minivlmoe.optim.init_state`); each entry kept by the new pattern gets the
    moment of the same (row, column) of the old one, an entry the old pattern did not
    store gets 0.  Dense leaves and the step are carried over unchanged.
    """
    old_flat, new_flat = flatten(old_params), flatten(new_params)
    out = {k: v for k, v in state.items() if k not in ("m", "v")}
    for part in ("m", "v"):
        moved = {}
        for path, moment in flatten(state[part]).items():
            old_w, new_w = old_flat[path], new_flat[path]
            if isinstance(old_w, sp.csr_array) and new_w is not old_w:
                where = _positions(old_w, new_w)                 # (nnz,) of new_w, -1 if new
                moved[path] = np.where(where >= 0, moment[where], 0).astype(moment.dtype)
            else:
                moved[path] = moment
        out[part] = unflatten(moved)
    return out


def _positions(old_w, new_w):
    """For each stored entry of ``new_w``, its index in ``old_w.data`` or -1."""
    pos = np.full(old_w.shape, -1, dtype=np.int64)               # (Dout, Din)
    old_rows = np.repeat(np.arange(old_w.shape[0]), np.diff(old_w.indptr))  # (nnz,) of old_w
    pos[old_rows, old_w.indices] = np.arange(old_w.nnz)
    new_rows = np.repeat(np.arange(new_w.shape[0]), np.diff(new_w.indptr))  # (nnz,) of new_w
    return pos[new_rows, new_w.indices]


def cubic_density(t, steps, final_density, end=None, initial=1.0):
    """Zhu & Gupta's density at step ``t`` of ``steps``: from ``initial`` at t = 0 to
    ``final_density`` at ``end`` (default ``3 * steps // 4``, at least 1), cubic."""
    end = max(1, 3 * steps // 4) if end is None else end
    if t >= end:
        return float(final_density)
    return float(final_density + (initial - final_density) * (1.0 - t / end) ** 3)


def prune_schedule(steps, final_density, schedule="oneshot", interval=None, initial=1.0):
    """The prunings of a fine-tuning of ``steps`` steps: a list of (step, density).

    ``oneshot``: [(0, D)].  ``gradual``: a pruning at every multiple of ``interval``
    (default ``max(1, steps // 10)``) before the end of the cubic ramp
    (:func:`cubic_density`, ``3 * steps // 4``) at that step's density, and the pruning
    to D at the end of the ramp; the steps after it fine-tune the final pattern.
    """
    steps = check_int("steps", steps, 1)
    final_density = check_float("final_density", final_density, 0.0, 1.0, low_open=True)
    schedule = check_choice("schedule", schedule, SCHEDULES)
    interval = max(1, steps // 10) if interval is None else check_int("interval", interval, 1)
    end = 3 * steps // 4
    if schedule == "oneshot" or end < 1 or final_density >= initial:
        return [(0, final_density)]             # too short to ramp: one pruning at 0
    # t = 0 would prune to ``initial``: the identity, so the first pruning is at interval
    points = [(t, cubic_density(t, steps, final_density, end, initial))
              for t in range(interval, end, interval)]
    return points + [(end, float(final_density))]


def pattern_digest(params):
    """sha256 over the (path, shape, indices, indptr) of every sparse leaf: the pattern
    a run's config records and loading checks."""
    h = hashlib.sha256()
    for path, leaf in flatten(params).items():
        if isinstance(leaf, sp.csr_array):
            h.update(f"{path}:{leaf.shape}".encode())
            h.update(np.ascontiguousarray(leaf.indices, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(leaf.indptr, dtype=np.int64).tobytes())
    return h.hexdigest()


def stored_parameters(params):
    """Numbers a checkpoint stores for ``params``: nnz of each sparse leaf plus the size
    of each dense leaf (the parameter count the curve matches low rank to)."""
    return int(sum(leaf.nnz if isinstance(leaf, sp.csr_array) else np.size(leaf)
                   for leaf in flatten(params).values()))
