"""Every expected CLI failure is one stderr line and exit status 1, never a traceback.

Each case runs ``cli.main([...])`` in-process on the tiny preset with a few steps (about a
second each).  The disk-full case injects ``OSError(ENOSPC)`` into the checkpoint's file
writes part-way (the file object ``checkpoint.save`` gets from ``os.fdopen`` raises once
a byte budget is spent, and so do its flush and close, as on a real full disk); the
same run on a real 1.2 MB tmpfs behaves the same (reported in the commit).
"""

import errno
import glob
import io
import os

import numpy as np
import pytest

from minivlmoe import checkpoint, cli, divergence, run_checkpoint, run_folder, runs, train

from conftest import one_error_line

TINY = ["train", "--preset", "tiny", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main([*TINY, "--steps", "4", "--eval-every", "4", "--out", str(out)]) == 0
    return out


def _file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return str(path)


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after ``budget`` bytes: writes raise ENOSPC."""

    budget = 0

    def write(self, data):
        if len(data) > _FullDisk.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.budget -= len(data)
        return super().write(data)


def _fill_the_disk_at_the_second_save(monkeypatch):
    """The disk fills up during the second ``checkpoint.save`` (config.json and the
    metrics file go through the same atomic writer; only checkpoint saves are counted)."""
    real_fdopen, real_save, saves = os.fdopen, checkpoint.save, []

    def save(*args, **kw):
        saves.append("save")
        return real_save(*args, **kw)

    def fdopen(fd, mode="r", *args, **kw):
        if mode != "wb" or len(saves) < 2:
            return real_fdopen(fd, mode, *args, **kw)
        _FullDisk.budget = 100_000                     # the second save fails part-way
        return io.BufferedWriter(_FullDisk(fd, "wb"))

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    return saves


# (argv builder, text the line must contain[, setup]); every item-1 and item-2 case of
# issue 11
CASES = {
    "out-missing-parent": (lambda tmp, run: [*TINY, "--steps", "2", "--out", "/proc/x"],
                           "No such file or directory (/proc/x)"),
    "out-is-a-file": (lambda tmp, run: [*TINY, "--steps", "2", "--out", _file(tmp)],
                      "--out must be a folder"),
    "eval-json-unwritable": (lambda tmp, run: ["eval", str(run), "--no-decode", "--json",
                                               "/proc/x/o.json"],
                             "cannot write --json: No such file or directory "
                             "(/proc/x/o.json)"),
    "lr-10": (lambda tmp, run: [*TINY, "--lr", "10", "--out", str(tmp / "r")],
              "training diverged at step 2: total loss 90.59 > 10 x 6.753"),
    "lr-100": (lambda tmp, run: [*TINY, "--steps", "8", "--lr", "100",
                                 "--out", str(tmp / "r")],
               "training diverged at step 2: total loss"),
    "lr-1e3": (lambda tmp, run: [*TINY, "--steps", "8", "--lr", "1e3",
                                 "--out", str(tmp / "r")],
               "training diverged at step 2"),
    "lr-1e5": (lambda tmp, run: [*TINY, "--steps", "8", "--lr", "1e5",
                                 "--out", str(tmp / "r")],
               "training diverged at step 2"),
    "lr-1e10": (lambda tmp, run: [*TINY, "--steps", "8", "--lr", "1e10",
                                  "--out", str(tmp / "r")],
                "the forward pass failed on the updated parameters"),
    "disk-full": (lambda tmp, run: [*TINY, "--steps", "8", "--eval-every", "4",
                                    "--out", str(tmp / "r")],
                  "No space left on device", _fill_the_disk_at_the_second_save),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_expected_failure_is_one_line_and_exit_1(case, run_dir, tmp_path, capsys,
                                                 monkeypatch):
    argv, expected, *setup = CASES[case]
    for hook in setup:
        hook(monkeypatch)
    capsys.readouterr()
    assert cli.main(argv(tmp_path, run_dir)) == 1
    line = one_error_line(capsys)
    assert expected in line, line


def test_eval_json_failure_comes_after_the_report(run_dir, capsys):
    assert cli.main(["eval", str(run_dir), "--no-decode", "--json", "/proc/x/o.json"]) == 1
    out, err = capsys.readouterr()
    assert "i2t R@1" in out and "the report above was printed" in err


def test_divergence_keeps_the_last_checkpoint_and_logs_nothing_of_it(tmp_path, capsys):
    # eval (and checkpoint) at step 1: step 2 breaks the rule (90.6 > 10 x 6.75)
    out = tmp_path / "r"
    assert cli.main([*TINY, "--eval-every", "1", "--lr", "10",
                     "--out", str(out)]) == 1
    line = one_error_line(capsys)
    assert "at step 2" in line and f"the checkpoint of step 1 is kept: {out / 'ckpt.npz'}" \
        in line
    assert [r["step"] for r in run_folder.read_metrics(out)] == [1]
    ckpt, _, _, _ = run_checkpoint.load_checkpoint(out / "ckpt.npz")
    assert ckpt.step == 1


def test_training_diverged_carries_the_step_and_loss():
    mcfg, tcfg = runs.preset_configs("tiny", lr=10.0)
    with pytest.raises(divergence.TrainingDiverged, match="at step 2") as e:
        train.train(mcfg, tcfg, None, progress=None)
    assert e.value.step == 2 and e.value.loss > 10 * 6.75 and e.value.checkpoint is None


def test_a_normal_tiny_run_does_not_trigger_the_rule():
    mcfg, tcfg = runs.preset_configs("tiny", steps=200, eval_every=0)
    result = train.train(mcfg, tcfg, None, progress=None, decode_eval=False)
    totals = [h["total"] for h in result.history]
    assert result.step == 200 and max(totals[100:]) < totals[0] / 2


def test_a_non_finite_evaluation_is_neither_logged_nor_saved(tmp_path, monkeypatch):
    real, calls = train.evaluate.evaluate, []

    def evaluate(*args, **kw):
        results = real(*args, **kw)
        calls.append(1)
        if len(calls) == 2:                            # the evaluation at step 8
            results["test_total"] = float("nan")
        return results

    monkeypatch.setattr(train.evaluate, "evaluate", evaluate)
    mcfg, tcfg = runs.preset_configs("tiny", steps=8, eval_every=4)
    with pytest.raises(divergence.TrainingDiverged, match="at step 8: the evaluation gave "
                       "non-finite values \\(test_total=nan\\)") as e:
        train.train(mcfg, tcfg, tmp_path, progress=None, decode_eval=False)
    assert e.value.checkpoint_step == 4
    assert [r["step"] for r in run_folder.read_metrics(tmp_path)] == [4]
    assert run_checkpoint.load_checkpoint(tmp_path / "ckpt.npz")[0].step == 4


def test_a_bug_in_the_forward_keeps_its_traceback(monkeypatch):
    real, calls = train.model.loss_and_grads, []

    def loss_and_grads(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a bug, not a divergence")
        return real(*args, **kw)

    monkeypatch.setattr(train.model, "loss_and_grads", loss_and_grads)
    mcfg, tcfg = runs.preset_configs("tiny", steps=3)
    with pytest.raises(ValueError, match="a bug") as e:
        train.train(mcfg, tcfg, None, progress=None)
    assert not isinstance(e.value, divergence.TrainingDiverged)


# ----------------------------------------------------------------------------- full disk

def test_disk_full_during_a_save_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch,
                                                                      capsys):
    saves = _fill_the_disk_at_the_second_save(monkeypatch)
    out = tmp_path / "r"
    assert cli.main([*TINY, "--steps", "8", "--eval-every", "4", "--out", str(out)]) == 1
    line = one_error_line(capsys)
    assert f"No space left on device ({out / 'ckpt.npz'})" in line
    assert "the previous checkpoint is intact" in line
    monkeypatch.undo()
    assert len(saves) == 2                                         # it failed in the second save
    assert run_checkpoint.load_checkpoint(out / "ckpt.npz")[0].step == 4     # the step-4 checkpoint
    assert glob.glob(str(out / ".*.tmp")) == []                    # temp file removed


def test_checkpoint_save_raises_one_oserror_naming_the_path(tmp_path, monkeypatch):
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kw):
        _FullDisk.budget = 1000
        return io.BufferedWriter(_FullDisk(fd, "wb"))

    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    path = tmp_path / "c.npz"
    with pytest.raises(OSError) as e:
        checkpoint.save(path, params={"w": np.zeros(10_000)}, opt_state={}, step=0,
                        config={}, rng_state={})
    monkeypatch.setattr(checkpoint.os, "fdopen", real)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- order

def test_arguments_are_checked_before_the_run_folder(run_dir, capsys, monkeypatch):
    # run_dir holds a run: a bad argument is still a usage error, not "already holds a run"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--batch-size", "1", "--out", str(run_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "already holds" not in err


# ----------------------------------------------------------------------------- clipping

def test_clipping_warning_for_a_run_clipped_hard_on_every_step(capsys):
    mcfg, tcfg = runs.preset_configs("tiny", steps=6, eval_every=3, max_grad_norm=1e-3)
    train.train(mcfg, tcfg, None, progress=None, decode_eval=False)
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning: gradient norm above")]
    assert len(warnings) == 2, err                       # one per evaluation interval
    assert "on 3 of 3 steps since step 0" in warnings[0]
    assert "since step 3" in warnings[1]


def test_no_clipping_warning_for_a_normal_run(capsys):
    mcfg, tcfg = runs.preset_configs("tiny", steps=30, eval_every=15)
    train.train(mcfg, tcfg, None, progress=None, decode_eval=False)
    assert "warning" not in capsys.readouterr().err


def test_clipping_warning_needs_more_than_half_of_the_interval():
    stream = io.StringIO()
    monitor = divergence.ClipMonitor(0.01)                     # warns above 1000 x 0.01 = 10
    for norm in (11.0, 11.0, 9.0, 10.0):                   # 2 of 4 above: not most
        monitor.add(norm)
    monitor.report(4, stream)
    assert stream.getvalue() == ""
    for norm in (11.0, 11.0, 9.0):                         # 2 of 3 above
        monitor.add(norm)
    monitor.report(7, stream)
    assert stream.getvalue().startswith("warning: gradient norm above 1000 x max_grad_norm "
                                        "(= 0.01) on 2 of 3 steps since step 4 (median 11)")
