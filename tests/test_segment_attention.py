"""Tests for minivlmoe.ops.segment_attention: attention by segments equals masked attention.

The oracle is masked attention (minivlmoe.ops.attention, itself tested against a naive
loop in tests/test_attention.py) with the mask that ``dense_mask`` builds from the
blocks; ``dense_mask`` of the model's blocks is checked against sequence.block_mask.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlmoe import sequence
from minivlmoe.gradcheck import assert_gradients
from minivlmoe.ops import attention, segment_attention
from minivlmoe.ops.segment_attention import Block
from minivlmoe.testing.ops import segment_attention_cases

from conftest import readonly


@st.composite
def layouts(draw):
    """A model layout (image, caption, retrieval lengths; caption or retrieval may be
    absent) and a key-validity array with padding in the text segments: every text
    segment present keeps at least its first position valid."""
    B = draw(st.integers(1, 3))
    image = draw(st.integers(1, 4))
    caption = draw(st.integers(0, 4))
    retrieval = draw(st.integers(0 if caption else 1, 4))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    layout = sequence.Layout(image=image, caption=caption, retrieval=retrieval)
    valid = np.ones((B, layout.length), dtype=bool)              # (B, S)
    for sl in (layout.caption_slice, layout.retrieval_slice):
        n = sl.stop - sl.start
        if n:
            lengths = rng.integers(1, n + 1, size=B)             # (B,) real tokens per row
            valid[:, sl] = np.arange(n)[None] < lengths[:, None]  # (B, n)
    return layout, valid, rng


def relative(a, b):
    """max |a - b| / max |b| in float64 (0 when both are exactly 0, as the q and k
    gradients are when every block has a single key)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
    return diff / scale if scale > 0 else diff


def compare(layout, valid, rng, dtype, density=1.0, D=8, H=2):
    """Max relative differences (output, dx, every param grad) of segment against masked."""
    B, S = valid.shape
    params = attention.init(rng, D, H, density, dtype=dtype)
    for name in attention.PROJECTIONS:
        params[name]["b"] = (0.1 * rng.standard_normal(D)).astype(dtype)
    x = rng.standard_normal((B, S, D)).astype(dtype)             # (B, S, D)
    dy = rng.standard_normal((B, S, D)).astype(dtype)            # (B, S, D)
    blocks = sequence.attention_blocks(layout, valid)
    y, cache = segment_attention.forward(x, params, H, blocks)
    dx, grads = segment_attention.backward(dy, cache)
    mask = segment_attention.dense_mask(blocks, B, S)            # (B, S, S)
    y_ref, c_ref = attention.forward(x, params, H, mask)
    dx_ref, grads_ref = attention.backward(dy, c_ref)
    errors = {"y": relative(y, y_ref), "dx": relative(dx, dx_ref)}
    for name in attention.PROJECTIONS:
        errors[f"{name}.W"] = relative(grads[name]["W"].data, grads_ref[name]["W"].data)
        if name != "k":          # dbk is exactly 0 up to round-off in both: no relative error
            errors[f"{name}.b"] = relative(grads[name]["b"], grads_ref[name]["b"])
    return errors


@given(layouts(), st.sampled_from([1.0, 0.3]))
def test_equals_masked_attention_float64(case, density):
    layout, valid, rng = case
    errors = compare(layout, valid, rng, np.float64, density)
    assert max(errors.values()) < 1e-12, errors


@given(layouts())
def test_equals_masked_attention_float32(case):
    layout, valid, rng = case
    errors = compare(layout, valid, rng, np.float32)
    assert max(errors.values()) < 1e-5, errors


@given(layouts())
def test_model_blocks_are_the_block_mask(case):
    layout, valid, _ = case
    seg, pos = sequence.segments(layout)                         # (S,), (S,)
    want = sequence.block_mask(seg, pos, valid)                  # (B, S, S)
    blocks = sequence.attention_blocks(layout, valid)
    got = segment_attention.dense_mask(blocks, *valid.shape)
    np.testing.assert_array_equal(got, want)


def test_blocks_compute_fewer_scores_than_the_full_matrix():
    """The default layout (17 image, 11 caption, 12 retrieval positions): 741 of 1600."""
    layout = sequence.Layout(image=17, caption=11, retrieval=12)
    blocks = sequence.attention_blocks(layout, np.ones((1, 40), dtype=bool))
    sizes = [(b.queries.stop - b.queries.start) * (b.keys.stop - b.keys.start) for b in blocks]
    assert sizes == [17 * 17, 11 * 28, 12 * 12] and sum(sizes) == 741


