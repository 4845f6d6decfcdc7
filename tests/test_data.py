"""Tests of the built-in image-caption world (minivlmoe/world.py, minivlmoe/scenes.py) and
ImageCaptionDataset (minivlmoe/data.py)."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minivlmoe import scenes
from minivlmoe.data import ImageCaptionDataset, minibatch_indices, to_uint8
from minivlmoe.scenes import (COLORS, RELATIONS, SHAPES, SIZES, Records, Scene, caption_of,
                              parse_caption)
from minivlmoe.world import DEFAULT_HELDOUT, GAP, PALETTE, World, make_splits, to_ascii


# ------------------------------------------------------------------ naive references

def naive_inside(shape, p, q):
    """Scalar shape test, written independently of minivlmoe.world.shape_mask."""
    if shape == "circle":
        return p ** 2 + q ** 2 <= 1.0
    if shape == "square":
        return abs(p) <= 1.0 and abs(q) <= 1.0
    if shape == "triangle":
        return abs(p) <= (q + 1.0) / 2.0
    if shape == "cross":
        return abs(p) <= 1.0 / 3.0 or abs(q) <= 1.0 / 3.0
    raise AssertionError(shape)


def naive_render(records, R):
    """Loop over images, objects and pixels."""
    B, M = records.extent.shape
    images = np.zeros((B, R, R, 3), dtype=np.float32)
    for b in range(B):
        for m in range(records.n_objects[b]):
            s = records.extent[b, m]
            for i in range(s):
                for j in range(s):
                    p = (j + 0.5) / (s / 2.0) - 1.0
                    q = (i + 0.5) / (s / 2.0) - 1.0
                    if naive_inside(SHAPES[records.shape[b, m]], p, q):
                        y, x = records.top[b, m] + i, records.left[b, m] + j
                        assert not images[b, y, x].any(), "two objects paint one pixel"
                        images[b, y, x] = PALETTE[records.color[b, m]]
    return images


def check_layout(records, world):
    """Every layout rule of the module docstring, checked with loops."""
    R = world.image_size
    small, large = world.extents
    for b in range(len(records.n_objects)):
        n = records.n_objects[b]
        assert 1 <= n <= world.max_objects
        assert (records.extent[b, n:] == 0).all() and (records.color[b, n:] == -1).all()
        boxes = []
        for m in range(n):
            s = records.extent[b, m]
            assert s == (small, large)[records.size[b, m]]
            y, x = records.top[b, m], records.left[b, m]
            assert 0 <= y and y + s <= R and 0 <= x and x + s <= R
            boxes.append((y, y + s, x, x + s))
        for m in range(n - 1):
            (y0, y1, x0, x1), (v0, v1, u0, u1) = boxes[m], boxes[m + 1]
            if records.relation[b] == 0:      # row: next box starts right of this one
                assert x1 + GAP <= u0
            else:                             # column: next box starts below this one
                assert records.relation[b] == 1 and y1 + GAP <= v0
        for m in range(n):
            for k in range(m + 1, n):
                (y0, y1, x0, x1), (v0, v1, u0, u1) = boxes[m], boxes[k]
                rows_overlap, cols_overlap = y0 < v1 and v0 < y1, x0 < u1 and u0 < x1
                assert not (rows_overlap and cols_overlap), "boxes overlap"
                # the relation is unambiguous: the other axis' ranges overlap
                assert rows_overlap if records.relation[b] == 0 else cols_overlap
        if n == 1:
            assert records.relation[b] == -1


def held_pairs(records, heldout):
    """Per image, the set of held-out (color, shape) pairs it contains (loop reference)."""
    out = []
    for b in range(len(records.n_objects)):
        pairs = {(COLORS[records.color[b, m]], SHAPES[records.shape[b, m]])
                 for m in range(records.n_objects[b])}
        out.append(pairs & set(heldout))
    return out


# ------------------------------------------------------------------ generation

@given(seed=st.integers(0, 2**32 - 1), image_size=st.integers(16, 40),
       max_objects=st.integers(1, 3), n=st.integers(1, 12))
def test_generated_images_follow_the_rules(seed, image_size, max_objects, n):
    world = World(image_size=image_size, max_objects=max_objects)
    ds = world.sample(n, np.random.default_rng(seed), split="test")
    assert ds.images.shape == (n, image_size, image_size, 3)
    assert ds.images.dtype == np.float32
    check_layout(ds.records, world)
    np.testing.assert_array_equal(ds.images, naive_render(ds.records, image_size))
    for i, caption in enumerate(ds.captions):
        assert parse_caption(caption) == ds.records.scene(i)


def test_every_caption_decodes_to_its_record():
    for world in (World(), World(max_objects=3)):
        ds = world.sample(2500, np.random.default_rng(7), split="test")
        for i, caption in enumerate(ds.captions):
            scene = parse_caption(caption)
            assert scene == ds.records.scene(i)
            assert caption_of(scene) == caption
        check_layout(ds.records.subset(slice(0, 500)), world)


def test_object_colors_appear_at_their_positions():
    ds = World(max_objects=3).sample(300, np.random.default_rng(3))
    rec, images = ds.records, ds.images
    covered = np.zeros(images.shape[:3], dtype=bool)
    for b in range(len(ds)):
        for m in range(rec.n_objects[b]):
            y, x, s = rec.top[b, m], rec.left[b, m], rec.extent[b, m]
            color = PALETTE[rec.color[b, m]]
            # every shape contains its box's central pixel
            np.testing.assert_array_equal(images[b, y + s // 2, x + s // 2], color)
            box = images[b, y:y + s, x:x + s]
            painted = (box != 0).any(-1)
            assert painted.mean() > 0.3                  # recognizable, not a speck
            np.testing.assert_array_equal(box[painted], np.broadcast_to(color, box[painted].shape))
            covered[b, y:y + s, x:x + s] = True
    assert not images[~covered].any(), "paint outside every object's box"


def test_sizes_colors_shapes_and_layouts_all_occur():
    rec = World(max_objects=3).sample(2000, np.random.default_rng(0)).records
    present = rec.extent > 0
    for field, names in ((rec.size, SIZES), (rec.color, COLORS), (rec.shape, SHAPES)):
        assert set(np.unique(field[present])) == set(range(len(names)))
    assert set(np.unique(rec.relation)) == {-1, 0, 1}
    assert set(np.unique(rec.n_objects)) == {1, 2, 3}
    # three large-enough objects do not fit in 32 pixels: at most one is large
    assert ((rec.size == 1).sum(1)[rec.n_objects == 3] <= 1).all()


def test_same_seed_same_data_different_seed_different_data():
    a, b, c = (World(noise=0.05).sample(50, np.random.default_rng(s)) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    for fa, fb in zip(a.records, b.records):
        np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(a.images, c.images) and a.captions != c.captions
    s1, s2 = make_splits(5, n_train=30, n_test=20), make_splits(5, n_train=30, n_test=20)
    np.testing.assert_array_equal(s1.train.images, s2.train.images)
    np.testing.assert_array_equal(s1.test.images, s2.test.images)
    assert s1.train.captions[:20] != s1.test.captions   # independent streams


def test_noise_is_mild_and_keeps_records():
    clean = World().sample(40, np.random.default_rng(9))
    noisy = World(noise=0.05).sample(40, np.random.default_rng(9))
    for fa, fb in zip(clean.records, noisy.records):
        np.testing.assert_array_equal(fa, fb)
    assert clean.captions == noisy.captions
    diff = noisy.images - clean.images
    assert 0.0 <= noisy.images.min() and noisy.images.max() <= 1.0
    assert 0.02 < diff.std() < 0.05 and np.abs(diff).max() < 0.5


# ------------------------------------------------------------------ held-out split

def test_heldout_pairs_never_in_train_and_marked_in_test():
    splits = make_splits(11, n_train=3000, n_test=400)
    train_held = held_pairs(splits.train.records, DEFAULT_HELDOUT)
    assert not any(train_held)
    assert not splits.train.heldout.any()
    test_held = held_pairs(splits.test.records, DEFAULT_HELDOUT)
    np.testing.assert_array_equal(splits.test.heldout, [bool(h) for h in test_held])
    assert splits.test.heldout.sum() == round(0.2 * 400)
    assert set().union(*test_held) == set(DEFAULT_HELDOUT)       # every held-out pair tested
    assert (~splits.test.heldout).sum() > 0                      # and seen pairs too
    assert all(len(h) == 1 for h in np.array(test_held, dtype=object)[splits.test.heldout])
    # every color and every shape is still seen in training
    rec = splits.train.records
    present = rec.extent > 0
    assert set(np.unique(rec.color[present])) == set(range(len(COLORS)))
    assert set(np.unique(rec.shape[present])) == set(range(len(SHAPES)))


def test_custom_heldout_and_fraction():
    held = (("cyan", "cross"),)
    splits = make_splits(0, n_train=500, n_test=100, heldout=held, heldout_fraction=0.5)
    assert not any(held_pairs(splits.train.records, held))
    assert splits.test.heldout.sum() == 50
    assert set().union(*held_pairs(splits.test.records, held)) == set(held)
    none = make_splits(0, n_train=50, n_test=50, heldout=())
    assert not none.test.heldout.any()


# ------------------------------------------------------------------ captions

def test_parse_caption_examples():
    assert parse_caption("a large cyan cross") == Scene((("large", "cyan", "cross"),), None)
    two = "a small red circle left of a large blue square"
    assert parse_caption(two) == Scene((("small", "red", "circle"), ("large", "blue", "square")),
                                       "left of")
    assert parse_caption("  A small Red circle   above a small red circle ").relation == "above"
    assert caption_of(parse_caption(two)) == two


@pytest.mark.parametrize("caption, match", [
    ("", "expected the article"),
    ("a red circle", "expected a size"),
    ("a small red hexagon", "expected a shape"),
    ("a small red circle left a small red circle", "'of' after 'left'"),
    ("a small red circle above", "expected the article"),
    ("a small red circle next to a small red circle", "expected the end or a relation"),
    ("a small red circle left of a small blue square above a small red cross", "mixes"),
])
def test_parse_caption_rejects_text_outside_the_grammar(caption, match):
    with pytest.raises(ValueError, match=match):
        parse_caption(caption)


def test_parse_caption_rejects_non_str():
    with pytest.raises(TypeError, match="caption must be a str"):
        parse_caption(["a", "small"])


def test_grammar_words_and_caption_length():
    words = scenes.grammar_words()
    assert len(words) == len(set(words)) == 16
    ds = World(max_objects=3).sample(400, np.random.default_rng(1))
    assert {w for c in ds.captions for w in c.split()} == set(words)
    assert max(len(c.split()) for c in ds.captions) == scenes.max_caption_words(3) == 16
    assert scenes.max_caption_words(2) == 10
    assert World().max_tokens == 12 and World(max_objects=3).max_tokens == 18
    assert RELATIONS == ("left of", "above")


# ------------------------------------------------------------------ dataset type

def test_dataset_accepts_user_arrays():
    rng = np.random.default_rng(0)
    images = rng.random((3, 8, 8, 3))
    ds = ImageCaptionDataset(images, ["a dog", "two cats", "a tree."])
    assert len(ds) == 3 and ds.image_size == 8 and ds.images.dtype == np.float64
    assert ds.records is None and ds.heldout is None
    assert ds.astype(np.float32).images.dtype == np.float32
    u8 = ImageCaptionDataset(to_uint8(images), ("a", "b", "c"))
    assert u8.images.dtype == np.float32
    np.testing.assert_allclose(u8.images, images, atol=0.5 / 255 + 1e-6)
    sub = ds.subset(np.array([2, 0]))
    assert sub.captions == ["a tree.", "a dog"]
    np.testing.assert_array_equal(sub.images, images[[2, 0]])


def test_subset_keeps_records_and_heldout():
    ds = World().sample(20, np.random.default_rng(4), split="test")
    sub = ds.subset(slice(5, 12))
    assert len(sub) == 7 and sub.captions == ds.captions[5:12]
    np.testing.assert_array_equal(sub.heldout, ds.heldout[5:12])
    assert all(sub.records.scene(i) == ds.records.scene(5 + i) for i in range(7))


_IMG = np.zeros((2, 4, 4, 3), np.float32)


@pytest.mark.parametrize("images, captions, error, match", [
    ([[0.0]], ["a", "b"], TypeError, "images must be a numpy.ndarray"),
    (np.zeros((2, 4, 4)), ["a", "b"], ValueError, r"images must have 4 dimensions \(B, R, R, 3\)"),
    (np.zeros((2, 4, 5, 3)), ["a", "b"], ValueError, r"images must be square.*\(2, 4, 5, 3\)"),
    (np.zeros((2, 4, 4, 1)), ["a", "b"], ValueError, "images must be square RGB"),
    (np.zeros((0, 4, 4, 3)), [], ValueError, "images must hold at least one image"),
    (np.zeros((2, 4, 4, 3), np.int64), ["a", "b"], TypeError, "images must have dtype.*got int64"),
    (_IMG + 2.0, ["a", "b"], ValueError,
     r"images must have values in \[0, 1\].*got values in \[2, 2\]"),
    (_IMG - 0.5, ["a", "b"], ValueError, r"images must have values in \[0, 1\]"),
    (_IMG * np.nan, ["a", "b"], ValueError, "images must be finite"),
    (_IMG, "a b", TypeError, "captions must be a list of str, got str"),
    (_IMG, ["a"], ValueError, r"captions must hold one caption per image \(2 images\), got 1"),
    (_IMG, ["a", "b", "c"], ValueError, "got 3 captions"),
    (_IMG, ["a", 5], TypeError, r"captions\[1\] must be a str, got int"),
    (_IMG, ["a", "  "], ValueError, r"captions\[1\] must be a non-empty caption"),
    (_IMG, ["", "b"], ValueError, r"captions\[0\] must be a non-empty caption, got ''"),
])
def test_dataset_rejects_bad_input(images, captions, error, match):
    with pytest.raises(error, match=match):
        ImageCaptionDataset(images, captions)


def test_dataset_rejects_bad_records_and_heldout():
    rec = World().sample(3, np.random.default_rng(0)).records
    with pytest.raises(ValueError, match="records must describe 2 images, got 3"):
        ImageCaptionDataset(_IMG, ["a", "b"], records=rec)
    with pytest.raises(TypeError, match="records must be a Records"):
        ImageCaptionDataset(_IMG, ["a", "b"], records={"size": 1})
    with pytest.raises(TypeError, match="heldout must have dtype bool"):
        ImageCaptionDataset(_IMG, ["a", "b"], heldout=np.zeros(2))
    with pytest.raises(ValueError, match=r"heldout must have shape \(2,\)"):
        ImageCaptionDataset(_IMG, ["a", "b"], heldout=np.zeros(3, bool))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        ImageCaptionDataset(_IMG, ["a", "b"]).astype(np.int32)
    assert isinstance(rec, Records)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(image_size=15), ValueError, r"image_size must be in \[16, inf\], got 15"),
    (dict(image_size=32.0), TypeError, "image_size must be an int"),
    (dict(max_objects=4), ValueError, r"max_objects must be in \[1, 3\], got 4"),
    (dict(noise=-0.1), ValueError, "noise must be in"),
    (dict(heldout_fraction=1.5), ValueError, "heldout_fraction must be in"),
    (dict(heldout=(("red", "hexagon"),)), ValueError, "heldout must hold .color, shape. pairs"),
    (dict(heldout=("red",)), ValueError, "heldout must hold"),
    (dict(heldout=5), TypeError, "heldout must be a tuple of .color, shape. pairs, got int"),
    (dict(heldout=(("red", "cross"), ("red", "cross"))), ValueError, "must not repeat"),
    (dict(heldout=tuple(("red", s) for s in SHAPES)), ValueError, "every color.*'red'"),
    (dict(heldout=tuple((c, "cross") for c in COLORS)), ValueError, "every shape.*'cross'"),
])
def test_world_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        World(**kwargs)


def test_sample_and_splits_reject_bad_arguments():
    world = World()
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        world.sample(3, np.random.default_rng(0), split="val")
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, got int"):
        world.sample(3, 0)
    with pytest.raises(ValueError, match=r"n must be in \[1, inf\], got 0"):
        world.sample(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="seed must be in"):
        world.splits(-1, 3, 3)


# ------------------------------------------------------------------ batching and helpers

@given(n=st.integers(1, 40), batch_size=st.integers(1, 12), seed=st.integers(0, 1000),
       drop_last=st.booleans())
def test_minibatch_indices_one_pass(n, batch_size, seed, drop_last):
    batches = list(minibatch_indices(n, batch_size, np.random.default_rng(seed),
                                     drop_last=drop_last))
    again = list(minibatch_indices(n, batch_size, np.random.default_rng(seed),
                                   drop_last=drop_last))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    flat = np.concatenate(batches) if batches else np.zeros(0, int)
    assert len(np.unique(flat)) == len(flat)
    if drop_last:
        assert all(len(b) == batch_size for b in batches)
        assert len(flat) == n - n % batch_size
    else:
        assert sorted(flat) == list(range(n))
        assert all(len(b) == batch_size for b in batches[:-1])


def test_dataset_batches_are_shuffled_subsets():
    ds = World().sample(10, np.random.default_rng(0))
    batches = list(ds.batches(4, np.random.default_rng(1)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(c for b in batches for c in b.captions) == sorted(ds.captions)
    order = np.concatenate(list(minibatch_indices(10, 4, np.random.default_rng(1))))
    assert [c for b in batches for c in b.captions] == [ds.captions[i] for i in order]


def test_minibatch_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, inf\], got 0"):
        next(minibatch_indices(5, 0, np.random.default_rng(0)))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        next(minibatch_indices(5, 2, 3))


def test_to_uint8_and_to_ascii():
    ds = World().sample(5, np.random.default_rng(2))
    u8 = to_uint8(ds.images)
    assert u8.dtype == np.uint8 and u8.shape == ds.images.shape
    np.testing.assert_array_equal(u8.astype(np.float32) / 255 == 0, ds.images == 0)
    rec = ds.records
    for b in range(5):
        lines = to_ascii(ds.images[b]).split("\n")
        assert len(lines) == 32 and all(len(line) == 32 for line in lines)
        for m in range(rec.n_objects[b]):
            s = rec.extent[b, m]
            letter = lines[rec.top[b, m] + s // 2][rec.left[b, m] + s // 2]
            assert letter == COLORS[rec.color[b, m]][0].upper()
        background = np.array([list(line) for line in lines]) == "."
        np.testing.assert_array_equal(background, ~ds.images[b].any(-1))
