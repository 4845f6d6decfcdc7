"""Magnitude pruning (minivlmoe/compress/prune.py): counts, magnitudes, canonical CSR,
row groups, the identity at density 1, moments, the cubic schedule."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlmoe import model, optim
from minivlmoe.compress import prune
from minivlmoe.ops import sparse_linear
from minivlmoe.tree import flatten


def _distinct_weight(seed, d_out, d_in, density=1.0, group=16):
    """A weight whose |values| are all distinct (so "the largest" is unique), by
    construction: a random permutation of distinct magnitudes with random signs."""
    rng = np.random.default_rng(seed)
    W = sparse_linear.init(rng, d_in, d_out, density, dtype=np.float64, group=group)["W"]
    mags = (rng.permutation(W.nnz) + 1.0) / W.nnz
    W.data[:] = mags * rng.choice([-1.0, 1.0], W.nnz)
    return W


def _naive_unstructured(W, z):
    """Per row, a loop: repeatedly take the stored column of largest |w| not yet taken."""
    dense, keep = W.toarray(), []
    for o in range(W.shape[0]):
        stored = list(W.indices[W.indptr[o]:W.indptr[o + 1]])
        chosen = []
        for _ in range(z):
            best = max((c for c in stored if c not in chosen), key=lambda c: abs(dense[o, c]))
            chosen.append(best)
        keep.append(sorted(chosen))
    return keep


def _naive_groups(W, z, r):
    """Per group of r rows, the z columns of largest sum of |w| over the group's rows."""
    dense, keep = np.abs(W.toarray()), []
    for g in range(W.shape[0] // r):
        scores = [sum(dense[g * r + j, c] for j in range(r)) for c in range(W.shape[1])]
        order = sorted(range(W.shape[1]), key=lambda c: (-scores[c], c))
        keep.append(sorted(order[:z]))
    return keep


def _rows(W):
    return [list(W.indices[W.indptr[o]:W.indptr[o + 1]]) for o in range(W.shape[0])]


def _canonical(W):
    assert isinstance(W, sp.csr_array)
    assert W.indices.dtype == np.int32 and W.indptr.dtype == np.int32
    for row in _rows(W):
        assert row == sorted(set(row))
    assert W.has_canonical_format


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), d_in=st.integers(1, 40), d_out=st.integers(1, 12),
       density=st.floats(0.01, 1.0))
def test_unstructured_keeps_the_largest_exactly_z_per_row(seed, d_in, d_out, density):
    W = _distinct_weight(seed, d_out, d_in)
    P = prune.prune_weight(W, density, "unstructured")
    z = prune.row_count(density, d_in)
    if density == 1.0:
        assert P is W
        return
    assert np.all(np.diff(P.indptr) == z)
    _canonical(P)
    assert _rows(P) == _naive_unstructured(W, z)
    np.testing.assert_array_equal(P.toarray()[P.toarray() != 0],
                                  W.toarray()[P.toarray() != 0])   # the kept values unchanged


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), d_in=st.integers(2, 40), groups=st.integers(1, 4),
       r=st.sampled_from([1, 2, 4, 8]), density=st.floats(0.02, 0.99))
def test_row_group_keeps_whole_column_groups_of_largest_score(seed, d_in, groups, r, density):
    d_out = groups * r
    W = _distinct_weight(seed, d_out, d_in)
    P = prune.prune_weight(W, density, "row-group", group=r)
    z = prune.row_count(density, d_in)
    _canonical(P)
    assert np.all(np.diff(P.indptr) == z)
    expected = _naive_groups(W, z, r)
    assert _rows(P) == [cols for cols in expected for _ in range(r)]
    if r > 1 and z < d_in:
        got = sparse_linear.row_groups(P)
        if len({tuple(c) for c in expected}) == groups:
            assert got == (r, z)
        else:                                   # neighbouring groups that chose alike
            assert got is None or (got[0] % r == 0 and got[1] == z)


def test_row_group_from_a_grouped_sparse_parent_stays_inside_its_pattern():
    W = _distinct_weight(3, 16, 64, density=0.5, group=16)
    P = prune.prune_weight(W, 0.1, "row-group")
    assert sparse_linear.row_groups(P) == (16, 6)
    assert set(P.indices) <= set(W.indices)


