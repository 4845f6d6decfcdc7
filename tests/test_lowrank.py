"""Low-rank layers: the factored op, the dispatch, Eckart-Young, the conversion, factored runs."""

import dataclasses
import json

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe import checkpoint, model, model_config, optim, run_folder, runs, train
from minivlmoe.compress import lowrank
from minivlmoe.gradcheck import GradcheckCase, assert_gradients, check_case
from minivlmoe.ops import linear, lowrank_linear, sparse_linear
from minivlmoe.run_checkpoint import load_checkpoint
from minivlmoe.testing import model as tmodel
from minivlmoe.testing.ops import lowrank_params, naive_lowrank_forward
from minivlmoe.tree import flatten

from conftest import readonly, same_trees, without_time

SEEDS = st.integers(0, 2**32 - 1)
SIZES = st.integers(1, 9)


def dense_params(seed, d_in, d_out, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = sparse_linear.init(rng, d_in, d_out, 1.0, dtype=dtype)
    params["b"] = rng.standard_normal(d_out).astype(dtype)
    return rng, params


# ----------------------------------------------------------------------------- the op

@given(seed=SEEDS, d_in=SIZES, d_out=SIZES)
def test_full_rank_reproduces_the_weight_to_rounding(seed, d_in, d_out):
    _, params = dense_params(seed, d_in, d_out)
    f = lowrank_linear.from_dense(params, min(d_in, d_out))
    W = params["W"].toarray()
    np.testing.assert_allclose(f["B"].toarray() @ f["A"].toarray(), W, rtol=0,
                               atol=1e-12 * max(1.0, np.abs(W).max()))
    np.testing.assert_array_equal(f["b"], params["b"])


@given(seed=SEEDS, d_in=SIZES, d_out=SIZES, data=st.data())
def test_factors_are_balanced_canonical_dense_csr(seed, d_in, d_out, data):
    """A A^T = B^T B = diag(S_r): the singular values split evenly (sqrt(S) each)."""
    _, params = dense_params(seed, d_in, d_out)
    r = data.draw(st.integers(1, min(d_in, d_out)))
    f = lowrank_linear.from_dense(params, r)
    A, B = f["A"].toarray(), f["B"].toarray()
    s = np.linalg.svd(params["W"].toarray(), compute_uv=False)[:r]
    np.testing.assert_allclose(A @ A.T, np.diag(s), atol=1e-12)
    np.testing.assert_allclose(B.T @ B, np.diag(s), atol=1e-12)
    for leaf, shape in ((f["A"], (r, d_in)), (f["B"], (d_out, r))):
        assert isinstance(leaf, sp.csr_array) and leaf.shape == shape
        assert leaf.nnz == shape[0] * shape[1] and leaf.has_canonical_format


@given(seed=SEEDS, d_in=st.integers(2, 12), d_out=st.integers(2, 12), data=st.data())
def test_eckart_young_spectral_error_is_the_next_singular_value(seed, d_in, d_out, data):
    """||W - B A||_2 = sigma_{r+1} for the rank-r truncation, and the Frobenius error^2
    is the sum of the dropped sigma^2."""
    _, params = dense_params(seed, d_in, d_out)
    r = data.draw(st.integers(1, min(d_in, d_out) - 1))
    f = lowrank_linear.from_dense(params, r)
    W = params["W"].toarray()
    err = W - f["B"].toarray() @ f["A"].toarray()
    s = np.linalg.svd(W, compute_uv=False)
    assert np.linalg.norm(err, 2) == pytest.approx(s[r], rel=1e-9, abs=1e-12)
    assert np.linalg.norm(err) ** 2 == pytest.approx(np.sum(s[r:] ** 2), rel=1e-9, abs=1e-12)


@given(seed=SEEDS, d_in=SIZES, d_out=SIZES, lead=st.sampled_from([(1,), (3,), (2, 3)]),
       data=st.data())
def test_lowrank_linear_gradients(seed, d_in, d_out, lead, data):
    rng = np.random.default_rng(seed)
    params = lowrank_params(rng, d_in, d_out, data.draw(st.integers(1, min(d_in, d_out))))
    case = GradcheckCase("lowrank_linear", {"x": rng.standard_normal((*lead, d_in)),
                                            "params": params},
                         lambda a: lowrank_linear.forward(a["x"], a["params"]),
                         lambda dout, c: dict(zip(("x", "params"),
                                                  lowrank_linear.backward(dout, c))))
    assert_gradients(case, rng)


@given(seed=SEEDS, d_in=SIZES, d_out=SIZES, n=st.integers(1, 5), data=st.data())
def test_lowrank_forward_matches_naive_loops(seed, d_in, d_out, n, data):
    rng = np.random.default_rng(seed)
    params = lowrank_params(rng, d_in, d_out, data.draw(st.integers(1, min(d_in, d_out))))
    x = rng.standard_normal((n, d_in))
    y, _ = lowrank_linear.forward(x, params)
    np.testing.assert_allclose(y, naive_lowrank_forward(x, params["A"], params["B"],
                                                        params["b"]), rtol=1e-12, atol=1e-12)


def test_lowrank_backward_leaves_dy_alone_and_keeps_patterns():
    rng = np.random.default_rng(0)
    params = lowrank_params(rng, 6, 5, 2)
    y, cache = lowrank_linear.forward(rng.standard_normal((4, 6)), params)
    dy = rng.standard_normal(y.shape)
    readonly(dy)                                        # a write into dy would raise
    dx, grads = lowrank_linear.backward(dy, cache)
    assert sorted(grads) == ["A", "B", "b"] and dx.shape == (4, 6)
    for key in ("A", "B"):
        np.testing.assert_array_equal(grads[key].indices, params[key].indices)
        np.testing.assert_array_equal(grads[key].indptr, params[key].indptr)


def test_a_missing_term_in_the_factored_backward_is_caught(monkeypatch):
    """The gradient check can fail: drop the second factor's weight gradient term."""
    rng = np.random.default_rng(1)
    params = lowrank_params(rng, 5, 4, 2)
    real = lowrank_linear.backward

    def broken(dy, cache):
        dx, g = real(dy, cache)
        return dx, {**g, "B": sp.csr_array(g["B"] * 0.5)}
    case = GradcheckCase("lowrank_linear", {"x": rng.standard_normal((3, 5)), "params": params},
                         lambda a: lowrank_linear.forward(a["x"], a["params"]),
                         lambda dout, c: dict(zip(("x", "params"), broken(dout, c))))
    assert not all(row.passed for row in check_case(case, rng))


def test_linear_dispatches_by_keys_and_sparse_path_is_untouched():
    rng, params = dense_params(0, 6, 5)
    x = rng.standard_normal((3, 6))
    y1, c1 = linear.forward(x, params)
    y2, c2 = sparse_linear.forward(x, params)
    np.testing.assert_array_equal(y1, y2)
    assert type(c1) is sparse_linear.Cache
    assert linear.output(c1) == ((3,), 5, np.float64)
    f = lowrank_linear.from_dense(params, 5)
    y3, c3 = linear.forward(x, f)
    assert type(c3) is lowrank_linear.Cache and linear.output(c3) == ((3,), 5, np.float64)
    np.testing.assert_allclose(y3, y2, atol=1e-12)           # full rank: the same layer
    dx3, g3 = linear.backward(np.ones_like(y3), c3)
    assert sorted(g3) == ["A", "B", "b"]
    with pytest.raises(ValueError, match=r"params\['B'\] must have shape \(Dout, r=5\)"):
        linear.forward(x, {**f, "B": f["A"]})
    with pytest.raises(ValueError, match="rank must be in"):
        lowrank_linear.from_dense(params, 6)


# ----------------------------------------------------------------------------- the config

def test_model_config_lowrank_round_trip_and_defaults():
    cfg = tmodel.tiny_config("dense")
    assert cfg.lowrank == {} and "lowrank" not in cfg.to_dict()   # old config.json unchanged
    assert model_config.ModelConfig.from_dict(cfg.to_dict()) == cfg
    f = dataclasses.replace(cfg, lowrank={"blocks.1.attn.q": 2, "blocks.0.attn.k": 3})
    d = json.loads(json.dumps(f.to_dict()))
    assert d["lowrank"] == {"blocks.0.attn.k": 3, "blocks.1.attn.q": 2}      # sorted
    assert model_config.ModelConfig.from_dict(d) == f
    with pytest.raises(ValueError, match=r"lowrank\['blocks.0.attn.q'\] must be in \[1"):
        dataclasses.replace(cfg, lowrank={"blocks.0.attn.q": 0})
    same = dataclasses.replace(cfg, lowrank={"blocks.0.attn.k": 3, "blocks.1.attn.q": 2})
    assert same == f and hash(same) == hash(f) and hash(cfg) != hash(f)   # still hashable
    with pytest.raises(TypeError, match="lowrank must be a dict"):
        dataclasses.replace(cfg, lowrank=[("blocks.0.attn.q", 2)])


def test_model_init_factors_exactly_the_configured_layers():
    cfg = tmodel.tiny_config("shared")
    f = dataclasses.replace(cfg, lowrank={"blocks.0.attn.q": 2,
                                          "blocks.1.moe.experts.e1.fc2": 3})
    plain, fact = (model.init(np.random.default_rng(5), c) for c in (cfg, f))
    pf, ff = flatten(plain), flatten(fact)
    assert set(ff) - set(pf) == {"blocks.0.attn.q.A", "blocks.0.attn.q.B",
                                 "blocks.1.moe.experts.e1.fc2.A",
                                 "blocks.1.moe.experts.e1.fc2.B"}
    for path, leaf in pf.items():                     # same draws: other leaves identical
        if path in ff:
            a, b = (x.toarray() if sp.issparse(x) else x for x in (leaf, ff[path]))
            np.testing.assert_array_equal(a, b)
    q = fact["blocks"]["0"]["attn"]["q"]
    assert q["A"].shape == (2, 8) and q["B"].shape == (8, 2)
    with pytest.raises(ValueError, match="'blocks.0.attn.x' must name a linear layer"):
        model.init(np.random.default_rng(0),
                   dataclasses.replace(cfg, lowrank={"blocks.0.attn.x": 2}))
    with pytest.raises(ValueError, match="'blocks.0.attn.q' .*rank must be in \\[1, 8\\]"):
        model.init(np.random.default_rng(0),
                   dataclasses.replace(cfg, lowrank={"blocks.0.attn.q": 9}))


def test_factored_model_gradient_check():
    """The registry row: every linear layer but the routers factored (rank 3)."""
    rng = np.random.default_rng(3)
    cfg = tmodel.lowrank_config("shared")
    params = tmodel.tiny_params(rng, cfg)
    assert any(path.endswith(".A") for path in flatten(params))
    images, ids = tmodel.tiny_batch(rng, cfg)
    case = tmodel.directional_case("model(lowrank)", params, cfg, images, ids, pad_id=0,
                                   keys=np.array([0, 1, 0]), rng=rng)
    assert_gradients(case, rng)


# ----------------------------------------------------------------------------- conversion

def trained_like(experts="modality"):
    cfg = tmodel.tiny_config(experts, dtype="float32")
    return model.init(np.random.default_rng(0), cfg), cfg


def test_lowrank_params_rank_report_and_structure():
    params, cfg = trained_like()
    new, new_cfg, report = lowrank.lowrank_params(params, cfg, rank=2)
    paths = lowrank.eligible_paths(params)
    assert [row["name"] for row in report] == paths == sorted(new_cfg.lowrank, key=paths.index)
    assert all(".router" not in p and not p.startswith(("patch", "lm_head")) for p in paths)
    assert any(".experts.e0.fc1" in p for p in paths) and "blocks.0.attn.o" in paths
    for row in report:
        out, inn = row["shape"]
        assert row["rank"] == 2 and new_cfg.lowrank[row["name"]] == 2
        assert row["params_before"] == out * inn and row["params_after"] == 2 * (out + inn)
        assert row["flops_before"] == 2 * out * inn
        assert row["flops_after"] == 4 * (out + inn)
        assert 0 < row["energy"] <= 1 and row["saves"] == (2 * (out + inn) < out * inn)
    # the structure model.init rebuilds from the new config: same keys, shapes, dtypes
    template = model.init(np.random.default_rng(1), new_cfg)
    assert {k: (v.shape, v.dtype) for k, v in flatten(template).items()} == \
        {k: (v.shape, v.dtype) for k, v in flatten(new).items()}
    assert "W" in params["blocks"]["0"]["attn"]["q"]           # the input is not modified
    t = lowrank.totals(report)
    assert t["params_ratio"] == t["params_after"] / t["params_before"]
    assert "total" in lowrank.format_report(report)


def test_lowrank_params_full_rank_keeps_the_model_outputs():
    params, cfg = trained_like("dense")
    cfg64 = dataclasses.replace(cfg, dtype="float64")
    params = model.init(np.random.default_rng(0), cfg64)
    new, new_cfg, report = lowrank.lowrank_params(params, cfg64, rank=8)  # full rank
    assert {row["name"]: row["rank"] for row in report}["blocks.0.ffn.fc1"] == 6  # clipped
    images, ids = tmodel.tiny_batch(np.random.default_rng(2), cfg64)
    a = model.losses_only(params, cfg64, images, ids, pad_id=0)
    b = model.losses_only(new, new_cfg, images, ids, pad_id=0)
    for key in ("contrastive", "caption"):
        assert a[key] == pytest.approx(b[key], rel=1e-10)


@given(seed=SEEDS, energy=st.floats(0.05, 1.0))
def test_energy_rank_is_the_smallest_rank_keeping_the_energy(seed, energy):
    s = np.sort(np.random.default_rng(seed).random(7))[::-1]
    r = lowrank.energy_rank(s, energy)
    kept = np.cumsum(s ** 2) / np.sum(s ** 2)
    assert kept[r - 1] >= energy - 1e-12
    assert r == 1 or kept[r - 2] < energy - 1e-12


def test_lowrank_params_by_energy():
    params, cfg = trained_like()
    _, new_cfg, report = lowrank.lowrank_params(params, cfg, energy=0.5)
    for row in report:
        assert row["energy"] >= 0.5 - 1e-12 and new_cfg.lowrank[row["name"]] == row["rank"]
    _, _, full = lowrank.lowrank_params(params, cfg, energy=1.0)
    assert all(row["rank"] == min(row["shape"]) for row in full)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, r"rank \(at most the largest min\(in, out\) of the factored "
                               r"weights, 8\) must be in \[1, 8\], got 0"),
    (dict(rank=9), ValueError, r"rank .* must be in \[1, 8\], got 9"),
    (dict(rank=1.5), TypeError, r"rank .* must be an int"),
    (dict(energy=0.0), ValueError, r"energy must be in \(0.0, 1.0\], got 0.0"),
    (dict(energy=1.5), ValueError, r"energy must be in \(0.0, 1.0\], got 1.5"),
    (dict(), ValueError, "exactly one of rank and energy"),
    (dict(rank=2, energy=0.5), ValueError, "exactly one of rank and energy"),
])
def test_lowrank_params_refuses_bad_rank_and_energy(kwargs, error, match):
    params, cfg = trained_like()
    with pytest.raises(error, match=match):
        lowrank.lowrank_params(params, cfg, **kwargs)


