"""Tests of the whole vision-language MoE model: minivlmoe/model.py and the sequence,
tower and inference modules it is built from."""

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import assume, given
from hypothesis import strategies as st

from minivlmoe import (cli, inference, model, model_config, optim, run_folder, runs, sequence,
                       testing, tower, train)
from minivlmoe.gradcheck import assert_gradients, check_case
from minivlmoe.moe import moe_config, moe_layer, router
from minivlmoe.testing.model import (NO_AUX, ROUTER_TASK, directional_case, router_task_case_name,
                                     tiny_batch, tiny_config, tiny_params)
from minivlmoe.tree import flatten, unflatten, with_values

MODES = model_config.EXPERT_MODES
OBJECTIVES = {"both": {}, "retrieval": {"caption_weight": 0.0},
              "fusion": {"contrastive_weight": 0.0}}
PAD, BOS, EOS = 0, 1, 2


def setup(seed, mode="shared", B=3, **overrides):
    cfg = tiny_config(mode, **overrides)
    rng = np.random.default_rng(seed)
    params = tiny_params(rng, cfg)
    images, ids = tiny_batch(rng, cfg, B=B, pad_id=PAD)
    return cfg, params, images, ids, rng


def min_margin(params, cfg, images, ids, keys=None):
    _, stats, _ = model.forward(params, cfg, images, ids, pad_id=PAD, keys=keys)
    return min([s["min_margin"] for s in stats["moe"].values()], default=math.inf)


# ----------------------------------------------------------------------------- gradients

def check_model_gradients(seed, mode, objective, top_k=1, B=3, drawn=True):
    cfg, params, images, ids, rng = setup(seed, mode, B=B, top_k=top_k,
                                          **OBJECTIVES[objective])
    keys = rng.integers(0, 2, size=B)                              # duplicate positives
    # routing is piecewise constant: finite differences (h = 1e-6 along unit directions)
    # are only valid when no top-k choice sits within a tiny margin of a tie
    far_from_ties = min_margin(params, cfg, images, ids, keys) > 1e-4
    if drawn:
        assume(far_from_ties)
    else:
        assert far_from_ties, f"seed {seed} puts a routing decision within 1e-4 of a tie"
    case = directional_case(f"model({mode}, {objective}, k={top_k})", params, cfg,
                            images, ids, pad_id=PAD, keys=keys, rng=rng)
    assert_gradients(case, rng)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_gradients_every_mode_and_objective(mode, objective):
    check_model_gradients(0, mode, objective, drawn=False)


@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(MODES),
       objective=st.sampled_from(list(OBJECTIVES)), top_k=st.sampled_from([1, 2]),
       B=st.integers(2, 4))
def test_gradients_hypothesis(seed, mode, objective, top_k, B):
    check_model_gradients(seed, mode, objective, top_k, B)


def _loss_at(params, flat_dirs, t, cfg, images, ids, keys):
    moved = {}
    for path, leaf in flatten(params).items():
        v = flat_dirs[path]
        if isinstance(leaf, sp.csr_array):
            moved[path] = with_values(leaf, leaf.data + t * v)
        else:
            moved[path] = np.asarray(leaf + t * v)
    return model.losses_only(unflatten(moved), cfg, images, ids, pad_id=PAD,
                             keys=keys)["total"]


@pytest.mark.parametrize("mode", MODES)
def test_gradient_along_one_global_direction(mode):
    """Independent of directional_case: one random direction through every leaf
    at once (including the key biases), against a centered difference."""
    cfg, params, images, ids, rng = setup(7, mode, top_k=2)       # k = E: no routing ties
    keys = np.array([0, 1, 0])
    _, grads, _ = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD, keys=keys)
    dirs, analytic = {}, 0.0
    for path, leaf in flatten(params).items():
        values = leaf.data if isinstance(leaf, sp.csr_array) else leaf
        dirs[path] = rng.standard_normal(values.shape)
        g = flatten(grads)[path]
        analytic += float(np.sum((g.data if isinstance(g, sp.csr_array) else g) * dirs[path]))
    h = 1e-6
    numeric = (_loss_at(params, dirs, h, cfg, images, ids, keys)
               - _loss_at(params, dirs, -h, cfg, images, ids, keys)) / (2 * h)
    assert abs(analytic - numeric) <= 1e-6 * (abs(analytic) + abs(numeric))


