"""Command line: every subcommand on the tiny preset, usage errors, bad checkpoints.

``cli.main([...])`` runs in-process (fast); argparse's usage errors raise SystemExit(2).
"""

import json
import re
import zipfile

import pytest

from minivlmoe import cli, progress, run_folder, runs, train

TINY = ["--preset", "tiny", "--steps", "8", "--eval-every", "4", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_config_metrics_and_checkpoint(run_dir, capsys):
    records = run_folder.read_metrics(run_dir)
    assert [r["step"] for r in records] == [4, 8]
    for key in ("step", "elapsed_s", "i2t_r1", "t2i_r1", "caption_exact", "bleu4",
                "total", "contrastive", "caption", "aux"):
        assert key in records[-1]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "tiny" and config["train"]["steps"] == 8
    assert (run_dir / "ckpt.npz").exists()


def test_train_prints_progress_and_report(tmp_path, capsys):
    assert cli.main(["train", "--preset", "tiny", "--steps", "3", "--experts", "dense",
                     "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "step     1/3" in err and "tok/s" in err
    assert "i2t R@1" in out and "metrics:" in out


def test_train_refuses_to_overwrite_a_run_without_flag(run_dir, capsys):
    assert cli.main(["train", *TINY, "--out", str(run_dir)]) == 1
    assert "--resume" in capsys.readouterr().err


def test_train_resume_continues_an_interrupted_run(run_dir, tmp_path, capsys):
    mcfg, tcfg = runs.preset_configs("tiny", steps=8, eval_every=4)
    train.train(mcfg, tcfg, tmp_path, stop_at=5, preset="tiny", progress=None)
    assert cli.main(["train", "--out", str(tmp_path), "--resume", "--quiet"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa
    assert strip(run_folder.read_metrics(tmp_path)) == strip(run_folder.read_metrics(run_dir))
    # a flag that contradicts the saved run is reported, not silently applied
    assert cli.main(["train", "--out", str(tmp_path), "--resume", "--lr", "0.5",
                     "--quiet"]) == 1
    assert "train.lr" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path), "--resume", "--preset", "default",
                     "--quiet"]) == 1
    assert "--preset" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path), "--resume", "--quiet"]) == 0
    assert "already complete (8 steps)" in capsys.readouterr().out


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err


def test_eval(run_dir, tmp_path, capsys):
    assert cli.main(["eval", str(run_dir / "ckpt.npz"), "--json",
                     str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "step 8" in out and "i2t R@1" in out and "BLEU-4" in out
    results = json.loads((tmp_path / "e.json").read_text())
    assert results["i2t_r1"] == run_folder.read_metrics(run_dir)[-1]["i2t_r1"]
    assert cli.main(["eval", str(run_dir)]) == 0              # a run folder works too


def test_caption(run_dir, capsys):
    assert cli.main(["caption", str(run_dir), "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("generated:") == 3 and out.count("reference:") == 3


def test_caption_png(run_dir, tmp_path, capsys):
    png = tmp_path / "grid.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert cli.main(["caption", str(run_dir), "--n", "2", "--png", str(png)]) == 1
        assert "matplotlib" in capsys.readouterr().err
    else:
        assert cli.main(["caption", str(run_dir), "--n", "2", "--png", str(png)]) == 0
        assert png.stat().st_size > 0


def test_retrieve(run_dir, capsys):
    assert cli.main(["retrieve", str(run_dir), "a small red circle", "--top", "3",
                     "--ascii"]) == 0
    out = capsys.readouterr().out
    assert out.count("score") == 3 and "image" in out
    assert cli.main(["retrieve", str(run_dir), "a purple blob"]) == 0
    assert "purple" in capsys.readouterr().err                # unknown words are named


def test_retrieve_long_caption_is_one_short_line(run_dir, capsys):
    assert cli.main(["retrieve", str(run_dir), "red " * 20000]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minivlmoe: error: captions[0] must fit in max_len")
    assert err.count("\n") == 1 and len(err) < 600, len(err)


@pytest.mark.parametrize("argv", [
    [],
    ["bogus"],
    ["train", "--steps", "0"],
    ["train", "--steps", "ten"],
    ["train", "--experts", "sparse"],
    ["train", "--preset", "huge"],
    ["train", "--lr", "-1"],
    ["train", "--batch-size", "1"],                 # refused by TrainConfig: still usage
    ["train", "--preset", "tiny", "--n-train", "4"],
    ["eval"],
    ["caption", "x.npz", "--n", "0"],
    ["retrieve", "x.npz"],
    ["retrieve", "x.npz", "a red circle", "--top", "many"],
    ["--threads", "0", "gradcheck"],
    ["--threads", "two", "train"],
    ["--thread", "2", "gradcheck"],                 # no abbreviations (minivlmoe/threads.py)
])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "missing"])
@pytest.mark.parametrize("command", ["eval", "caption", "retrieve"])
def test_bad_checkpoint_is_one_line_and_exit_1(run_dir, tmp_path, capsys, damage, command):
    data = (run_dir / "ckpt.npz").read_bytes()
    bad = tmp_path / "bad.npz"
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":                    # one bit of the largest array's last value
        with zipfile.ZipFile(run_dir / "ckpt.npz") as zf:
            info = max(zf.infolist(), key=lambda i: i.file_size)
        at = info.header_offset + 30 + len(info.filename) + len(info.extra) \
            + info.compress_size - 1
        bad.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
    elif damage == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    argv = [command, str(bad)] + (["a red circle"] if command == "retrieve" else [])
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert err.startswith("minivlmoe: error: checkpoint") and "bad.npz" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_train_step_benchmark_reports_every_part(monkeypatch, capsys):
    import pathlib
    import runpy

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "train_step.py"
    monkeypatch.setattr("sys.argv", [str(script), "--preset", "tiny", "--steps", "2",
                                     "--warmup", "1"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "tokens/s" in out
    for part in ("attention", "losses", "optimizer", "data", "other"):
        assert part in out, part


def test_progress_has_speed_and_eta_from_the_first_line_and_announces_evaluations(
        monkeypatch):
    import io

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)           # a line at every step
    stream = io.StringIO()
    mcfg, tcfg = runs.preset_configs("tiny", steps=6, eval_every=3)
    train.train(mcfg, tcfg, None, progress=stream)
    lines = stream.getvalue().splitlines()
    steps = [line for line in lines if " | loss " in line]
    assert len(steps) == 6 and steps[0].startswith("step     1/6")
    for line in steps:                              # the first, and the first after eval
        assert "? tok/s" not in line and "ETA ?" not in line, line
        assert re.search(r"\| [\d,]+ tok/s \| .* ETA \d+:\d\d$", line), line
    notices = [i for i, line in enumerate(lines) if "evaluating on 32 test pairs ..." in line]
    evals = [i for i, line in enumerate(lines) if line.startswith("eval @ step")]
    assert len(evals) == 2 and [i + 1 for i in notices] == evals
    assert lines[notices[0]].startswith("step     3/6 | evaluating")