def test_lowrank_params_refuses_an_already_factored_tree():
    params, cfg = trained_like("dense")
    new, new_cfg, _ = lowrank.lowrank_params(params, cfg, rank=2)
    with pytest.raises(ValueError, match="no unfactored attention or FFN weight"):
        lowrank.lowrank_params(new, new_cfg, rank=2)


# ----------------------------------------------------------------------------- training

def test_converted_model_trains_saves_and_loads_with_model_init_structure(tmp_path):
    """Factor a (float32, tiny) model, take AdamW steps, save, load: the loaded
    checkpoint has model.init's structure for the new config and the same values."""
    params, cfg = trained_like("modality")
    new, new_cfg, _ = lowrank.lowrank_params(params, cfg, rank=3)
    rng = np.random.default_rng(4)
    images, ids = tmodel.tiny_batch(rng, new_cfg, B=4)
    state = optim.init_state(new)
    adamw = optim.AdamWConfig(lr=1e-2, warmup_steps=0, total_steps=5)
    first = None
    for _ in range(5):
        losses, grads, _ = model.loss_and_grads(new, new_cfg, images, ids, pad_id=0,
                                                keys=np.arange(4), rng=rng)
        first = losses["total"] if first is None else first
        optim.step(new, grads, state, adamw)
    assert model.losses_only(new, new_cfg, images, ids, pad_id=0,
                             keys=np.arange(4))["total"] < first
    assert optim.decays("blocks.0.attn.q.A") and optim.decays("blocks.0.attn.q.B")
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, params=new, opt_state=state, step=5,
                    config={"model": new_cfg.to_dict()}, rng_state={})
    ckpt = checkpoint.load(path)
    loaded_cfg = model_config.ModelConfig.from_dict(ckpt.config["model"])
    assert loaded_cfg == new_cfg
    template = model.init(np.random.default_rng(0), loaded_cfg)
    assert {k: v.shape for k, v in flatten(template).items()} == \
        {k: v.shape for k, v in flatten(ckpt.params).items()}
    same_trees(ckpt.params, new)