@pytest.mark.parametrize("mode", MODES)
def test_key_bias_gradient_is_zero(mode):
    cfg, params, images, ids, _ = setup(3, mode)
    _, grads, _ = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD)
    for i in grads["blocks"]:
        dbk = grads["blocks"][i]["attn"]["k"]["b"]
        dbq = grads["blocks"][i]["attn"]["q"]["b"]
        assert np.max(np.abs(dbk)) <= 1e-10 * max(1.0, np.max(np.abs(dbq)))


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_grads_have_the_params_structure(mode, objective):
    cfg, params, images, ids, _ = setup(1, mode, **OBJECTIVES[objective])
    _, grads, _ = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD)
    fp, fg = flatten(params), flatten(grads)
    assert list(fp) == list(fg)                                    # same keys, same order
    for path, w in fp.items():
        g = fg[path]
        assert type(g) is type(w), path
        assert g.dtype == w.dtype and g.shape == w.shape, path
        if isinstance(w, sp.csr_array):
            assert np.array_equal(g.indices, w.indices) and np.array_equal(g.indptr, w.indptr)
    unused = {"retrieval": ["lm_head"], "fusion": ["img_proj", "txt_proj", "log_logit_scale"],
              "both": []}[objective]
    for name in unused:                                            # untouched heads: exact 0
        for leaf in flatten(grads[name]).values():
            assert not np.any(leaf.data if isinstance(leaf, sp.csr_array) else leaf)


def test_layer_kinds_match_active_compute():
    """Every mode runs the same FFN hidden width per token in every layer."""
    active = {}
    for mode in MODES:
        cfg = model_config.ModelConfig(vocab_size=10, max_text_len=5, experts=mode, layers=4,
                                mlp_hidden=48, expert_hidden=24, top_k=2, moe_every=2)
        kinds = cfg.layer_kinds()
        active[mode] = [hidden * (cfg.top_k if kind == "moe" else 1) for kind, hidden in kinds]
        assert [k for k, _ in kinds] == {"shared": ["ffn", "moe", "ffn", "moe"],
                                         "modality": ["ffn", "moe", "ffn", "ffn"],
                                         "dense": ["ffn"] * 4}[mode]
    assert active["shared"] == active["modality"] == active["dense"] == [48, 48, 48, 48]


def test_moe_params_per_mode():
    for mode in MODES:
        cfg = tiny_config(mode)
        params = model.init(np.random.default_rng(0), cfg)
        block = params["blocks"]["0"]
        if mode == "dense":
            assert "ffn" in block and "moe" not in block
        elif mode == "shared":
            assert set(block["moe"]) == {"router", "experts"}
        else:
            assert set(block["moe"]) == {"image", "text"}
            assert "ffn" in params["blocks"]["1"]                  # the fusion layer


def test_config_round_trip_through_json():
    cfg = model_config.ModelConfig(vocab_size=30, max_text_len=9, capacity_factor=None, bpr=True)
    again = model_config.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.expert_hidden == cfg.mlp_hidden


def test_float32_in_float32_out():
    cfg, params, images, ids, _ = setup(2, "modality", dtype="float32")
    assert images.dtype == np.float32
    losses, grads, stats = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD)
    assert all(isinstance(v, float) and np.isfinite(v) for v in losses.values())
    assert all((g.dtype == np.float32) for g in flatten(grads).values())
    assert inference.encode_images(params, cfg, images).dtype == np.float32
    assert inference.encode_texts(params, cfg, ids, pad_id=PAD).dtype == np.float32


@pytest.mark.parametrize("mode", MODES)
def test_float32_training_steps_with_router_noise(mode):
    """Three AdamW steps in float32 with router noise on (train=True): every loss is a
    finite float, every gradient and parameter stays float32 and finite."""
    cfg, params, images, ids, _ = setup(13, mode, dtype="float32", router_noise=0.5)
    rng = np.random.default_rng(4)
    state = optim.init_state(params)
    adam = optim.AdamWConfig(lr=1e-3, warmup_steps=0, total_steps=3)
    for _ in range(3):
        losses, grads, _ = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD,
                                                train=True, rng=rng)
        assert all(isinstance(v, float) and np.isfinite(v) for v in losses.values())
        for g in flatten(grads).values():
            values = g.data if sp.issparse(g) else np.asarray(g)
            assert values.dtype == np.float32 and np.all(np.isfinite(values))
        optim.step(params, grads, state, adam)
    for p in flatten(params).values():
        values = p.data if sp.issparse(p) else np.asarray(p)
        assert values.dtype == np.float32 and np.all(np.isfinite(values))


