"""Tests for minivlmoe.ops.patch_embed: patch extraction, the embedding forward and backward."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe.ops import patch_embed
from minivlmoe.gradcheck import GradcheckCase, assert_gradients

from conftest import readonly


# ---------------------------------------------------------------- naive references

def naive_extract_patches(images, patch):
    """One patch at a time: rows i*patch.., columns j*patch.., flattened (p1, p2, c)."""
    B, R, _, Ch = images.shape
    g = R // patch
    out = np.zeros((B, g * g, patch * patch * Ch), dtype=images.dtype)
    for b in range(B):
        for i in range(g):
            for j in range(g):
                block = images[b, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch, :]
                out[b, i * g + j] = block.reshape(-1)
    return out


def naive_forward(images, params, patch):
    """Per image and per patch: class token, then W @ patch + b, plus positions."""
    W = params["proj"]["W"].toarray()
    bias, cls, pos = params["proj"]["b"], params["cls"], params["pos"]
    patches = naive_extract_patches(images, patch)
    B, P, _ = patches.shape
    out = np.zeros((B, 1 + P, W.shape[0]))
    for b in range(B):
        out[b, 0] = cls + pos[0]
        for n in range(P):
            out[b, 1 + n] = W @ patches[b, n] + bias + pos[1 + n]
    return out


# The output is linear in each argument taken alone, so a centered difference is exact
# up to round-off (about eps * |L| / h): a large step only makes it more accurate.
H_STEP = 1e-3


# ---------------------------------------------------------------- strategies

@st.composite
def configs(draw):
    """(B, grid side, patch, Ch, D, density, seed), valid by construction: R = grid * patch."""
    return dict(
        B=draw(st.integers(1, 2)),
        g=draw(st.integers(1, 3)),
        patch=draw(st.integers(1, 3)),
        Ch=draw(st.integers(1, 3)),
        d=draw(st.integers(1, 5)),
        density=draw(st.sampled_from([1.0, 0.5, 0.2])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_case(cfg, dtype=np.float64):
    rng = np.random.default_rng(cfg["seed"])
    R = cfg["g"] * cfg["patch"]
    params = patch_embed.init(rng, R, cfg["patch"], cfg["Ch"], cfg["d"], cfg["density"], dtype)
    params["proj"]["b"] = rng.standard_normal(cfg["d"]).astype(dtype)
    images = rng.standard_normal((cfg["B"], R, R, cfg["Ch"])).astype(dtype)
    return rng, images, params


# ---------------------------------------------------------------- patch extraction

@given(cfg=configs())
def test_extract_patches_matches_naive_loop(cfg):
    _, images, _ = make_case(cfg)
    got = patch_embed.extract_patches(images, cfg["patch"])
    np.testing.assert_array_equal(got, naive_extract_patches(images, cfg["patch"]))


@given(cfg=configs())
def test_extract_and_merge_are_inverses(cfg):
    rng, images, _ = make_case(cfg)
    p = cfg["patch"]
    patches = patch_embed.extract_patches(images, p)
    np.testing.assert_array_equal(patch_embed.merge_patches(patches, p), images)
    other = rng.standard_normal(patches.shape)
    np.testing.assert_array_equal(
        patch_embed.extract_patches(patch_embed.merge_patches(other, p), p), other)


def test_extract_patches_order_on_a_labelled_image():
    # pixel value = 10 * row + column: the first patch of a 4x4 image cut into 2x2 is the
    # top-left block, read row by row; the second is the top-right block.
    images = (10 * np.arange(4)[:, None] + np.arange(4)[None, :]).reshape(1, 4, 4, 1)
    patches = patch_embed.extract_patches(images, 2)
    assert patches.shape == (1, 4, 4)
    np.testing.assert_array_equal(patches[0, 0], [0, 1, 10, 11])
    np.testing.assert_array_equal(patches[0, 1], [2, 3, 12, 13])
    np.testing.assert_array_equal(patches[0, 2], [20, 21, 30, 31])


# ---------------------------------------------------------------- forward

@given(cfg=configs())
def test_forward_matches_naive_loop(cfg):
    _, images, params = make_case(cfg)
    tokens, _ = patch_embed.forward(images, params, cfg["patch"])
    np.testing.assert_allclose(tokens, naive_forward(images, params, cfg["patch"]),
                               rtol=1e-12, atol=1e-12)


def test_init_shapes_and_dtype(rng):
    params = patch_embed.init(rng, image_size=8, patch=4, channels=3, d=6, density=0.5)
    assert params["proj"]["W"].shape == (6, 4 * 4 * 3)
    assert params["cls"].shape == (6,)
    assert params["pos"].shape == (1 + 4, 6)
    for leaf in (params["proj"]["W"], params["proj"]["b"], params["cls"], params["pos"]):
        assert leaf.dtype == np.float32
    assert 0 < np.abs(params["pos"]).max() < 0.2  # small, but not zero


def test_float32_in_float32_out(rng):
    cfg = dict(B=2, g=2, patch=2, Ch=3, d=4, density=0.5, seed=1)
    _, images, params = make_case(cfg, np.float32)
    tokens, cache = patch_embed.forward(images, params, 2)
    assert tokens.dtype == np.float32
    dimages, dparams = patch_embed.backward(np.ones_like(tokens), cache)
    assert dimages.dtype == np.float32
    assert dparams["proj"]["W"].dtype == np.float32
    assert dparams["cls"].dtype == np.float32 and dparams["pos"].dtype == np.float32


# ---------------------------------------------------------------- backward

@given(cfg=configs())
def test_gradients(cfg):
    rng, images, params = make_case(cfg)
    p = cfg["patch"]
    assert_gradients(GradcheckCase(
        "patch_embed", {"images": images, "params": params},
        lambda a: patch_embed.forward(a["images"], a["params"], p),
        lambda dout, cache: dict(zip(("images", "params"), patch_embed.backward(dout, cache))),
        h=H_STEP), rng)


def test_readonly_inputs_and_dtokens_untouched(rng):
    cfg = dict(B=2, g=2, patch=2, Ch=2, d=3, density=1.0, seed=2)
    _, images, params = make_case(cfg)
    readonly(images, params["cls"], params["pos"], params["proj"]["b"])
    tokens, cache = patch_embed.forward(images, params, 2)
    dtokens = readonly(rng.standard_normal(tokens.shape))
    before = dtokens.copy()
    patch_embed.backward(dtokens, cache)
    np.testing.assert_array_equal(dtokens, before)


def test_class_and_position_gradients_are_sums_over_batch(rng):
    cfg = dict(B=3, g=2, patch=1, Ch=1, d=2, density=1.0, seed=3)
    _, images, params = make_case(cfg)
    tokens, cache = patch_embed.forward(images, params, 1)
    dtokens = rng.standard_normal(tokens.shape)
    _, dparams = patch_embed.backward(dtokens, cache)
    np.testing.assert_allclose(dparams["cls"], dtokens[:, 0].sum(axis=0))
    np.testing.assert_allclose(dparams["pos"], dtokens.sum(axis=0))


# ---------------------------------------------------------------- bad input

def test_patch_must_divide_image(rng):
    images = np.zeros((1, 6, 6, 3))
    with pytest.raises(ValueError, match=r"patch must divide the image size R=6, got patch=4"):
        patch_embed.extract_patches(images, 4)
    with pytest.raises(ValueError, match=r"patch must divide .*R=10.*patch=3"):
        patch_embed.init(rng, 10, 3, 3, 4)
    params = patch_embed.init(rng, 6, 3, 3, 4, dtype=np.float64)
    with pytest.raises(ValueError, match=r"patch must divide .*R=6.*patch=4"):
        patch_embed.forward(images, params, 4)


def test_bad_images(rng):
    params = patch_embed.init(rng, 4, 2, 3, 5, dtype=np.float64)
    with pytest.raises(ValueError, match=r"images must have 4 dimensions .*got shape \(4, 4, 3\)"):
        patch_embed.forward(np.zeros((4, 4, 3)), params, 2)
    with pytest.raises(ValueError, match=r"images must be square .*got shape \(1, 4, 6, 3\)"):
        patch_embed.extract_patches(np.zeros((1, 4, 6, 3)), 2)
    with pytest.raises(ValueError, match=r"images must be finite"):
        patch_embed.forward(np.full((1, 4, 4, 3), np.nan), params, 2)
    with pytest.raises(TypeError, match=r"dtype of images \(float32\), got float64"):
        patch_embed.forward(np.zeros((1, 4, 4, 3), np.float32), params, 2)
    with pytest.raises(TypeError, match=r"patch must be an int"):
        patch_embed.extract_patches(np.zeros((1, 4, 4, 3)), 2.0)


def test_bad_params(rng):
    params = patch_embed.init(rng, 4, 2, 3, 5, dtype=np.float64)
    images = np.zeros((1, 4, 4, 3))
    wrong_pos = dict(params, pos=np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"params\['pos'\] must have shape \(5, 5\).*got \(4, 5\)"):
        patch_embed.forward(images, wrong_pos, 2)
    wrong_cls = dict(params, cls=np.zeros(4))
    with pytest.raises(ValueError, match=r"params\['cls'\] must have shape \(5,\).*got \(4,\)"):
        patch_embed.forward(images, wrong_cls, 2)
    # 8x8 images with patch 2 have 2*2*3 = 12 numbers per patch, as params expect, but
    # 16 patches where pos has rows for 4
    with pytest.raises(ValueError, match=r"params\['pos'\] must have shape \(17, 5\)"):
        patch_embed.forward(np.zeros((1, 8, 8, 3)), params, 2)
    # 4 channels: 16 numbers per patch, the projection expects 12
    with pytest.raises(ValueError, match=r"images must have Ch = Din / patch² = 12/4 .*got Ch=4"):
        patch_embed.forward(np.zeros((1, 4, 4, 4)), params, 2)


def test_merge_patches_needs_a_square_grid():
    with pytest.raises(ValueError, match=r"P must be a perfect square, got P=3"):
        patch_embed.merge_patches(np.zeros((1, 3, 4)), 2)
    with pytest.raises(ValueError, match=r"patch\*patch\*Ch with patch=2, got 6"):
        patch_embed.merge_patches(np.zeros((1, 4, 6)), 2)
