"""Tests of sparse upcycling: minivlmoe/compress/upcycle.py and ``minivlmoe upcycle``."""

import dataclasses
import json

import numpy as np
import pytest

from minivlmoe import cli, model, run_folder
from minivlmoe.compress import upcycle
from minivlmoe.moe import moe_layer
from minivlmoe.moe.moe_config import resolve_renormalize
from minivlmoe.ops import ffn
from minivlmoe.testing.model import NO_AUX, tiny_batch, tiny_config, tiny_params
from minivlmoe.tree import flatten

from conftest import same_trees

PAD = 0


def parent_and_child(mode="shared", E=3, k=1, seed=0, noise=0.0, **overrides):
    parent_cfg = tiny_config("dense", **{**NO_AUX, **overrides})
    rng = np.random.default_rng(seed)
    parent = tiny_params(rng, parent_cfg)
    cfg = upcycle.upcycle_config(parent_cfg, num_experts=E, top_k=k, mode=mode)
    fresh = model.init(rng, cfg)
    child = upcycle.upcycle_params(parent, parent_cfg, cfg, fresh, noise=noise, rng=rng)
    return parent_cfg, parent, cfg, fresh, child


def pools(cfg, block):
    return [block["moe"]] if cfg.experts == "shared" else [block["moe"]["image"],
                                                          block["moe"]["text"]]


# ----------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("mode", ["shared", "modality"])
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_every_expert_starts_equal_to_the_parent_ffn_and_the_rest_is_copied(mode, density):
    parent_cfg, parent, cfg, fresh, child = parent_and_child(mode, density=density)
    moe = upcycle.moe_blocks(cfg)
    assert moe == ([0, 1] if mode == "shared" else [0])       # fusion layer 1 stays dense
    for i in moe:
        block = child["blocks"][str(i)]
        assert "ffn" not in block
        for pool, fresh_pool in zip(pools(cfg, block), pools(cfg, fresh["blocks"][str(i)])):
            assert list(pool["experts"]) == [f"e{e}" for e in range(cfg.num_experts)]
            for expert in pool["experts"].values():
                same_trees(expert, parent["blocks"][str(i)]["ffn"])
                assert expert["fc1"]["W"] is not parent["blocks"][str(i)]["ffn"]["fc1"]["W"]
            same_trees(pool["router"], fresh_pool["router"])   # the fresh router
    # everything else is the parent's, bit for bit
    rest = {k: v for k, v in flatten(child).items() if ".moe." not in f".{k}."}
    want = {k: v for k, v in flatten(parent).items()
            if not any(k.startswith(f"blocks.{i}.ffn") for i in moe)}
    assert rest.keys() == want.keys()
    for key in rest:
        same_trees({"x": rest[key]}, {"x": want[key]})
    assert flatten(child).keys() == flatten(fresh).keys()


def test_noise_is_relative_to_each_weight_and_spares_biases_and_patterns():
    _, parent, cfg, _, child = parent_and_child(noise=0.1, density=0.5)
    ref = parent["blocks"]["0"]["ffn"]
    experts = child["blocks"]["0"]["moe"]["experts"]
    for layer in ("fc1", "fc2"):
        W = ref[layer]["W"]
        rms = np.sqrt(np.mean(W.data ** 2))
        diffs = []
        for expert in experts.values():
            V = expert[layer]["W"]
            assert np.array_equal(V.indices, W.indices) and np.array_equal(V.indptr, W.indptr)
            assert np.array_equal(expert[layer]["b"], ref[layer]["b"])
            diffs.append(V.data - W.data)
        d = np.concatenate(diffs)
        assert 0.07 * rms < d.std() < 0.13 * rms                 # std noise * rms(W)
        assert not np.array_equal(diffs[0], diffs[1])           # independent per expert


def test_upcycled_widths_follow_the_parent_ffn_at_moe_positions():
    parent_cfg = tiny_config("dense", top_k=2, mlp_hidden=6, expert_hidden=3)
    assert [h for _, h in parent_cfg.layer_kinds()] == [6, 6]     # expert_hidden * top_k
    cfg = upcycle.upcycle_config(parent_cfg, num_experts=4, top_k=2)
    assert (cfg.expert_hidden, cfg.top_k, cfg.num_experts, cfg.experts) == (6, 2, 4, "shared")
    assert upcycle.upcycle_config(parent_cfg, num_experts=2).expert_hidden == 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=1), "num_experts must be"),
    (dict(num_experts=3, top_k=4), "top_k must be in"),
    (dict(num_experts=3, top_k=0), "top_k must be in"),
    (dict(num_experts=3, mode="dense"), "mode"),
    (dict(num_experts=3, top_k=2, mode="modality"), "block 1 width 12, but the parent's is 6"),
])
def test_bad_upcycle_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        upcycle.upcycle_config(tiny_config("dense"), **kwargs)


