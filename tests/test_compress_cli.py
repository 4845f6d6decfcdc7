"""``minivlmoe compress`` on a tiny run: the output is an ordinary run folder on a pruned
pattern that fine-tuning never changes; bad arguments are usage errors or one line."""

import json
import os

import numpy as np
import pytest

from minivlmoe import checkpoint, cli, run_checkpoint, run_folder
from minivlmoe.compress import finetune, prune
from minivlmoe.tree import flatten

from conftest import one_error_line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("parent")
    assert cli.main(["train", "--preset", "tiny", "--quiet", "--steps", "6", "--out",
                     str(out)]) == 0
    return str(out)




def _patterns(params):
    return {p: (w.indices.copy(), w.indptr.copy()) for p, w in flatten(params).items()
            if hasattr(w, "indptr")}


@pytest.mark.parametrize("structure", ["unstructured", "row-group"])
def test_compress_oneshot_keeps_the_pruned_pattern_through_fine_tuning(tiny_run, tmp_path,
                                                                        capsys, structure):
    out = str(tmp_path / "pruned")
    assert cli.main(["compress", tiny_run, "--density", "0.25", "--structure", structure,
                     "--finetune-steps", "4", "--out", out, "--quiet", "--prune-ends"]) == 0
    printed = capsys.readouterr().out
    assert "ckpt.npz bytes:" in printed and "vs the parent:" in printed
    parent, _, _, _ = run_checkpoint.load_checkpoint(os.path.join(tiny_run, "ckpt.npz"))
    ckpt, model_cfg, train_cfg, _ = run_checkpoint.load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert ckpt.step == 4 == train_cfg.steps and model_cfg.density == 0.25
    expected, _ = prune.prune_params(parent.params, 0.25, structure, keep_ends=False)
    got = _patterns(ckpt.params)
    for path, (indices, indptr) in _patterns(expected).items():   # unchanged by 4 steps
        np.testing.assert_array_equal(got[path][0], indices)
        np.testing.assert_array_equal(got[path][1], indptr)
    values_moved = any(not np.array_equal(flatten(ckpt.params)[p].data, w.data)
                       for p, w in flatten(expected).items() if hasattr(w, "indptr"))
    assert values_moved                                       # it did fine-tune
    assert os.path.getsize(os.path.join(out, "ckpt.npz")) < os.path.getsize(
        os.path.join(tiny_run, "ckpt.npz"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["compressed"]["pattern_sha256"] == prune.pattern_digest(ckpt.params)
    assert config["compressed"]["structure"] == structure
    for command in (["eval", out], ["caption", out, "--n", "2"],
                    ["retrieve", out, "a small red circle", "--top", "1"],
                    ["train", "--out", out, "--resume", "--quiet"]):
        assert cli.main(command) == 0, command


def test_gradual_ends_on_the_final_density_and_resume_continues(tiny_run, tmp_path):
    out = str(tmp_path / "gradual")
    result = finetune.compress_run(tiny_run, out, density=0.25, schedule="gradual",
                                   finetune_steps=8, interval=2, progress=None)
    assert [t for t, _ in result.entry["prunings"]] == [2, 4, 6]
    ckpt, _, _, _ = run_checkpoint.load_checkpoint(os.path.join(out, "ckpt.npz"))
    for path, w in flatten(ckpt.params).items():
        if hasattr(w, "indptr") and prune.prunable(path, w):
            assert np.all(np.diff(w.indptr) == prune.row_count(0.25, w.shape[1])), path
    steps = [r["step"] for r in run_folder.read_history(out)]
    assert steps == list(range(1, 9))


def test_loading_checks_the_recorded_pattern(tiny_run, tmp_path):
    out = str(tmp_path / "pruned")
    finetune.compress_run(tiny_run, out, density=0.5, finetune_steps=2, progress=None)
    path = os.path.join(out, "ckpt.npz")
    ckpt = checkpoint.load(path)
    other, _ = prune.prune_params(ckpt.params, 0.25)           # another pattern
    checkpoint.save(path, params=other, opt_state=ckpt.opt_state, step=ckpt.step,
                    config=ckpt.config, rng_state=ckpt.rng_state, extra=ckpt.extra)
    with pytest.raises(checkpoint.CheckpointError, match="sparse patterns of the parameters "
                       "do not match the run's config"):
        run_checkpoint.load_checkpoint(path)


def test_compress_lowrank_writes_a_factored_run_folder(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "factored")
    assert cli.main(["compress", tiny_run, "--method", "lowrank", "--rank", "3",
                     "--finetune-steps", "3", "--out", out, "--quiet"]) == 0
    assert "ckpt.npz bytes:" in capsys.readouterr().out
    ckpt, model_cfg, train_cfg, _ = run_checkpoint.load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert ckpt.step == 3 == train_cfg.steps and model_cfg.lowrank
    factored = [p for p in flatten(ckpt.params) if p.endswith(".A")]
    assert factored and all(flatten(ckpt.params)[p].shape[0] <= 3 for p in factored)
    for command in (["eval", out], ["caption", out, "--n", "2"]):
        assert cli.main(command) == 0, command
    capsys.readouterr()


@pytest.mark.parametrize("argv", [
    ["--density", "0"], ["--density", "1.5"], ["--density", "-0.1"], ["--density", "x"],
    [],                                                       # magnitude needs --density
    ["--density", "0.5", "--rank", "2"],
    ["--method", "lowrank"], ["--method", "lowrank", "--rank", "2", "--energy", "0.9"],
    ["--method", "lowrank", "--rank", "0"], ["--method", "lowrank", "--energy", "1.5"],
    ["--method", "lowrank", "--rank", "400"],               # above every layer's min(in, out)
    ["--method", "lowrank", "--rank", "2", "--density", "0.5"],
    ["--method", "lowrank", "--rank", "2", "--prune-ends"],
    ["--density", "0.5", "--interval", "3"],
    ["--density", "0.5", "--structure", "blocks"],
    ["--sweep", "--density", "0.5"],
])
def test_bad_arguments_are_usage_errors(tiny_run, tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(["compress", tiny_run, "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_expected_failures_are_one_line(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert cli.main(["compress", str(tmp_path / "missing"), "--density", "0.5",
                     "--out", out]) == 1
    assert "missing" in one_error_line(capsys)
    assert cli.main(["compress", tiny_run, "--density", "0.5", "--out", tiny_run]) == 1
    assert "not the run itself" in one_error_line(capsys)
    assert cli.main(["compress", tiny_run, "--density", "0.5", "--finetune-steps", "1",
                     "--out", out, "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["compress", tiny_run, "--density", "0.5", "--out", out]) == 1
    assert "already holds a run" in one_error_line(capsys)
    assert cli.main(["compress", out, "--density", "0.25", "--out",
                     str(tmp_path / "again")]) == 1
    assert "already compressed" in one_error_line(capsys)


def test_curve_on_a_tiny_grid_is_resumable(tiny_run, tmp_path, capsys, monkeypatch):
    from minivlmoe.compress import curve

    out = str(tmp_path / "curve")
    argv = ["compress", tiny_run, "--sweep", "--densities", "1,0.5", "--finetune-steps", "2",
            "--out", out, "--quiet"]
    assert cli.main(argv) == 0
    points = curve.read_points(os.path.join(out, "curve.jsonl"))
    assert [p["density"] for p in points] == [1.0, 0.5]
    parent = run_folder.read_metrics(tiny_run)[-1]
    assert points[0]["scratch"]["i2t_r1"] == parent["i2t_r1"]    # density 1: the run itself
    assert points[1]["pruned"]["stored_parameters"] < points[0]["pruned"]["stored_parameters"]
    assert points[1]["bytes"]["ckpt"] < points[1]["bytes"]["ckpt_parent"]
    assert os.path.isfile(os.path.join(out, "scratch-0.5", "ckpt.npz"))
    for p in points:
        assert p["timing"]["forward_s"] > 0 and p["timing"]["train_step_s"] > 0
    table = open(os.path.join(out, "curve.md")).read()
    assert len(table.splitlines()) == 4                        # header, rule, 2 points
    capsys.readouterr()

    def no_new_point(*a, **k):
        raise AssertionError("a finished point was computed again")

    monkeypatch.setattr(curve, "run_point", no_new_point)
    assert cli.main(argv) == 0                                 # finished points skipped
    assert len(curve.read_points(os.path.join(out, "curve.jsonl"))) == 2


def test_matched_rank_bisects_to_the_nearest_count():
    from minivlmoe.compress import curve

    class Cfg:
        width, embed_dim = 64, 64

    def fake_lowrank(params, cfg, *, rank):                    # count = 100 r + 7
        return {"a": np.zeros(100 * rank + 7)}, cfg, []

    assert curve.matched_rank({}, Cfg, 1234, fake_lowrank) == (12, 1207)
    assert curve.matched_rank({}, Cfg, 1260, fake_lowrank) == (13, 1307)
    assert curve.matched_rank({}, Cfg, 5, fake_lowrank) == (1, 107)
    assert curve.matched_rank({}, Cfg, 10**6, fake_lowrank) == (64, 6407)