def test_losses_sum_to_total_and_stats_are_json():
    cfg, params, images, ids, _ = setup(4, "shared", caption_weight=0.5,
                                        contrastive_weight=2.0)
    losses, _, stats = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD)
    assert losses["total"] == pytest.approx(0.5 * losses["caption"]
                                            + 2.0 * losses["contrastive"] + losses["aux"])
    json.dumps(stats)
    layer = stats["moe"]["blocks.0"]
    usage = np.array(layer["pools"]["shared"]["usage"])            # (2, E) image / text
    assert usage.sum() == stats["tokens"] * cfg.top_k              # dropless: all kept
    assert layer["dropped_fraction"] == 0.0


def test_stats_report_the_temperature_and_the_logit_scale():
    """log_logit_scale is the log of the INVERSE temperature: 0.07 and 1/0.07 at init."""
    cfg = tiny_config("shared")
    rng = np.random.default_rng(14)
    params = model.init(rng, cfg)
    images, ids = tiny_batch(rng, cfg, pad_id=PAD)
    _, stats, _ = model.forward(params, cfg, images, ids, pad_id=PAD)
    assert stats["temperature"] == pytest.approx(0.07, rel=1e-12)
    assert stats["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-12)
    params["log_logit_scale"] = np.array(np.log(20.0))
    _, stats, cache = model.forward(params, cfg, images, ids, pad_id=PAD)
    assert stats["temperature"] == pytest.approx(0.05, rel=1e-12)
    assert float(cache.contrastive.logit_scale) == pytest.approx(20.0, rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_backward_scales_with_dtotal(mode):
    """backward(dtotal, cache) is the gradient of dtotal * total: the objectives and the
    aux losses all scale with it, and loss_and_grads is backward(1.0, cache)."""
    cfg, params, images, ids, _ = setup(15, mode)
    losses, grads, _ = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD)
    _, _, cache = model.forward(params, cfg, images, ids, pad_id=PAD)
    one, scaled = flatten(model.backward(1.0, cache)), flatten(model.backward(-2.5, cache))
    assert losses["aux"] > 0 or mode == "dense"
    values = lambda x: x.data if isinstance(x, sp.csr_array) else x  # noqa: E731
    scale = max(float(np.max(np.abs(values(g)), initial=0.0)) for g in one.values())
    for path, g in flatten(grads).items():
        np.testing.assert_array_equal(values(g), values(one[path]), err_msg=path)
        # round-off of the (exactly zero) key-bias gradient: an absolute floor
        np.testing.assert_allclose(values(scaled[path]), -2.5 * values(one[path]),
                                   rtol=1e-12, atol=1e-13 * scale, err_msg=path)


def test_capacity_drops_are_reported():
    cfg, params, images, ids, _ = setup(4, "modality", capacity_factor=0.5)
    _, _, stats = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD)
    layer = stats["moe"]["blocks.0"]
    assert set(layer["pools"]) == {"image", "text"}
    assert layer["dropped_fraction"] > 0.0


# ----------------------------------------------------------------------------- semantics

