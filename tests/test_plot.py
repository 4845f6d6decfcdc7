"""history.jsonl and ``minivlmoe plot`` (minivlmoe/plot.py): text mode, PNG, resume.

The runs are the tiny preset with a few steps, trained in tmp_path through cli.main.
"""

import json
import sys

import pytest

from minivlmoe import cli, plot, run_folder, runs, train

TINY = ["--preset", "tiny", "--steps", "6", "--eval-every", "3", "--quiet"]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    out = []
    for experts in ("modality", "dense"):
        folder = tmp_path_factory.mktemp(experts)
        assert cli.main(["train", *TINY, "--experts", experts, "--out", str(folder)]) == 0
        out.append(folder)
    return out


def history_lines(folder):
    with open(folder / run_folder.HISTORY_NAME, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_history_has_one_line_per_step(run_dirs):
    lines = history_lines(run_dirs[0])
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for r in lines:
        assert {"lr", "grad_norm", "total", "contrastive", "caption", "aux"} <= set(r)
        assert r["total"] == pytest.approx(r["contrastive"] + r["caption"] + r["aux"])
    assert run_folder.read_history(run_dirs[0]) == lines


def test_history_equals_the_returned_history_and_survives_resume(tmp_path):
    """Stopped between evaluations, with a line written past the checkpoint (as if the
    crash came after the history flush), then resumed: exactly one line per step 1..N,
    equal to the uninterrupted run's per-step values."""
    mcfg, tcfg = runs.preset_configs("tiny", steps=8, eval_every=3)
    full = train.train(mcfg, tcfg, tmp_path / "full", progress=None)
    assert history_lines(tmp_path / "full") == full.history
    part = train.train(mcfg, tcfg, tmp_path / "part", stop_at=5, progress=None)
    assert [r["step"] for r in history_lines(tmp_path / "part")] == [1, 2, 3, 4, 5]
    with open(tmp_path / "part" / run_folder.HISTORY_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps({**part.history[-1], "step": 6}) + "\n")
    train.train(mcfg, tcfg, tmp_path / "part", resume=True, progress=None)
    assert history_lines(tmp_path / "part") == full.history


def test_history_survives_cli_resume(tmp_path):
    mcfg, tcfg = runs.preset_configs("tiny", steps=6, eval_every=3)
    train.train(mcfg, tcfg, tmp_path, stop_at=4, preset="tiny", progress=None)
    assert cli.main(["train", "--out", str(tmp_path), "--resume", "--quiet"]) == 0
    assert [r["step"] for r in history_lines(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_plot_text_mode(run_dirs, capsys):
    assert cli.main(["plot", *map(str, run_dirs)]) == 0
    out = capsys.readouterr().out
    assert out.count("6 steps in history.jsonl (1..6), 2 evaluations in metrics.jsonl") == 2
    first = run_folder.read_history(run_dirs[0])
    total = [r["total"] for r in first]
    assert (f"{'total':<12} {total[0]:8.4f} {total[-1]:8.4f} {min(total):8.4f} "
            f"{total.index(min(total)) + 1:8d}") in out
    last = run_folder.read_metrics(run_dirs[0])[-1]
    assert f"final (step 6): i2t R@1 {last['i2t_r1']:.4f}  t2i R@1 {last['t2i_r1']:.4f}" in out
    assert f"BLEU-4 {last['bleu4']:.4f}" in out


def test_plot_png(run_dirs, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the PNG path needs the optional matplotlib")
    png = tmp_path / "runs.png"
    assert cli.main(["plot", *map(str, run_dirs), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"saved {png}" in capsys.readouterr().out


def test_without_matplotlib_the_message_names_the_extra(run_dirs, tmp_path, monkeypatch,
                                                         capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib fails
    png = tmp_path / "runs.png"
    assert cli.main(["plot", str(run_dirs[0]), "--png", str(png)]) == 1
    captured = capsys.readouterr()
    assert "6 steps in history.jsonl" in captured.out           # the summary still printed
    assert captured.err.count("\n") == 1
    assert "pip install -e '.[plot]'" in captured.err and not png.exists()
    assert cli.main(["caption", str(run_dirs[0]), "--n", "1", "--png", str(png)]) == 1
    assert "pip install -e '.[plot]'" in capsys.readouterr().err and not png.exists()


def test_plot_bad_folders_are_one_line(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err == \
        f"minivlmoe: error: run folder not found ({tmp_path / 'missing'})\n"
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert "no history.jsonl or metrics.jsonl in the run folder" in capsys.readouterr().err
    # a torn LAST line is what a crash leaves and is dropped; a bad line before it is not
    (tmp_path / run_folder.METRICS_NAME).write_text('{not json\n{"step": 1}\n')
    assert cli.main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unreadable metrics.jsonl" in err and err.count("\n") == 1


def test_running_mean():
    assert plot._running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plot._running_mean([2.0], 5) == [2.0]
