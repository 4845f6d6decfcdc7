"""``minivlmoe sweep``: the grid, the parameter counts, the files, skip and resume, refusals."""

import importlib.util
import json

import pytest

from minivlmoe import cli, run_folder, sweep, train

TINY = ["sweep", "--preset", "tiny", "--experts-grid", "1,2", "--modes", "shared",
        "--seeds", "0", "--steps", "4"]
NO_TIME = ("elapsed_s", "wall_s")
PNG_STATUS = 0 if importlib.util.find_spec("matplotlib") else 1   # --png needs matplotlib


def rows_of(out):
    return [json.loads(line) for line in (out / sweep.ROWS_NAME).read_text().splitlines()]


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("train.train was called")
    monkeypatch.setattr(train, "train", refuse)


def test_sweep_writes_rows_and_summary_then_skips_finished_runs(tmp_path, capsys,
                                                                monkeypatch):
    out = tmp_path / "sw"
    assert cli.main([*TINY, "--out", str(out), "--png", str(tmp_path / "x.png")]) == PNG_STATUS
    stdout, err = capsys.readouterr()
    rows = rows_of(out)
    assert [r["run"] for r in rows] == ["dense-E1-s0", "shared-E2-s0"]
    for r in rows:
        for key in ("test_caption", "test_contrastive", "test_total", "i2t_r1", "t2i_r1",
                    "caption_exact", "bleu4"):
            assert key in r["metrics"], key
        assert r["step"] == 4 and r["wall_s"] > 0 and r["preset"] == "tiny"
        assert (out / r["run"] / "ckpt.npz").exists()                 # an ordinary run folder
    assert rows[0]["experts"] == "dense" and rows[1]["model"]["num_experts"] == 2
    assert rows[0]["active_params_per_token"] == rows[1]["active_params_per_token"]
    assert rows[0]["stored_params"] < rows[1]["stored_params"]
    summary = (out / sweep.SUMMARY_NAME).read_text()
    assert "dense" in summary and "shared" in summary and summary.strip() in stdout
    assert "run 1 of 2 dense-E1-s0" in err and "run 2 of 2 shared-E2-s0" in err
    assert "ETA" in err and "step " not in err                      # runs' own lines quiet

    calls = []
    monkeypatch.setattr(train, "train", lambda *a, **k: calls.append(k))
    assert cli.main([*TINY, "--out", str(out), "--png", str(tmp_path / "x.png")]) == PNG_STATUS
    assert calls == []                                              # nothing trained again
    assert rows_of(out) == rows                                     # and no row appended
    assert "already done" in capsys.readouterr().err


def test_sweep_resumes_an_interrupted_run(tmp_path, monkeypatch):
    point = sweep.Point("shared", "shared", 2, "both", 0)
    mcfg, tcfg = sweep.point_configs(point, "tiny", steps=4)
    train.train(mcfg, tcfg, str(tmp_path / "a" / point.name), stop_at=2, progress=None,
                preset="tiny")                                      # killed after step 2
    seen, real = [], train.train
    monkeypatch.setattr(train, "train", lambda *a, **k: seen.append(k["resume"]) or real(*a, **k))
    rows, = sweep.run_sweep([point], str(tmp_path / "a"), "tiny", steps=4, progress=None)
    assert seen == [True]
    fresh, = sweep.run_sweep([point], str(tmp_path / "b"), "tiny", steps=4, progress=None)
    assert seen == [True, False]
    strip = lambda m: {k: v for k, v in m.items() if k not in NO_TIME}
    assert strip(rows["metrics"]) == strip(fresh["metrics"])        # exact resume
    assert rows_of(tmp_path / "a")[-1]["run"] == point.name


def test_a_run_killed_before_its_row_is_not_trained_again(tmp_path, monkeypatch):
    """The run folder is finished but the sweep died before appending its row."""
    point = sweep.Point("dense", "dense", 1, "both", 0)
    mcfg, tcfg = sweep.point_configs(point, "tiny", steps=3)
    train.train(mcfg, tcfg, str(tmp_path / point.name), progress=None, preset="tiny")
    calls = []
    monkeypatch.setattr(train, "train", lambda *a, **k: calls.append(k))
    row, = sweep.run_sweep([point], str(tmp_path), "tiny", steps=3, progress=None)
    assert calls == [] and row["step"] == 3 and rows_of(tmp_path) == [row]