@pytest.mark.parametrize("mode", MODES)
def test_dual_encoder_equals_separate_towers(mode):
    """The combined training sequence gives exactly the embeddings of images alone and
    texts alone through the tower (dropless routing is per token)."""
    cfg, params, images, ids, _ = setup(5, mode, B=4)
    _, _, cache = model.forward(params, cfg, images, ids, pad_id=PAD)
    np.testing.assert_allclose(cache.img_norm.y, inference.encode_images(params, cfg, images),
                               atol=1e-12)
    np.testing.assert_allclose(cache.txt_norm.y,
                               inference.encode_texts(params, cfg, ids, pad_id=PAD), atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_fusion_mask_semantics(mode):
    """Caption position t sees every image token and caption tokens <= t only; image
    tokens see no text; retrieval text sees no image and no caption token."""
    cfg, params, images, ids, rng = setup(6, mode, B=2, max_text_len=6)
    ids = np.array([[BOS, 3, 4, 5, 6, EOS], [BOS, 5, 5, EOS, PAD, PAD]])
    P1 = 1 + cfg.num_patches
    seq, _ = sequence.embed(params, cfg, images, ids[:, :-1], ids, PAD)
    x, mask, modality, rows = seq.x, seq.mask, seq.modality, seq.rows
    h0, _, _, _ = tower.forward(x, mask, modality, rows, params, cfg)
    cap = slice(P1, P1 + 5)
    ret = slice(P1 + 5, None)
    # perturb caption input position 2
    x1 = x.copy()
    x1[:, P1 + 2] += rng.standard_normal(cfg.width)
    h1, _, _, _ = tower.forward(x1, mask, modality, rows, params, cfg)
    changed = np.any(np.abs(h1 - h0) > 1e-12, axis=2)              # (B, S)
    assert not changed[:, :P1].any()                               # image rows
    assert not changed[:, P1:P1 + 2].any()                         # earlier caption rows
    assert changed[0, P1 + 2:cap.stop].all()                       # later caption rows
    assert not changed[:, ret].any()                               # retrieval text
    # perturb one image patch token
    x2 = x.copy()
    x2[:, 3] += rng.standard_normal(cfg.width)
    h2, _, _, _ = tower.forward(x2, mask, modality, rows, params, cfg)
    changed = np.any(np.abs(h2 - h0) > 1e-12, axis=2)
    assert changed[:, :P1].all() and changed[0, cap].all()
    assert not changed[:, ret].any()
    # the padding keys of item 1 are never seen by a valid row
    x3 = x.copy()
    x3[1, -2:] += 5.0                                              # retrieval pads
    h3, _, _, _ = tower.forward(x3, mask, modality, rows, params, cfg)
    changed = np.any(np.abs(h3 - h0) > 1e-12, axis=2)
    assert not changed[1, :-2].any()


def test_block_mask_against_a_loop():
    seg = np.repeat([0, 1, 2], [3, 4, 3])
    pos = np.concatenate([np.arange(3), np.arange(4), np.arange(3)])
    valid = np.random.default_rng(0).random((2, 10)) > 0.3
    mask = sequence.block_mask(seg, pos, valid)
    for b in range(2):
        for s in range(10):
            for t in range(10):
                if seg[s] == 0:
                    want = seg[t] == 0
                elif seg[s] == 1:
                    want = seg[t] == 0 or (seg[t] == 1 and pos[t] <= pos[s])
                else:
                    want = seg[t] == 2
                assert mask[b, s, t] == (want and valid[b, t])


# ---- naive loop reference of the dense tower

def naive_layernorm(v, p, eps=tower.LN_EPS):
    mu = sum(v) / len(v)
    var = sum((a - mu) ** 2 for a in v) / len(v)
    return np.array([(a - mu) / math.sqrt(var + eps) * g + bb
                     for a, g, bb in zip(v, p["gamma"], p["beta"])])


def naive_linear(v, p):
    W = p["W"].toarray()
    return np.array([sum(W[o, i] * v[i] for i in range(len(v))) + p["b"][o]
                     for o in range(W.shape[0])])


def naive_gelu(a):
    """The tanh form of minivlmoe/ops/gelu.py."""
    return 0.5 * a * (1 + math.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


def naive_block(x, mask, p, heads):
    B, S, D = x.shape
    Dh = D // heads
    out = np.empty_like(x)
    a_in = np.array([[naive_layernorm(x[b, s], p["ln1"]) for s in range(S)] for b in range(B)])
    for b in range(B):
        q = [naive_linear(a_in[b, s], p["attn"]["q"]) for s in range(S)]
        k = [naive_linear(a_in[b, s], p["attn"]["k"]) for s in range(S)]
        v = [naive_linear(a_in[b, s], p["attn"]["v"]) for s in range(S)]
        for s in range(S):
            ctx = np.zeros(D)
            for hh in range(heads):
                sl = slice(hh * Dh, (hh + 1) * Dh)
                allowed = [t for t in range(S) if mask[b, s, t]]
                scores = [float(q[s][sl] @ k[t][sl]) / math.sqrt(Dh) for t in allowed]
                m = max(scores)
                e = [math.exp(z - m) for z in scores]
                for t, w in zip(allowed, e):
                    ctx[sl] += w / sum(e) * v[t][sl]
            x1 = x[b, s] + naive_linear(ctx, p["attn"]["o"])
            f_in = naive_layernorm(x1, p["ln2"])
            hidden = naive_linear(f_in, p["ffn"]["fc1"])
            hidden = np.array([naive_gelu(a) for a in hidden])
            out[b, s] = x1 + naive_linear(hidden, p["ffn"]["fc2"])
    return out


def test_dense_tower_equals_naive_loops():
    cfg = tiny_config("dense", layers=1, width=6, heads=3, density=0.5)
    rng = np.random.default_rng(8)
    params = model.init(rng, cfg)
    for leaf in flatten(params).values():                          # non-trivial LN and biases
        if isinstance(leaf, np.ndarray) and leaf.ndim == 1:
            leaf += 0.3 * rng.standard_normal(leaf.shape)
    x = rng.standard_normal((2, 5, 6))
    seg = np.repeat([0, 1], [2, 3])
    pos = np.concatenate([np.arange(2), np.arange(3)])
    mask = sequence.block_mask(seg, pos, np.ones((2, 5), dtype=bool))
    modality = np.repeat((seg != 0)[None], 2, axis=0).reshape(-1).astype(np.int64)
    h, aux, _, _ = tower.forward(x, mask, modality, None, params, cfg)
    ref = naive_block(x, mask, params["blocks"]["0"], cfg.heads)
    ref = np.array([[naive_layernorm(ref[b, s], params["ln_f"]) for s in range(5)]
                    for b in range(2)])
    np.testing.assert_allclose(h, ref, rtol=1e-10, atol=1e-10)
    assert aux == 0.0


# ----------------------------------------------------------------------------- inference

@pytest.mark.parametrize("mode", MODES)
def test_greedy_decode_is_batched_and_well_formed(mode):
    cfg, params, images, _, _ = setup(9, mode, B=4)
    out = inference.greedy_decode(params, cfg, images, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                                  max_len=5)
    assert out.shape == (4, 5) and np.all(out[:, 0] == BOS)
    for row in out:
        body = list(row[1:])
        end = body.index(EOS) if EOS in body else len(body)
        assert PAD not in body[:end] and BOS not in body[:end]
        assert all(t == PAD for t in body[end + 1:])
    for b in range(4):                                             # each item alone
        one = inference.greedy_decode(params, cfg, images[b:b + 1], bos_id=BOS, eos_id=EOS,
                                      pad_id=PAD, max_len=5)
        np.testing.assert_array_equal(one[0], out[b])


def test_encodings_are_unit_norm_and_deterministic():
    cfg, params, images, ids, _ = setup(10, "modality", B=5)
    for emb in (inference.encode_images(params, cfg, images),
                inference.encode_texts(params, cfg, ids, pad_id=PAD)):
        assert emb.shape == (5, cfg.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(inference.encode_images(params, cfg, images),
                                  inference.encode_images(params, cfg, images))


def test_inference_batches_do_not_change_dropless_results():
    cfg, params, images, ids, _ = setup(16, "modality", B=5)
    np.testing.assert_allclose(inference.encode_images(params, cfg, images, batch_size=2),
                               inference.encode_images(params, cfg, images), atol=1e-12)
    np.testing.assert_allclose(inference.encode_texts(params, cfg, ids, pad_id=PAD, batch_size=3),
                               inference.encode_texts(params, cfg, ids, pad_id=PAD), atol=1e-12)
    kw = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=5)
    np.testing.assert_array_equal(inference.greedy_decode(params, cfg, images, batch_size=2, **kw),
                                  inference.greedy_decode(params, cfg, images, **kw))
    with pytest.raises(ValueError, match="batch_size"):
        inference.encode_images(params, cfg, images, batch_size=0)


def test_router_noise_uses_only_the_given_rng():
    cfg, params, images, ids, _ = setup(11, "shared", router_noise=1.0)
    a = model.losses_only(params, cfg, images, ids, pad_id=PAD, train=True,
                          rng=np.random.default_rng(3))
    b = model.losses_only(params, cfg, images, ids, pad_id=PAD, train=True,
                          rng=np.random.default_rng(3))
    c = model.losses_only(params, cfg, images, ids, pad_id=PAD, train=False)
    assert a == b and a["total"] != c["total"]
    with pytest.raises(ValueError, match="rng"):
        model.losses_only(params, cfg, images, ids, pad_id=PAD, train=True)


class _Timer:
    def __init__(self):
        self.names = []

    def section(self, name):
        import contextlib
        self.names.append(name)
        return contextlib.nullcontext()


def test_timer_sections():
    cfg, params, images, ids, _ = setup(12, "modality")
    timer = _Timer()
    model.loss_and_grads(params, cfg, images, ids, pad_id=PAD, timer=timer)
    assert set(timer.names) == {"embed", "attention", "moe", "ffn", "losses"}


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("mode", MODES)
def test_overfits_eight_pairs(mode):
    cfg = model_config.ModelConfig(image_size=8, patch=4, vocab_size=12, max_text_len=6, width=16,
                            heads=2, layers=2, mlp_hidden=32, experts=mode, num_experts=2,
                            moe_every=1, embed_dim=16)
    rng = np.random.default_rng(0)
    params = model.init(rng, cfg)
    images, ids = tiny_batch(rng, cfg, B=8, pad_id=PAD)
    ocfg = optim.AdamWConfig(lr=1e-2, warmup_steps=5, total_steps=60, weight_decay=0.0)
    state = optim.init_state(params)
    task = []
    for _ in range(60):
        losses, grads, _ = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD, rng=rng)
        task.append(losses["contrastive"] + losses["caption"])
        optim.step(params, grads, state, ocfg)
    assert task[-1] < task[0] / 5


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, match", [
    (dict(heads=3), "heads"),
    (dict(patch=3), "patch"),
    (dict(experts="sparse"), "experts"),
    (dict(top_k=5), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(fusion_layers=9), "fusion_layers"),
    (dict(density=1.5), "density"),
    (dict(load_balance=-1.0), "load_balance"),
    (dict(caption_weight=0.0, contrastive_weight=0.0), "caption_weight"),
    (dict(dtype="float16"), "dtype"),
    (dict(vocab_size=1), "vocab_size"),
])
def test_bad_config(overrides, match):
    base = dict(vocab_size=10, max_text_len=5)
    base.update(overrides)
    with pytest.raises((ValueError, TypeError), match=match):
        model_config.ModelConfig(**base)