def test_only_a_dense_run_can_be_upcycled():
    with pytest.raises(upcycle.UpcycleError, match="must be dense.*got experts='shared'"):
        upcycle.upcycle_config(tiny_config("shared"), num_experts=2)


# ----------------------------------------------------------------------------- gate scaling

@pytest.mark.parametrize("mode", ["shared", "modality"])
def test_top1_raw_moe_layer_is_the_parent_ffn_scaled_by_the_router_probability(mode):
    """y[n] = p_max[n] * FFN(x[n]) exactly (raw top-1 gates, all experts equal, dropless)."""
    parent_cfg, parent, cfg, _, child = parent_and_child(mode, E=3, k=1)
    mcfg = cfg.moe_config()
    assert mcfg.capacity_factor is None and mcfg.k == 1
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, cfg.width))                      # (N, D)
    modality = rng.integers(0, 2, size=40)                        # (N,)
    params = child["blocks"]["0"]["moe"]
    y, aux, _ = moe_layer.forward(x, params, mcfg, modality)      # (N, D)
    dense, _ = ffn.forward(x, parent["blocks"]["0"]["ffn"])       # (N, D)
    p_max = np.zeros(40)
    for name, pool in (("shared", params),) if mode == "shared" else (
            ("image", params["image"]), ("text", params["text"])):
        rows = slice(None) if mode == "shared" else modality == ("image", "text").index(name)
        logits = x[rows] @ pool["router"]["W"].T + pool["router"]["b"]  # (n, E)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p_max[rows] = (p / p.sum(1, keepdims=True)).max(1)        # (n,)
    assert aux.dropped_fraction == 0
    assert 1 / 3 < p_max.min() and p_max.max() < 1
    np.testing.assert_allclose(y, p_max[:, None] * dense, rtol=1e-12, atol=1e-13)


def model_outputs(params, cfg, seed=2):
    rng = np.random.default_rng(seed)
    images, ids = tiny_batch(rng, cfg, B=4, pad_id=PAD)
    losses, _, cache = model.forward(params, cfg, images, ids, pad_id=PAD,
                                     keys=np.arange(4))
    return losses, cache.img_norm.y, cache.txt_norm.y


@pytest.mark.parametrize("mode, E, k", [("shared", 3, 2), ("shared", 4, 4),
                                        ("modality", 3, 2)])