def test_factored_run_folder_is_written_and_resumes_exactly(tmp_path):
    """A run of a factored config (the tiny preset, library calls): config.json carries
    ``lowrank``, and stop + resume equals the uninterrupted run."""
    mcfg, tcfg = runs.preset_configs("tiny", experts="modality", steps=6, eval_every=3,
                                     batch_size=8, n_train=16, n_test=8)
    plain = model.init(np.random.default_rng(0), mcfg)
    _, fcfg, _ = lowrank.lowrank_params(plain, mcfg, rank=4)
    full = train.train(fcfg, tcfg, tmp_path / "full", progress=None, decode_eval=False)
    part = train.train(fcfg, tcfg, tmp_path / "part", stop_at=4, progress=None,
                       decode_eval=False)
    rest = train.train(fcfg, tcfg, tmp_path / "part", resume=True, progress=None,
                       decode_eval=False)
    assert part.history + rest.history == full.history
    assert without_time(run_folder.read_metrics(tmp_path / "part")) == \
        without_time(run_folder.read_metrics(tmp_path / "full"))
    same_trees(rest.params, full.params)
    saved = json.loads((tmp_path / "part" / "config.json").read_text())
    assert saved["model"]["lowrank"] == fcfg.lowrank
    ckpt, loaded_cfg, _, _ = load_checkpoint(tmp_path / "part" / "ckpt.npz")
    assert loaded_cfg == fcfg and "A" in ckpt.params["blocks"]["0"]["attn"]["q"]