def test_bad_config_dict():
    with pytest.raises(ValueError, match="unknown ModelConfig fields.*'wdith'"):
        model_config.ModelConfig.from_dict({"vocab_size": 10, "max_text_len": 5, "wdith": 3})


def test_bad_batch_inputs():
    cfg, params, images, ids, _ = setup(13, "shared")
    call = model.loss_and_grads
    with pytest.raises(ValueError, match="images must have shape"):
        call(params, cfg, images[:, :2], ids, pad_id=PAD)
    with pytest.raises(TypeError, match="images must have the model dtype float64"):
        call(params, cfg, images.astype(np.float32), ids, pad_id=PAD)
    with pytest.raises(ValueError, match="ids must be in"):
        call(params, cfg, images, ids + 100, pad_id=PAD)
    with pytest.raises(ValueError, match="ids must have shape"):
        call(params, cfg, images, np.ones((3, 9), dtype=np.int64), pad_id=PAD)
    with pytest.raises(ValueError, match="ids must have one row per image"):
        call(params, cfg, images, ids[:2], pad_id=PAD)
    bad = ids.copy()
    bad[1] = PAD
    with pytest.raises(ValueError, match="all-pad row at index 1"):
        call(params, cfg, images, bad, pad_id=PAD)
    with pytest.raises(ValueError, match="keys must have shape"):
        call(params, cfg, images, ids, pad_id=PAD, keys=np.arange(5))
    with pytest.raises(ValueError, match="pad_id"):
        call(params, cfg, images, ids, pad_id=99)
    with pytest.raises(TypeError, match="cfg must be a ModelConfig"):
        call(params, {"width": 8}, images, ids, pad_id=PAD)
    with pytest.raises(ValueError, match="max_len"):
        inference.greedy_decode(params, cfg, images, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                                max_len=cfg.max_text_len + 1)