def test_renormalized_upcycled_model_computes_exactly_what_its_parent_computes(mode, E, k):
    parent_cfg, parent, cfg, _, child = parent_and_child(mode, E=E, k=k, fusion_layers=0)
    assert resolve_renormalize(cfg.renormalize, cfg.top_k, cfg.task_blind_top1) is True
    lp, ip, tp = model_outputs(parent, parent_cfg)
    lc, ic, tc = model_outputs(child, cfg)
    for name in ("caption", "contrastive"):
        np.testing.assert_allclose(lc[name], lp[name], rtol=1e-12)
    np.testing.assert_allclose(ic, ip, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(tc, tp, rtol=1e-11, atol=1e-12)


def test_top1_raw_with_a_zero_router_is_the_parent_with_fc2_scaled_by_one_over_e():
    """p = 1/E exactly (ties go to expert 0, dropless), so y = FFN(x) / E."""
    parent_cfg, parent, cfg, _, child = parent_and_child("shared", E=4, k=1)
    scaled = upcycle.copy_tree(parent)
    for i in upcycle.moe_blocks(cfg):
        child["blocks"][str(i)]["moe"]["router"]["W"].data[:] = 0.0
        fc2 = scaled["blocks"][str(i)]["ffn"]["fc2"]
        fc2["W"].data *= 0.25
        fc2["b"] *= 0.25
    lc, ic, tc = model_outputs(child, cfg)
    ls, is_, ts = model_outputs(scaled, parent_cfg)
    lp, _, _ = model_outputs(parent, parent_cfg)
    for name in ("caption", "contrastive"):
        np.testing.assert_allclose(lc[name], ls[name], rtol=1e-12)
        assert abs(lc[name] - lp[name]) > 1e-6                    # not the unscaled parent
    np.testing.assert_allclose(ic, is_, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(tc, ts, rtol=1e-11, atol=1e-12)


def test_upcycle_params_refuses_a_config_that_is_not_the_upcycled_one():
    parent_cfg, parent, cfg, fresh, _ = parent_and_child()
    with pytest.raises(ValueError, match="cfg must be upcycle_config"):
        upcycle.upcycle_params(parent, parent_cfg, dataclasses.replace(cfg, expert_hidden=5),
                               fresh)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        upcycle.upcycle_params(parent, parent_cfg, cfg, fresh, noise=0.1)


# ----------------------------------------------------------------------------- the command

TINY = ["--preset", "tiny", "--steps", "6", "--eval-every", "3", "--quiet"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    assert cli.main(["train", *TINY, "--experts", "dense", "--out", str(out)]) == 0
    return out


def test_upcycle_cli_makes_an_ordinary_moe_run(dense_run, tmp_path, capsys):
    out = tmp_path / "up"
    assert cli.main(["upcycle", str(dense_run), "--experts", "3", "--steps", "4",
                     "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "3 shared experts, top-1" in text and "upcycled at step 0" in text
    config = json.loads((out / run_folder.CONFIG_NAME).read_text())
    assert config["model"]["experts"] == "shared" and config["model"]["num_experts"] == 3
    assert config["train"]["steps"] == 4
    info = json.loads((out / upcycle.UPCYCLE_NAME).read_text())
    assert info["parent_step"] == 6 and info["optimizer_moments"] == "reset"
    assert [r["step"] for r in run_folder.read_metrics(out)] == [3, 4]
    assert [r["step"] for r in run_folder.read_history(out)] == [1, 2, 3, 4]
    assert cli.main(["eval", str(out), "--no-decode"]) == 0
    assert cli.main(["caption", str(out), "--n", "2"]) == 0
    assert cli.main(["retrieve", str(out), "a red circle"]) == 0
    assert cli.main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    assert "already complete (4 steps)" in capsys.readouterr().out
    # a second upcycle into the same folder needs --overwrite
    assert cli.main(["upcycle", str(dense_run), "--experts", "2", "--out", str(out)]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_upcycling_is_deterministic_and_records_the_parent_updates(dense_run, tmp_path):
    from minivlmoe import checkpoint
    from minivlmoe.run_checkpoint import load_checkpoint

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        upcycle.upcycle_run(str(dense_run), str(out), num_experts=2, steps=2, noise=0.01)
    ckpt_a, *_ = load_checkpoint(str(a / run_folder.CKPT_NAME))
    ckpt_b, *_ = load_checkpoint(str(b / run_folder.CKPT_NAME))
    same_trees(ckpt_a.params, ckpt_b.params)
    assert ckpt_a.extra["prior_updates"] == 6                      # the parent's steps
    # the logit-scale reach counts the parent's updates; a bad count is refused
    path = str(a / run_folder.CKPT_NAME)
    for bad in (-1, "6"):
        checkpoint.save(path, params=ckpt_a.params, opt_state=ckpt_a.opt_state,
                        step=ckpt_a.step, config=ckpt_a.config, rng_state=ckpt_a.rng_state,
                        extra={**ckpt_a.extra, "prior_updates": bad})
        with pytest.raises(checkpoint.CheckpointError, match="prior_updates"):
            load_checkpoint(path)


@pytest.mark.parametrize("argv, status, message", [
    (["--experts", "1"], 2, "expected an integer >= 2"),
    (["--experts", "2", "--top-k", "3"], 2, "--top-k must be in [1, --experts=2], got 3"),
    (["--experts", "2", "--noise", "-1"], 2, "expected a finite number >= 0"),
    (["--experts", "2", "--mode", "dense"], 2, "invalid choice"),
])
def test_upcycle_bad_arguments_are_usage_errors(dense_run, tmp_path, capsys, argv, status,
                                                message):
    with pytest.raises(SystemExit) as e:
        cli.main(["upcycle", str(dense_run), *argv, "--out", str(tmp_path / "x")])
    assert e.value.code == status
    assert message in capsys.readouterr().err


def test_upcycle_refuses_a_missing_or_moe_run_in_one_line(dense_run, tmp_path, capsys):
    assert cli.main(["upcycle", str(tmp_path / "none"), "--experts", "2",
                     "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run to upcycle" in err
    moe = tmp_path / "moe"
    assert cli.main(["upcycle", str(dense_run), "--experts", "2", "--steps", "2",
                     "--out", str(moe), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["upcycle", str(moe), "--experts", "2", "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be dense" in err
    assert not (tmp_path / "y").exists()
