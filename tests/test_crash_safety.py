"""A crash-safe run folder: tests/test_crash_safety.py.

Torn metrics lines, the temporary files of killed writes, the atomic config.json, and the
kill-resume loop of benchmarks/kill_resume.py with a few kills (SIGKILLs of real
training processes, most of them inside a checkpoint write).
"""

import json
import os
import pathlib
import runpy

import numpy as np
import pytest

from minivlmoe import atomic, checkpoint, run_folder, runs, train

from conftest import same_trees, without_time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny(steps=8, eval_every=2, **overrides):
    return runs.preset_configs("tiny", steps=steps, eval_every=eval_every, **overrides)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted tiny run (8 steps, a checkpoint every 2)."""
    out = tmp_path_factory.mktemp("full")
    mcfg, tcfg = tiny()
    result = train.train(mcfg, tcfg, out, progress=None)
    return out, result


# ----------------------------------------------------------------------------- metrics.jsonl

TORN = [b'{"step": 6, "elapsed_s": 1.2, "i2t_r1": 0.1', b"\x00" * 37, b'{"st',
        '{"step": 6, "word": "caf\u00e9"}'.encode("utf-8")[:-4]]     # split inside a char


@pytest.mark.parametrize("tail", TORN, ids=["prefix", "zeros", "short", "utf8"])
def test_resume_after_a_torn_last_line_equals_the_uninterrupted_run(tmp_path, full_run, tail):
    """A crash while appending the record of step 6 (after the checkpoint of step 4):
    resume drops the torn line and ends bit-identical to the run that never stopped."""
    full_dir, full = full_run
    mcfg, tcfg = tiny()
    train.train(mcfg, tcfg, tmp_path, stop_at=4, progress=None)
    with open(tmp_path / run_folder.METRICS_NAME, "ab") as f:
        f.write(tail)
    with pytest.raises(json.JSONDecodeError):       # what broke --resume before
        [json.loads(line) for line in (tmp_path / run_folder.METRICS_NAME).read_text(
            errors="replace").splitlines()]
    assert [r["step"] for r in run_folder.read_metrics(tmp_path)] == [2, 4]   # readers tolerate it
    rest = train.train(mcfg, tcfg, tmp_path, resume=True, progress=None)
    assert without_time(run_folder.read_metrics(tmp_path)) == without_time(run_folder.read_metrics(full_dir))
    same_trees(rest.params, full.params)
    same_trees(rest.opt_state, full.opt_state)
    assert (tmp_path / run_folder.METRICS_NAME).read_bytes().endswith(b"}\n")


def test_torn_line_before_the_last_is_one_clear_error(tmp_path):
    mcfg, tcfg = tiny()
    train.train(mcfg, tcfg, tmp_path, stop_at=4, progress=None)
    path = tmp_path / run_folder.METRICS_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0][:30] + b"\n" + lines[1])                  # line 1 torn
    before = path.read_bytes()
    with pytest.raises(run_folder.MetricsError) as info:
        train.train(mcfg, tcfg, tmp_path, resume=True, progress=None)
    message = str(info.value)
    assert message.startswith(f"{path}: line 1 of 2 is not valid JSON") and "\n" not in message
    assert isinstance(info.value, checkpoint.CheckpointError)            # the CLI's one line
    assert path.read_bytes() == before                                   # nothing rewritten
    with pytest.raises(run_folder.MetricsError, match="line 1"):
        run_folder.read_metrics(tmp_path)


def test_cli_resume_with_a_torn_middle_line_prints_one_line(tmp_path, capsys):
    from minivlmoe import cli

    argv = ["train", "--preset", "tiny", "--steps", "4", "--eval-every", "2", "--quiet",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    path = tmp_path / run_folder.METRICS_NAME
    path.write_bytes(b'{"step": 2, "i2t\n' + path.read_bytes().splitlines(keepends=True)[1])
    capsys.readouterr()
    assert cli.main(argv + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minivlmoe: error: ") and "metrics.jsonl: line 1" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("line, match", [(b"[1, 2]", "not a metrics record"),
                                         (b'{"step": "4"}', "integer 'step'"),
                                         (b'{"i2t_r1": 0.5}', "line 2")])
def test_a_valid_json_line_that_is_not_a_record_is_an_error_even_last(tmp_path, line, match):
    (tmp_path / run_folder.METRICS_NAME).write_bytes(b'{"step": 2}\n' + line + b"\n")
    with pytest.raises(run_folder.MetricsError, match=match):
        run_folder.read_metrics(tmp_path)


def test_read_metrics_skips_blank_lines_and_accepts_a_missing_newline(tmp_path):
    assert run_folder.read_metrics(tmp_path) == []
    (tmp_path / run_folder.METRICS_NAME).write_bytes(b'{"step": 2}\n\n{"step": 4}')
    assert run_folder.read_metrics(tmp_path) == [{"step": 2}, {"step": 4}]
    run_folder.truncate_metrics(tmp_path, 4)
    assert (tmp_path / run_folder.METRICS_NAME).read_bytes() == b'{"step": 2}\n{"step": 4}\n'


def test_append_writes_the_whole_line_in_one_write_and_fsyncs(tmp_path, monkeypatch):
    path = tmp_path / run_folder.METRICS_NAME
    path.write_bytes(b'{"step": 1}\n')
    calls = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(run_folder.os, "write",
                        lambda fd, data: calls.append((fd, bytes(data))) or
                        real_write(fd, data))
    monkeypatch.setattr(run_folder.os, "fsync", lambda fd: calls.append((fd, "fsync")) or
                        real_fsync(fd))
    record = {"step": 2, "experts": {"layer1": list(range(5000))}}     # > one 8 KiB buffer
    run_folder.append_jsonl(path, record)
    monkeypatch.undo()
    line = (json.dumps(record) + "\n").encode()
    fd = calls[-1][0]
    assert [c for c in calls if c[0] == fd] == [(fd, line), (fd, "fsync")]
    assert run_folder.read_metrics(tmp_path) == [{"step": 1}, record]
    with pytest.raises(ValueError):                                    # NaN: file untouched
        run_folder.append_jsonl(path, {"step": 3, "loss": float("nan")})
    assert run_folder.read_metrics(tmp_path) == [{"step": 1}, record]


# ----------------------------------------------------------------------------- temp files

def stale(folder, base):
    """A temp file as a save killed before its rename leaves it."""
    path = folder / f".{base}.{os.urandom(6).hex()}.tmp"
    path.write_bytes(b"PK\x03\x04 half a checkpoint")
    return path.name


LOOKALIKES = ["ckpt.npz.0123456789ab.tmp", ".ckpt.npz.0123456789ab.tmp.bak",
              ".ckpt.npz.0123456789abc.tmp", ".ckpt.npz.0123456789AB.tmp",
              ".ckpt.npz.mine.tmp", ".ckptXnpz.0123456789ab.tmp", ".other.npz.0123456789ab.tmp",
              "notes.tmp", ".ckpt.npz.tmp"]


def test_next_save_removes_stale_temps_and_nothing_else(tmp_path):
    path = tmp_path / "ckpt.npz"
    stale_names = [stale(tmp_path, "ckpt.npz") for _ in range(3)]
    for name in LOOKALIKES:
        (tmp_path / name).write_text("user file")
    (tmp_path / f".ckpt.npz.{'0' * 12}.tmp").mkdir()                      # not a file
    assert all((tmp_path / n).exists() for n in stale_names)
    checkpoint.save(path, params={"w": np.ones(3)}, opt_state={}, step=1, config={},
                    rng_state={})
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(["ckpt.npz", f".ckpt.npz.{'0' * 12}.tmp", *LOOKALIKES])
    assert all((tmp_path / n).read_text() == "user file" for n in LOOKALIKES)
    assert checkpoint.load(path).step == 1


def test_remove_stale_temps_returns_what_it_removed(tmp_path):
    names = sorted(stale(tmp_path, "run.npz") for _ in range(2))
    other = stale(tmp_path, "other.npz")
    assert atomic.remove_stale_temps(tmp_path / "run.npz") == names
    assert os.listdir(tmp_path) == [other]
    assert atomic.remove_stale_temps(tmp_path / "missing-folder" / "run.npz") == []


def test_resume_removes_the_run_folders_stale_temps_and_nothing_else(tmp_path):
    mcfg, tcfg = tiny(steps=4)
    train.train(mcfg, tcfg, tmp_path, stop_at=2, progress=None)
    for base in (run_folder.CKPT_NAME, run_folder.CONFIG_NAME, run_folder.METRICS_NAME):
        stale(tmp_path, base)
    for name in LOOKALIKES + [".metrics.jsonl.tmp"]:
        (tmp_path / name).write_text("user file")
    assert len(run_folder.remove_run_temps(tmp_path)) == 3
    for base in (run_folder.CKPT_NAME, run_folder.CONFIG_NAME, run_folder.METRICS_NAME):
        stale(tmp_path, base)
    rest = train.train(mcfg, tcfg, tmp_path, resume=True, stop_at=2, progress=None)
    assert rest.history == []                             # nothing trained, nothing saved
    assert sorted(os.listdir(tmp_path)) == sorted(
        [run_folder.CKPT_NAME, run_folder.CONFIG_NAME, run_folder.METRICS_NAME, run_folder.HISTORY_NAME,
         ".metrics.jsonl.tmp", *LOOKALIKES])


# ----------------------------------------------------------------------------- config.json

def _fail_after_half(data):
    def write(f):
        f.write(data[: len(data) // 2])
        raise OSError("No space left on device")
    return write


@pytest.mark.parametrize("target", ["fsync", "replace", "half"])
def test_config_json_is_written_atomically(tmp_path, monkeypatch, target):
    mcfg, tcfg = tiny(steps=2)
    train.train(mcfg, tcfg, tmp_path, progress=None)
    config_path = tmp_path / run_folder.CONFIG_NAME
    old = config_path.read_bytes()
    if target == "half":                                # the write itself fails midway
        real = atomic.atomic_write
        monkeypatch.setattr(atomic, "atomic_write",
                            lambda path, content: real(path, _fail_after_half(content)))
    else:
        def fail(*args):
            raise OSError("simulated failure")
        monkeypatch.setattr(checkpoint.os, target, fail)
    with pytest.raises(OSError):
        run_folder.new_run_folder(tmp_path, runs.run_config(*tiny(steps=3), runs.builtin_tokenizer()))
    monkeypatch.undo()
    assert config_path.read_bytes() == old
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_new_run_folder_writes_config_and_empty_metrics_and_history_and_drops_an_old_checkpoint(tmp_path):
    mcfg, tcfg = tiny(steps=2)
    train.train(mcfg, tcfg, tmp_path, progress=None)
    config = runs.run_config(*tiny(steps=3), runs.builtin_tokenizer())
    run_folder.new_run_folder(tmp_path, config)
    assert sorted(os.listdir(tmp_path)) == sorted([run_folder.CONFIG_NAME, run_folder.METRICS_NAME,
                                                   run_folder.HISTORY_NAME])
    assert json.loads((tmp_path / run_folder.CONFIG_NAME).read_text()) == config
    assert (tmp_path / run_folder.METRICS_NAME).read_bytes() == b""
    assert (tmp_path / run_folder.HISTORY_NAME).read_bytes() == b""


# ----------------------------------------------------------------------------- kill loop

@pytest.mark.slow
def test_kill_during_saves_then_resume_loses_nothing(tmp_path):
    """benchmarks/kill_resume.py with 3 SIGKILLs (two aimed at checkpoint writes)."""
    bench = runpy.run_path(str(ROOT / "benchmarks" / "kill_resume.py"))
    r = bench["run"](3, steps=40, eval_every=2, kill_seed=1, max_delay_s=1.5,
                     workdir=str(tmp_path))
    assert r["kills"] == 3, bench["summary"](r)
    assert r["lost"] == 0 and r["failures"] == 0 and r["tracebacks"] == 0, bench["summary"](r)
    assert r["temps_left"] == 0 and r["identical"], bench["summary"](r)
    assert r["ok"]
