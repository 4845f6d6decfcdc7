"""The run folder's files: config.json, metrics.jsonl, history.jsonl and ckpt.npz.

``DIR/config.json`` holds :func:`minivlmoe.runs.run_config`'s description of the run
(read back by :func:`minivlmoe.runs.parse_run_config`; the same dict is stored in every
checkpoint).  ``DIR/metrics.jsonl`` holds one JSON line per evaluation
(:func:`append_jsonl`, :func:`read_metrics`; :func:`truncate_metrics` drops the lines
written after the checkpoint a resumed run continues from).  ``DIR/history.jsonl`` holds
one JSON line per training step (step, lr, grad_norm and the losses), written in blocks at
every checkpoint, so it always ends at the checkpoint's step; :func:`read_history`,
:func:`truncate_history` keep it at one line per step 1..N across resumes.
``DIR/ckpt.npz`` is the checkpoint (:mod:`minivlmoe.checkpoint`);
:func:`minivlmoe.run_checkpoint.load_checkpoint` also checks it against a freshly
initialized model of its config.  The training loop that writes these files is
:mod:`minivlmoe.train`.

Crash safety: config.json and ckpt.npz are replaced atomically
(:func:`minivlmoe.atomic.atomic_write`), metrics.jsonl and history.jsonl are appended
in whole lines per ``write`` and ``fsync``ed, so a kill or a power cut leaves at worst a
torn last line, which :func:`read_jsonl` drops; the temporary files of killed writes are
removed by the next write and on resume (:func:`remove_run_temps`).
"""

from __future__ import annotations

import contextlib
import json
import os

from . import atomic, checkpoint
from ._checks import error_line

CKPT_NAME = "ckpt.npz"
METRICS_NAME = "metrics.jsonl"
HISTORY_NAME = "history.jsonl"
CONFIG_NAME = "config.json"


class MetricsError(checkpoint.CheckpointError):
    """DIR/metrics.jsonl cannot be used; the message names the file and the line.

    A :class:`minivlmoe.checkpoint.CheckpointError`, so whatever reports an unusable
    checkpoint in one line (the CLI, a resume) reports an unusable run folder the same way.
    """


def remove_run_temps(out_dir):
    """Delete the temporary files killed writes of the run folder's files left behind.

    Only the names :func:`minivlmoe.atomic.atomic_write` gives the temporary files of
    DIR/ckpt.npz, DIR/config.json, DIR/metrics.jsonl and DIR/history.jsonl
    (``.ckpt.npz.<12 hex>.tmp``, ...) are removed; every other file stays.  Returns the
    removed names.
    """
    return [name for file in (CKPT_NAME, CONFIG_NAME, METRICS_NAME, HISTORY_NAME)
            for name in atomic.remove_stale_temps(os.path.join(out_dir, file))]


def new_run_folder(out_dir, config):
    """Start a run in ``out_dir``: config.json written, metrics and history empty, no
    checkpoint.

    The folder is created if needed; stale temporary files are removed
    (:func:`remove_run_temps`), an earlier run's checkpoint is deleted first (so a crash
    before the first save cannot pair the new config.json with an old checkpoint), then
    config.json, an empty metrics.jsonl and an empty history.jsonl are each written
    atomically.
    """
    os.makedirs(out_dir, exist_ok=True)
    remove_run_temps(out_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out_dir, CKPT_NAME))
    atomic.atomic_write(os.path.join(out_dir, CONFIG_NAME),
                            (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    atomic.atomic_write(os.path.join(out_dir, METRICS_NAME), b"")
    atomic.atomic_write(os.path.join(out_dir, HISTORY_NAME), b"")


def append_jsonl(path, record):
    """Append ``record`` (a dict, or a list of dicts) as JSON lines to ``path`` and flush
    them to disk.

    All the lines go out in one ``write`` on a file opened for appending (a loop only if
    the system writes part of it, e.g. on a full disk), then one ``fsync``: a crash can
    tear only the last line, which :func:`read_jsonl` then drops.  A record that is not
    JSON (NaN, ...) raises before the file is opened.
    """
    records = [record] if isinstance(record, dict) else list(record)
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    line = memoryview(text.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        while line:
            line = line[os.write(fd, line):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path):
    """The records of a JSON-lines file (empty list if none), a torn last line dropped.

    A last line that is not valid JSON is what a crash while appending leaves (a prefix
    of the record, or zeros after a power cut); it is dropped.  Any other line that is
    not a JSON object with an integer ``step`` raises :class:`MetricsError` naming the
    file and the line number.  Blank lines are skipped.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    lines = [(n, line) for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if n == lines[-1][0]:
                break                                            # torn by a crash: dropped
            raise MetricsError(f"{path}: line {n} of {lines[-1][0]} is not valid JSON "
                               f"({error_line(e)}); only a torn last line can be "
                               f"dropped") from None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise MetricsError(f"{path}: line {n} is not a metrics record (a JSON object "
                               f"with an integer 'step'), got {line[:80]!r}")
        records.append(record)
    return records


def read_metrics(out_dir):
    """The records of DIR/metrics.jsonl (empty list if none)."""
    return read_jsonl(os.path.join(out_dir, METRICS_NAME))


def read_history(out_dir):
    """The per-step records of DIR/history.jsonl (empty list if none)."""
    return read_jsonl(os.path.join(out_dir, HISTORY_NAME))


def truncate_metrics(out_dir, step):
    """Drop records past ``step`` (written after the checkpoint we resume from)."""
    truncate_jsonl(os.path.join(out_dir, METRICS_NAME), step)


def truncate_history(out_dir, step):
    """Keep DIR/history.jsonl's lines of steps 1..``step`` (the checkpoint's)."""
    truncate_jsonl(os.path.join(out_dir, HISTORY_NAME), step)


def truncate_jsonl(path, step):
    """Rewrite ``path`` without the records whose ``"step"`` is past ``step``.

    Also drops a torn last line (:func:`read_jsonl`); the file is rewritten atomically.
    """
    records = [r for r in read_jsonl(path) if r["step"] <= step]
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    atomic.atomic_write(path, text.encode("utf-8"))