def test_density_one_is_the_identity_and_above_the_stored_density_is_refused():
    params = model.init(np.random.default_rng(0), _cfg())
    same, names = prune.prune_params(params, 1.0)
    for path, leaf in flatten(params).items():
        assert flatten(same)[path] is leaf
    assert names and not any(n.endswith("router.W") for n in names)
    W = _distinct_weight(0, 4, 20, density=0.25)
    assert prune.prune_weight(W, 1.0) is W
    with pytest.raises(ValueError, match="density must keep at most the 5 entries"):
        prune.prune_weight(W, 0.5)
    with pytest.raises(ValueError, match="density"):
        prune.prune_weight(W, 0.0)
    with pytest.raises(ValueError, match="structure"):
        prune.prune_weight(W, 0.1, "blocks")


def _cfg():
    from minivlmoe.runs import preset_configs
    return preset_configs("tiny")[0]


@pytest.mark.parametrize("keep_ends", [True, False])
def test_prune_params_prunes_the_block_weights_and_the_ends_unless_kept(keep_ends):
    params = model.init(np.random.default_rng(1), _cfg())
    pruned, names = prune.prune_params(params, 0.25, keep_ends=keep_ends)
    flat, new = flatten(params), flatten(pruned)
    ends = ("patch.proj.W", "img_proj.W", "txt_proj.W", "lm_head.W")
    for path, leaf in flat.items():
        sparse = isinstance(leaf, sp.csr_array)
        if sparse and "router" not in path and not (keep_ends and path.endswith(ends)):
            assert path in names
            assert np.all(np.diff(new[path].indptr) == prune.row_count(0.25, leaf.shape[1]))
        else:
            assert new[path] is leaf and path not in names
    assert any(".attn.q.W" in n for n in names) and any(".fc1.W" in n for n in names)
    assert any("lm_head" in n for n in names) != keep_ends


def test_remap_moments_against_a_loop():
    params = model.init(np.random.default_rng(2), _cfg())
    state = optim.init_state(params)
    rng = np.random.default_rng(3)
    for part in ("m", "v"):
        for leaf in flatten(state[part]).values():
            leaf[...] = rng.random(leaf.shape)
    pruned, names = prune.prune_params(params, 0.3)
    moved = prune.remap_moments(state, params, pruned)
    assert moved["step"] == state["step"]
    for part in ("m", "v"):
        old_flat, new_flat = flatten(state[part]), flatten(moved[part])
        for path in names:
            W, P = flatten(params)[path], flatten(pruned)[path]
            expected = []
            for o in range(P.shape[0]):
                for c in P.indices[P.indptr[o]:P.indptr[o + 1]]:
                    row = list(W.indices[W.indptr[o]:W.indptr[o + 1]])
                    expected.append(old_flat[path][W.indptr[o] + row.index(c)])
            np.testing.assert_array_equal(new_flat[path], expected)
    optim.step(pruned, _grads_like(pruned), moved, optim.AdamWConfig(lr=1e-3, warmup_steps=0, total_steps=1))


def _grads_like(params):
    from minivlmoe.tree import zeros_like
    return zeros_like(params)


def test_cubic_schedule():
    assert prune.cubic_density(0, 100, 0.1) == 1.0
    assert prune.cubic_density(75, 100, 0.1) == 0.1 == prune.cubic_density(99, 100, 0.1)
    ds = [prune.cubic_density(t, 100, 0.1) for t in range(0, 80)]
    assert all(a > b for a, b in zip(ds[:75], ds[1:76]))          # strictly decreasing
    assert prune.cubic_density(25, 100, 0.1) == pytest.approx(0.1 + 0.9 * (2 / 3) ** 3)
    plan = prune.prune_schedule(100, 0.1, "gradual", 10)
    assert [t for t, _ in plan] == [10, 20, 30, 40, 50, 60, 70, 75] and plan[-1][1] == 0.1
    assert prune.prune_schedule(100, 0.1, "oneshot") == [(0, 0.1)]
    assert prune.prune_schedule(1, 0.1, "gradual") == [(0, 0.1)]   # no room to ramp
    assert prune.prune_schedule(100, 0.1, "gradual", 10, initial=0.5)[0][1] < 0.5