# ----------------------------------------------------------------------------- gates

def test_gate_default_is_raw_for_top1_and_renormalized_for_topk():
    for top_k, want in ((1, False), (2, True), (4, True)):
        cfg = model_config.ModelConfig(vocab_size=21, max_text_len=6, num_experts=4, top_k=top_k)
        assert cfg.renormalize == "auto" and cfg.moe_config().renormalize is want
        assert moe_config.MoEConfig(num_experts=4, k=top_k).renormalize is want
    assert runs.preset_configs("default")[0].moe_config().renormalize is False


def test_top1_renormalized_is_refused_unless_opted_in():
    with pytest.raises(ValueError, match="router would get no gradient from the task loss"):
        model_config.ModelConfig(vocab_size=21, max_text_len=6, top_k=1, renormalize=True)
    with pytest.raises(ValueError, match="task_blind_top1=True"):
        moe_config.MoEConfig(num_experts=3, k=1, renormalize=True)
    cfg = model_config.ModelConfig(vocab_size=21, max_text_len=6, top_k=1, renormalize=True,
                            task_blind_top1=True)
    assert cfg.moe_config().renormalize is True and cfg.moe_config().task_blind_top1
    with pytest.raises(ValueError, match="applies only to k=1 with renormalize=True, got k=2"):
        model_config.ModelConfig(vocab_size=21, max_text_len=6, top_k=2, task_blind_top1=True)
    with pytest.raises(ValueError, match="renormalize must be 'auto', True or False, got 'yes'"):
        moe_config.MoEConfig(num_experts=3, k=2, renormalize="yes")
    with pytest.raises(TypeError, match="task_blind_top1 must be a bool"):
        model_config.ModelConfig(vocab_size=21, max_text_len=6, task_blind_top1=1)


