"""Atomic file replacement: a file is the old one or the new one, never a mixture.

:func:`atomic_write` writes the new content to a temporary file
``.<name>.<12 hex>.tmp`` in the destination's folder (so the rename stays on one
filesystem), flushes and ``fsync``s it, ``os.replace``s it onto the destination (atomic
on POSIX and Windows) and ``fsync``s the folder where the platform allows.  A killed
write leaves its temporary file behind; :func:`remove_stale_temps` deletes exactly the
files of that pattern for one destination (and nothing else), and every write calls it
first.  Used by the checkpoints (:mod:`minivlmoe.checkpoint`) and the run folder's
config.json, metrics.jsonl and history.jsonl rewrites (:mod:`minivlmoe.run_folder`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets

_TEMP_HEX = 6                      # random bytes in a temporary file's name


def _fsync_dir(folder):
    """Make the rename durable; not every platform can open a directory (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path):
    """(folder, basename, name regex) of :func:`atomic_write`'s temporary files for ``path``."""
    folder, base = os.path.split(os.path.abspath(path))
    return folder, base, re.compile(rf"\.{re.escape(base)}\.[0-9a-f]{{{2 * _TEMP_HEX}}}\.tmp")


def remove_stale_temps(path):
    """Delete the temporary files that interrupted :func:`atomic_write` calls for ``path`` left.

    Only regular files named ``.<basename>.<12 hex digits>.tmp`` in ``path``'s folder are
    removed (the pattern :func:`atomic_write` uses for ``path``, so another file's temp
    files and any other name are never touched).  Best effort: a file that cannot be
    removed is left alone.  Assumes one writer per ``path`` (a run folder has one training
    process).  Returns the removed names, sorted.
    """
    folder, _, pattern = _temp_name(path)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return sorted(removed)


def atomic_write(path, content):
    """Replace the file ``path`` by ``content`` atomically (temp file, fsync, rename).

    Parameters
    ----------
    path : str or os.PathLike; its folder must exist.
    content : bytes, or a callable ``content(file)`` that writes into a binary file.

    The bytes go to ``.<basename>.<random hex>.tmp`` in ``path``'s folder (so the rename
    stays on one filesystem), which is flushed and ``fsync``ed, then ``os.replace``d onto
    ``path``; the folder is ``fsync``ed where the platform allows.  A crash at any moment
    leaves the old file or the new one.  If writing fails the temporary file is removed
    and the error propagates (an OSError of a write to the open file, e.g. a full disk,
    which also fails the file's close, as one OSError naming ``path``, not a chain); the
    temp files of earlier writes that were killed are removed first
    (:func:`remove_stale_temps`).
    """
    path = os.fspath(path)
    remove_stale_temps(path)
    folder, base, _ = _temp_name(path)
    tmp = os.path.join(folder, f".{base}.{secrets.token_hex(_TEMP_HEX)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from None
        raise
    _fsync_dir(folder)