def test_a_score_outside_the_blocks_can_change_the_masked_result():
    """The comparison can fail: masked attention with a mask that lets one more key in
    differs from attention by the blocks."""
    rng = np.random.default_rng(0)
    layout = sequence.Layout(image=2, caption=2, retrieval=2)
    valid = np.ones((1, 6), dtype=bool)
    blocks = sequence.attention_blocks(layout, valid)
    params = attention.init(rng, 4, 2, dtype=np.float64)
    x = rng.standard_normal((1, 6, 4))
    y, _ = segment_attention.forward(x, params, 2, blocks)
    mask = segment_attention.dense_mask(blocks, 1, 6)
    mask[0, 0, 5] = True                                         # image row sees a text key
    y_leak, _ = attention.forward(x, params, 2, mask)
    assert relative(y_leak[0, 0], y[0, 0]) > 1e-6
    np.testing.assert_allclose(y_leak[0, 1:], y[0, 1:], rtol=1e-12)


@pytest.mark.parametrize("case", segment_attention_cases(np.random.default_rng(7)),
                         ids=lambda c: c.op)
def test_gradients(case):
    assert_gradients(case, np.random.default_rng(0))


def small_forward(seed, image, caption, valid):
    """Attention by segments of one random (1, S, 4) sequence with 2 heads, float64:
    ``(rng, blocks, y, cache)`` for the layout [image | caption | the rest]."""
    rng = np.random.default_rng(seed)
    layout = sequence.Layout(image=image, caption=caption,
                             retrieval=valid.shape[1] - image - caption)
    blocks = sequence.attention_blocks(layout, valid)
    params = attention.init(rng, 4, 2, dtype=np.float64)
    y, cache = segment_attention.forward(rng.standard_normal((1, valid.shape[1], 4)),
                                         params, 2, blocks)
    return rng, blocks, y, cache


def test_backward_mutates_nothing():
    valid = np.array([[1, 1, 1, 1, 0, 1, 1, 0]], dtype=bool)
    rng, _, y, cache = small_forward(1, 3, 2, valid)
    dy = readonly(rng.standard_normal(y.shape))
    saved = [a.copy() for a in (dy, cache.q, cache.k, cache.v, *cache.probs)]
    readonly(cache.q, cache.k, cache.v, *cache.probs)
    segment_attention.backward(dy, cache)
    for before, after in zip(saved, (dy, cache.q, cache.k, cache.v, *cache.probs)):
        np.testing.assert_array_equal(before, after)


def test_probabilities_are_zero_on_masked_keys_and_sum_to_one():
    valid = np.array([[1, 1, 1, 1, 0, 1, 0, 0]], dtype=bool)
    _, blocks, _, cache = small_forward(2, 2, 3, valid)
    for blk, p in zip(blocks, cache.probs):
        allowed = np.ones(p.shape, dtype=bool) if blk.mask is None else np.broadcast_to(
            blk.mask[:, None], p.shape)
        assert np.all(p[~allowed] == 0.0)
        np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("blocks, match", [
    ((), "non-empty tuple of Block"),
    ((Block(queries=slice(0, 2), keys=slice(0, 4), mask=None),), "cover the query positions"),
    ((Block(queries=slice(0, 2), keys=slice(0, 4), mask=None),
      Block(queries=slice(1, 4), keys=slice(0, 4), mask=None)), "must start at 2"),
    ((Block(queries=slice(0, 4), keys=slice(2, 2), mask=None),), "keys must be non-empty"),
    ((Block(queries=slice(0, 4), keys=slice(0, 9), mask=None),), "inside \\[0, S=4\\]"),
    ((Block(queries=slice(0, 4, 2), keys=slice(0, 4), mask=None),), "step 1"),
    ((Block(queries=slice(0, 4), keys=slice(0, 4), mask=np.ones((1, 4, 3), bool)),),
     "broadcastable to \\(B, Sq, Sk\\)"),
    ((Block(queries=slice(0, 4), keys=slice(0, 4), mask=np.ones((1, 4, 4))),), "bool"),
])
def test_bad_blocks_are_refused(blocks, match):
    rng = np.random.default_rng(3)
    params = attention.init(rng, 4, 2, dtype=np.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        segment_attention.forward(rng.standard_normal((1, 4, 4)), params, 2, blocks)


@settings(max_examples=10)
@given(layouts())
def test_model_loss_equals_the_masked_tower(case):
    """Through the whole model: the tower with the blocks and with the dense block mask
    gives the same hidden states on every row (float64)."""
    from minivlmoe import model_config, tower
    layout, valid, rng = case
    cfg = model_config.ModelConfig(image_size=8, patch=4, width=8, heads=2, layers=2,
                                   mlp_hidden=8, expert_hidden=8, experts="dense",
                                   max_text_len=8, vocab_size=7, dtype="float64")
    from minivlmoe import model
    params = model.init(rng, cfg)
    B, S = valid.shape
    x = rng.standard_normal((B, S, cfg.width))                    # (B, S, D)
    modality = np.zeros(B * S, dtype=np.int64)
    rows = np.flatnonzero(valid)
    blocks = sequence.attention_blocks(layout, valid)
    h, _, _, _ = tower.forward(x, blocks, modality, rows, params, cfg)
    h_ref, _, _, _ = tower.forward(x, segment_attention.dense_mask(blocks, B, S), modality,
                                   rows, params, cfg)
    assert relative(h, h_ref) < 1e-12