def test_sweep_refuses_a_folder_of_another_run(tmp_path, capsys):
    out = tmp_path / "sw"
    grid = ["sweep", "--preset", "tiny", "--experts-grid", "1", "--seeds", "0",
            "--out", str(out), "--png", str(tmp_path / "x.png")]
    assert cli.main([*grid, "--steps", "2"]) == PNG_STATUS
    capsys.readouterr()
    assert cli.main([*grid, "--steps", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minivlmoe: error: run folder") and "holds another run" in err


@pytest.mark.parametrize("bad", [
    ["--experts-grid", "0,2"], ["--experts-grid", "1,x"], ["--experts-grid", ","],
    ["--experts-grid", "2,2"], ["--experts-grid", "1,2", "--top-k", "3"],
    ["--modes", "shared,limoe"], ["--modes", "shared", "--ablation"], ["--seeds", "-1"],
    ["--jobs", "0"]])
def test_sweep_refuses_bad_grids_with_a_usage_error(bad, tmp_path, capsys, no_training):
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--preset", "tiny", "--out", str(tmp_path), *bad])
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err
    assert not (tmp_path / sweep.ROWS_NAME).exists()


def test_grid_order_and_the_ablation_points():
    names = [p.name for p in sweep.make_grid([4, 1], ["shared", "modality"], [0, 1],
                                             ablation=True)]
    assert names == [f"{n}-s{s}" for s in (0, 1) for n in
                     ("dense-E1", "shared-E4", "modality-E4", "modality-image-E4",
                      "modality-text-E4")]
    cfg = sweep.point_configs(sweep.Point("modality-text", "modality", 4, "text", 1),
                              "tiny")[0]
    assert (cfg.experts, cfg.num_experts, cfg.moe_modalities) == ("modality", 4, "text")


def test_equal_active_compute_against_a_hand_count():
    """Tiny preset: D = 32, F = 64, both layers are MoE positions (moe_every = 1); one
    FFN (an expert, or the dense FFN with K = 1) has 2 D F + F + D = 4192 parameters,
    a router E D + E."""
    D, F, ffn = 32, 64, 2 * 32 * 64 + 64 + 32
    assert ffn == 4192
    counts = {}
    for label, experts, E in (("dense", "dense", 1), ("shared", "shared", 2),
                              ("shared", "shared", 4), ("modality", "modality", 4)):
        cfg = sweep.point_configs(sweep.Point(label, experts, E, "both", 0), "tiny")[0]
        counts[label, E] = sweep.param_counts(cfg)
    dense_stored, dense_active, dense_router = counts["dense", 1]
    assert dense_active == dense_stored and dense_router == 0
    for E in (2, 4):                          # 2 layers of E experts and a router
        stored, active, router = counts["shared", E]
        assert stored - dense_stored == 2 * ((E - 1) * ffn + E * D + E)
        assert active == dense_active and router == 2 * (E * D + E)
    # modality: layer 0 has an image and a text pool, layer 1 is the dense fusion layer
    stored, active, router = counts["modality", 4]
    assert stored - dense_stored == 2 * (4 * ffn + 4 * D + 4) - ffn
    assert active == dense_active and router == 4 * D + 4
    # top-2: the dense FFN (width 2F) has D biases, the two experts 2 D
    k2 = {E: sweep.param_counts(sweep.point_configs(
        sweep.Point(*p), "tiny", top_k=2)[0])[1]
        for E, p in ((1, ("dense", "dense", 1, "both", 0)),
                     (4, ("shared", "shared", 4, "both", 0)))}
    assert k2[4] - k2[1] == 2 * D and k2[1] == dense_active + 2 * (F * D * 2 + F)


def test_sweep_png(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "sw", tmp_path / "fig.png"
    assert cli.main([*TINY, "--out", str(out), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_without_matplotlib(tmp_path, monkeypatch, capsys):
    def no_plot(*args, **kwargs):
        raise ImportError("no matplotlib")
    monkeypatch.setattr(sweep, "plot_summary", no_plot)
    out = tmp_path / "sw"
    assert cli.main([*TINY, "--out", str(out)]) == 0                # no --png: not needed
    assert (out / sweep.SUMMARY_NAME).exists() and not (out / sweep.PNG_NAME).exists()
    assert cli.main([*TINY, "--out", str(out), "--png", str(tmp_path / "f.png")]) == 1
    assert "--png needs matplotlib" in capsys.readouterr().err


def test_sweep_jobs_runs_in_worker_processes(tmp_path, capsys):
    out = tmp_path / "sw"
    assert cli.main([*TINY, "--steps", "2", "--out", str(out), "--jobs", "2",
                     "--png", str(tmp_path / "x.png")]) == PNG_STATUS
    assert sorted(r["run"] for r in rows_of(out)) == ["dense-E1-s0", "shared-E2-s0"]
    assert run_folder.read_metrics(out / "dense-E1-s0")[-1]["step"] == 2