def test_config_dict_of_a_task_blind_run_is_the_old_default_and_round_trips():
    """Before renormalize="auto", every preset saved top_k 1 and renormalize true; such a
    dict loads with task_blind_top1 set, and the opt-in writes that very dict again."""
    blind = model_config.ModelConfig(vocab_size=21, max_text_len=6, renormalize=True,
                              task_blind_top1=True)
    d = blind.to_dict()
    assert "task_blind_top1" not in d and d["renormalize"] is True and d["top_k"] == 1
    assert model_config.ModelConfig.from_dict(d) == blind
    auto = model_config.ModelConfig(vocab_size=21, max_text_len=6)
    assert auto.to_dict()["renormalize"] == "auto"
    assert model_config.ModelConfig.from_dict(json.loads(json.dumps(auto.to_dict()))) == auto
    assert not model_config.ModelConfig.from_dict({**d, "renormalize": False}).task_blind_top1


def test_a_run_saved_with_the_old_top1_renormalized_default_loads_and_resumes(tmp_path, capsys):
    mcfg, tcfg = runs.preset_configs("tiny", steps=4, eval_every=2)
    mcfg = dataclasses.replace(mcfg, renormalize=True, task_blind_top1=True)
    out = tmp_path / "old"
    train.train(mcfg, tcfg, str(out), stop_at=2, progress=None, decode_eval=False)
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["renormalize"] is True and saved["top_k"] == 1
    assert "task_blind_top1" not in saved                     # what an old run holds
    assert cli.main(["eval", str(out), "--no-decode"]) == 0
    assert cli.main(["caption", str(out), "--n", "2"]) == 0
    assert cli.main(["retrieve", str(out), "a small red circle", "--top", "2"]) == 0
    assert cli.main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    assert [r["step"] for r in run_folder.read_metrics(out)] == [2, 4]


def router_grads(grads):
    """{path: gradient} of every router weight of a gradient tree."""
    return {p: g for p, g in flatten(grads).items() if ".router." in p}


def router_task_norm(cfg, seed=0, B=4):
    rng = np.random.default_rng(seed)
    params = model.init(rng, cfg)
    images, ids = tiny_batch(rng, cfg, B=B)
    _, grads, _ = model.loss_and_grads(params, cfg, images, ids, pad_id=PAD)
    found = router_grads(grads)
    assert found, "the config has no router"
    return max(float(np.abs(g.data if sp.issparse(g) else g).max()) for g in found.values())


def test_default_preset_router_gets_a_task_gradient_and_old_top1_renormalized_none():
    """Every auxiliary weight 0: the router's gradient is the task's alone."""
    cfg = dataclasses.replace(runs.preset_configs("default")[0], **NO_AUX)
    assert cfg.top_k == 1
    assert router_task_norm(cfg) > 1e-6
    blind = dataclasses.replace(cfg, renormalize=True, task_blind_top1=True)
    assert router_task_norm(blind) == 0.0                      # the gate p/p = 1


@pytest.mark.parametrize("mode, label, overrides", ROUTER_TASK)
def test_router_task_cases_have_a_nonzero_router_task_gradient(mode, label, overrides):
    assert router_task_norm(tiny_config(mode, **overrides)) > 1e-4


def _zero_gate_gradient(orig):
    def backward(dgates, cache, *args, **kwargs):              # the gate treated as constant
        return orig(np.zeros_like(dgates), cache, *args, **kwargs)
    return backward


def _constant_renormalizer(orig):
    def backward(dgates, cache, *args, **kwargs):              # drops the sum_i dg g term
        return orig(dgates, cache._replace(gates=np.zeros_like(cache.gates)), *args, **kwargs)
    return backward


@pytest.mark.parametrize("mode, label, breaker", [
    (ROUTER_TASK[0][0], ROUTER_TASK[0][1], _constant_renormalizer),
    (ROUTER_TASK[1][0], ROUTER_TASK[1][1], _zero_gate_gradient)])
def test_router_task_gradcheck_rows_pass_and_catch_a_wrong_router_backward(
        mode, label, breaker, monkeypatch):
    name = router_task_case_name(mode, label)
    case, = [c for c in testing.all_cases(np.random.default_rng(3)) if c.op == name]
    assert all(row.passed for row in check_case(case, np.random.default_rng(1)))
    monkeypatch.setattr(router, "backward", breaker(router.backward))
    rows = {row.argument: row for row in check_case(case, np.random.default_rng(1))}
    assert not rows["c.blocks/0"].passed                       # the router's block


