"""Sparse linear layer: gradients, the naive definition, the fixed pattern, bad input."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import sparse_linear
from minivlmoe.gradcheck import GradcheckCase, assert_gradients

DENSITIES = st.sampled_from([0.01, 0.05, 0.2, 0.5, 1.0])
GROUPS = st.sampled_from([1, 2, 4, 16])


def make(seed, d_in, d_out, density, lead, dtype=np.float64, group=16):
    rng = np.random.default_rng(seed)
    params = sparse_linear.init(rng, d_in, d_out, density, dtype=dtype, group=group)
    params["b"] = rng.standard_normal(d_out).astype(dtype)
    x = rng.standard_normal((*lead, d_in)).astype(dtype)
    return rng, params, x


def naive_forward(x, W, b):
    """y[n, o] = sum over stored (o, i) of W[o, i] x[n, i] + b[o], one stored entry at a time."""
    x2 = x.reshape(-1, W.shape[1])
    y = np.tile(b, (x2.shape[0], 1)).astype(np.float64)
    coo = W.tocoo()
    for o, i, w in zip(coo.row, coo.col, coo.data):
        for n in range(x2.shape[0]):
            y[n, o] += w * x2[n, i]
    return y.reshape(*x.shape[:-1], W.shape[0])


def naive_weight_grad(x, dy, W):
    x2, dy2 = x.reshape(-1, W.shape[1]), dy.reshape(-1, W.shape[0])
    coo = W.tocoo()
    return np.array([sum(dy2[n, o] * x2[n, i] for n in range(x2.shape[0]))
                     for o, i in zip(coo.row, coo.col)])


@given(seed=st.integers(0, 2**32 - 1), d_in=st.integers(1, 70), d_out=st.integers(1, 9),
       density=DENSITIES, lead=st.sampled_from([(3,), (2, 3), (1,)]), group=GROUPS)
def test_gradients(seed, d_in, d_out, density, lead, group):
    rng, params, x = make(seed, d_in, d_out, density, lead, group=group)
    case = GradcheckCase("sparse_linear", {"x": x, "params": params},
                         lambda a: sparse_linear.forward(a["x"], a["params"]),
                         lambda dout, c: dict(zip(("x", "params"),
                                                  sparse_linear.backward(dout, c))))
    assert_gradients(case, rng)


@given(seed=st.integers(0, 2**32 - 1), d_in=st.integers(1, 60), d_out=st.integers(1, 8),
       density=DENSITIES, n=st.integers(1, 6), group=GROUPS)
def test_forward_and_weight_grad_match_naive_definition(seed, d_in, d_out, density, n, group):
    rng, params, x = make(seed, d_in, d_out, density, (n,), group=group)
    y, cache = sparse_linear.forward(x, params)
    np.testing.assert_allclose(y, naive_forward(x, params["W"], params["b"]), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, grads = sparse_linear.backward(dy, cache)
    np.testing.assert_allclose(grads["W"].data, naive_weight_grad(x, dy, params["W"]),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dy @ params["W"].toarray(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["b"], dy.sum(0), rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), d_in=st.integers(1, 80), d_out=st.integers(1, 30),
       density=st.floats(1e-3, 1.0), group=GROUPS)
def test_pattern_is_fixed_and_gradient_has_it_exactly(seed, d_in, d_out, density, group):
    rng, params, x = make(seed, d_in, d_out, density, (4,), group=group)
    W = params["W"]
    k = max(1, round(density * d_in))
    assert np.all(np.diff(W.indptr) == k), "every output row stores the same fan-in k"
    r = np.gcd(d_out, group)
    idx = W.indices.reshape(d_out // r, r, k)
    assert np.all(idx == idx[:, :1]), "rows of one group share their columns"
    assert W.has_canonical_format
    for o in range(d_out):
        cols = W.indices[W.indptr[o]:W.indptr[o + 1]]
        assert np.all(np.diff(cols) > 0), "sorted, distinct columns"
    y, cache = sparse_linear.forward(x, params)
    _, grads = sparse_linear.backward(np.ones_like(y), cache)
    dW = grads["W"]
    assert isinstance(dW, sp.csr_array)
    assert dW.indices.tobytes() == W.indices.tobytes()
    assert dW.indptr.tobytes() == W.indptr.tobytes()


@pytest.mark.parametrize("density,group,d_out", [(0.01, 1, 33), (0.05, 1, 33), (0.05, 16, 32),
                                                 (0.01, 4, 36), (0.5, 16, 32), (1.0, 1, 33)])
def test_every_kernel_path_agrees_with_dense(density, group, d_out):
    rng, params, x = make(7, 128, d_out, density, (40,), group=group)
    Wd = params["W"].toarray()
    y, cache = sparse_linear.forward(x, params)
    np.testing.assert_allclose(y, x @ Wd.T + params["b"], rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, grads = sparse_linear.backward(dy, cache)
    np.testing.assert_allclose(dx, dy @ Wd, rtol=1e-12, atol=1e-12)
    full = dy.T @ x
    coo = params["W"].tocoo()
    np.testing.assert_allclose(grads["W"].tocoo().data, full[coo.row, coo.col], rtol=1e-12, atol=1e-12)


def hand_built(rng, rows, d_in, dtype=np.float64):
    """A csr_array from (data, indices, indptr) with the given stored columns per row
    (an empty list is an empty row); values random, explicit zeros allowed."""
    counts = [len(c) for c in rows]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = np.concatenate([np.asarray(c, dtype=np.int32) for c in rows])
    data = rng.standard_normal(len(indices)).astype(dtype)
    return sp.csr_array((data, indices, indptr), shape=(len(rows), d_in))


FULL = list(range(6))
HAND_BUILT = {
    # stored density >= DENSE_ABOVE at Din = 6 (expanded dense path), CSR kernels once
    # Din is padded to 96; empty rows, full rows and ragged rows
    "dense-empty-rows": [FULL, [], FULL, [0, 2, 5], FULL, []],
    "dense-empty-first-and-last": [[], FULL, FULL, FULL, FULL, [1, 3]],
    "dense-one-empty-row": [FULL, [], FULL, FULL],               # nnz = (Dout - 1) Din
    # every entry stored (the zero-copy full path; padded: the grouped path), some
    # stored values zero
    "full": [FULL] * 5,
    # low density, empty and ragged rows: no row groups (per-entry gather when padded)
    "sparse-empty-rows": [[], [4], [], [0, 5], [], [], [], [2]],
}


@pytest.mark.parametrize("name", list(HAND_BUILT))
@pytest.mark.parametrize("d_in_pad", [0, 90])
def test_hand_built_weights_agree_with_dense(name, d_in_pad):
    """Weights not made by init: empty rows, unequal rows, explicit zeros.  Forward and
    backward equal the dense products, whichever kernel the stored density selects."""
    rng = np.random.default_rng(len(name) + d_in_pad)
    d_in = 6 + d_in_pad                                          # padding lowers the density
    W = hand_built(rng, HAND_BUILT[name], d_in)
    if name == "full" and d_in_pad == 0:
        W.data[[3, 7]] = 0.0                                     # stored zeros stay stored
    d_out = W.shape[0]
    params = {"W": W, "b": rng.standard_normal(d_out)}
    x = rng.standard_normal((2, 7, d_in))
    Wd = W.toarray()
    y, cache = sparse_linear.forward(x, params)
    np.testing.assert_allclose(y, x @ Wd.T + params["b"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, naive_forward(x, W, params["b"]), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, grads = sparse_linear.backward(dy, cache)
    np.testing.assert_allclose(dx, dy @ Wd, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["b"], dy.reshape(-1, d_out).sum(axis=0), rtol=1e-12)
    assert grads["W"].indptr.tobytes() == W.indptr.tobytes()
    assert grads["W"].indices.tobytes() == W.indices.tobytes()
    np.testing.assert_allclose(grads["W"].data, naive_weight_grad(x, dy, W), rtol=1e-12,
                               atol=1e-12)


def test_init_scale_uses_stored_fan_in():
    params = sparse_linear.init(np.random.default_rng(0), 400, 300, 0.1, dtype=np.float64)
    k = 40
    assert abs(params["W"].data.std() * np.sqrt(k) - 1.0) < 0.03


def test_feature_major_matches_transpose_for_every_layout():
    a = np.random.default_rng(1).standard_normal((200, 7))
    for arr in (a, np.asfortranarray(a), a[::2], a.T.copy().T):
        out = sparse_linear.feature_major(arr)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out, arr.T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_inputs_untouched(dtype):
    rng, params, x = make(3, 16, 5, 0.5, (2, 6), dtype=dtype)
    x.flags.writeable = False
    y, cache = sparse_linear.forward(x, params)
    assert y.dtype == dtype and y.shape == (2, 6, 5)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dy.flags.writeable = False
    dx, grads = sparse_linear.backward(dy, cache)
    assert dx.dtype == dtype and grads["W"].dtype == dtype and grads["b"].dtype == dtype
    assert dx.shape == x.shape


def test_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"density must be in \(0\.0, 1\.0\], got 0\.0"):
        sparse_linear.init(rng, 4, 4, 0.0)
    with pytest.raises(ValueError, match=r"density must be in \(0\.0, 1\.0\], got 1\.5"):
        sparse_linear.init(rng, 4, 4, 1.5)
    with pytest.raises(ValueError, match="d_in must be in"):
        sparse_linear.init(rng, 0, 4)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        sparse_linear.init(0, 4, 4)
    params = sparse_linear.init(rng, 4, 3, dtype=np.float64)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., Din=4\), got \(2, 5\)"):
        sparse_linear.forward(np.zeros((2, 5)), params)
    with pytest.raises(ValueError, match="x must be finite"):
        sparse_linear.forward(np.array([[np.nan, 0, 0, 0]]), params)
    with pytest.raises(TypeError, match="x must have the dtype of params"):
        sparse_linear.forward(np.zeros((2, 4), np.float32), params)
    with pytest.raises(TypeError, match=r"params\['W'\] must be a scipy.sparse.csr_array"):
        sparse_linear.forward(np.zeros((2, 4)), {"W": np.zeros((3, 4)), "b": np.zeros(3)})


def test_row_groups_detects_only_true_groups():
    rng = np.random.default_rng(0)
    W = sparse_linear.init(rng, 50, 32, 0.1, group=8)["W"]
    assert sparse_linear.row_groups(W) == (8, 5)
    assert sparse_linear.row_groups(sparse_linear.init(rng, 50, 32, 0.1, group=1)["W"]) is None
    W2 = W.copy()
    W2.indices[5 * 3] = (W2.indices[5 * 3] + 1) % 50 if W2.indices[5 * 3] + 1 not in W2.indices[15:20] else W2.indices[5 * 3]
    ragged = sp.csr_array(np.triu(np.ones((4, 4))))
    assert sparse_linear.row_groups(ragged) is None


@pytest.mark.parametrize("kind, d_in, d_out, density, group", [
    ("dense", 64, 8, 1.0, 16),          # the full pattern: W.data is W
    ("dense", 64, 64, 0.25, 1),         # unstructured, every column used: expanded W
    ("compact", 64, 64, 0.05, 16),      # 4 row groups x 3 columns: 12 of 64 columns
    ("compact", 128, 64, 0.05, 16),     # 4 groups x 6 columns: 24 of 128
    ("dense", 64, 64, 0.25, 16),        # 4 groups x 16 columns: about 50 of 64 used
    ("csr", 64, 512, 0.05, 16),         # 32 groups cover most columns: the grouped CSR path
    ("csr", 64, 64, 0.05, 1),           # unstructured: the per-entry CSR path
])
def test_every_kernel_matches_the_naive_definition(kind, d_in, d_out, density, group):
    """Each path of sparse_linear.kernel, chosen on purpose, against the naive loops."""
    rng, params, x = make(11, d_in, d_out, density, (5,), group=group)
    assert sparse_linear.kernel(params["W"])[0] == kind
    y, cache = sparse_linear.forward(x, params)
    np.testing.assert_allclose(y, naive_forward(x, params["W"], params["b"]), rtol=1e-12,
                               atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, grads = sparse_linear.backward(dy, cache)
    np.testing.assert_allclose(dx, dy @ params["W"].toarray(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["W"].data, naive_weight_grad(x, dy, params["W"]),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["b"], dy.sum(axis=0), rtol=1e-12, atol=1e-12)
    assert grads["W"].indices is params["W"].indices                # the pattern, shared


def test_compact_path_uses_only_the_stored_columns():
    """On the compact path the product runs on the C used columns: the saved input is
    (N, C) and dx is exactly 0 on every column no row stores."""
    rng, params, x = make(3, 64, 64, 0.05, (7,), group=16)
    kind, cols = sparse_linear.kernel(params["W"])
    y, cache = sparse_linear.forward(x, params)
    assert kind == "compact" and cache.saved.shape == (7, cols.size) and cols.size <= 12
    dx, _ = sparse_linear.backward(np.ones_like(y), cache)
    unused = np.setdiff1d(np.arange(64), cols)
    assert unused.size and np.all(dx[:, unused] == 0.0)
    # a feature-major input (a transposed view, as a chain of sparse layers passes) keeps
    # the CSR kernels, and gives the same numbers
    x_fm = np.ascontiguousarray(x.T).T                           # (7, 64), x.T C-contiguous
    y_fm, cache_fm = sparse_linear.forward(x_fm, params)
    assert cache_fm.cols is None
    np.testing.assert_allclose(y_fm, y, rtol=1e-12, atol=1e-12)