# ---- where the experts go (moe_modalities, VL-MoE's Table 3 ablation)

def _loss_and_grad_leaves(cfg, seed=8):
    rng = np.random.default_rng(seed)
    params = tiny_params(rng, cfg)
    images, ids = tiny_batch(rng, cfg)
    losses, grads, _ = model.loss_and_grads(params, cfg, images, ids, pad_id=0,
                                            keys=np.array([0, 1, 0]), rng=rng, train=True)
    leaves = {k: (v.data if isinstance(v, sp.csr_array) else v)
              for k, v in flatten(grads).items()}
    return losses, leaves


def test_moe_modalities_both_is_todays_modality_mode():
    """"both" is the default and the config of a run saved before the field existed; its
    losses and gradients are bit-identical to those, and to the value the code gave just
    before the field existed (commit 952a84a, raw top-1 gates: total 6.849791917242887
    with this seed)."""
    cfg = tiny_config("modality")
    assert cfg.moe_modalities == "both"
    old = cfg.to_dict()
    del old["moe_modalities"]                                      # a config.json of before
    assert model_config.ModelConfig.from_dict(old) == cfg
    losses, leaves = _loss_and_grad_leaves(cfg)
    losses2, leaves2 = _loss_and_grad_leaves(tiny_config("modality", moe_modalities="both"))
    assert losses == losses2 and leaves.keys() == leaves2.keys()
    for k in leaves:
        assert np.array_equal(leaves[k], leaves2[k]), k
    assert losses["total"] == pytest.approx(6.849791917242887, rel=1e-12, abs=0)
    assert [k for k, _ in cfg.layer_kinds()] == ["moe", "ffn"]


@pytest.mark.parametrize("where", ["image", "text"])
def test_moe_modalities_one_side_params_and_compute(where):
    cfg = model_config.ModelConfig(vocab_size=10, max_text_len=5, experts="modality", layers=4,
                            mlp_hidden=48, expert_hidden=24, top_k=2, moe_every=2,
                            moe_modalities=where)
    assert [k for k, _ in cfg.layer_kinds()] == ["ffn", "split", "ffn", "ffn"]
    block = model.init(np.random.default_rng(0), cfg)["blocks"]["1"]
    assert set(block["moe"]) == {"router", "experts"}              # one pool
    assert len(block["moe"]["experts"]) == cfg.num_experts
    assert block["ffn"]["fc1"]["W"].shape[0] == 24 * 2             # the same active width


def test_moe_modalities_one_side_routes_only_its_tokens():
    """The image-only layer routes exactly the image tokens the "both" layer sends to its
    image pool, the text-only layer exactly the text tokens; the other pool is gone."""
    routed = {}
    for where in ("both", "image", "text"):
        cfg = tiny_config("modality", moe_modalities=where)
        params = tiny_params(np.random.default_rng(1), cfg)
        images, ids = tiny_batch(np.random.default_rng(2), cfg)     # the same batch each time
        _, stats, _ = model.forward(params, cfg, images, ids, pad_id=0)
        pools = stats["moe"]["blocks.0"]["pools"]
        assert set(pools) == ({"image", "text"} if where == "both" else {where})
        routed[where] = {name: sum(pool["routed"]) for name, pool in pools.items()}
        # one modality alone (inference): the other sublayer sees no rows
        assert inference.encode_images(params, cfg, images).shape == (3, cfg.embed_dim)
    assert routed["image"]["image"] == routed["both"]["image"] == 3 * (1 + cfg.num_patches)
    assert routed["text"]["text"] == routed["both"]["text"] > 0


@pytest.mark.parametrize("where", ["image", "text"])
def test_moe_modalities_one_side_gradients(where):
    cfg = tiny_config("modality", moe_modalities=where)
    rng = np.random.default_rng(2)
    params = tiny_params(rng, cfg)
    images, ids = tiny_batch(rng, cfg)
    case = directional_case(f"model(moe_modalities={where})", params, cfg, images, ids,
                            pad_id=0, keys=np.array([0, 1, 0]), rng=rng)
    assert_gradients(case, rng)


def test_moe_modalities_refused_outside_modality_mode():
    with pytest.raises(ValueError, match="moe_modalities must be 'both' unless"):
        tiny_config("shared", moe_modalities="image")
    with pytest.raises(ValueError, match="moe_modalities"):
        tiny_config("modality", moe_modalities="both_")
