"""BLAS threads of the command line: one unless told otherwise (``--threads N``).

NumPy's BLAS (OpenBLAS in the wheels) starts one thread per core.  On a busy 2-core
machine that is much slower, not faster: the README's command took 5.3x the wall time
and 5.2x the CPU time with OpenBLAS's default threads than with one (docs/running.md).
So ``minivlmoe`` runs with one BLAS thread, and who decides is, in this order:

1. ``--threads N``, a global option (``minivlmoe --threads 2 train``);
2. a BLAS thread variable the user set (any of :data:`ENV_VARS`, e.g.
   ``OPENBLAS_NUM_THREADS=4 minivlmoe train``): left alone, the user's choice wins;
3. otherwise :data:`DEFAULT` (1).

How: the BLAS reads its thread count once, when NumPy loads it, so :func:`limit` sets
:data:`ENV_VARS` when NumPy is not imported yet (the command line's entry points import
nothing that imports NumPy before they call it), and uses threadpoolctl's
``threadpool_limits`` for the command's duration when NumPy is already loaded (a caller
that imported NumPy, then ran ``cli.main``), if threadpoolctl is installed (an optional
extra; without it the BLAS keeps its threads).  This module imports no NumPy.
"""

from __future__ import annotations

import contextlib
import os
import sys

DEFAULT = 1
# the thread variables of OpenBLAS, OpenMP, MKL, BLIS, Apple Accelerate and numexpr
ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def option(argv):
    """The value of ``--threads`` among the global options of ``argv`` (the tokens before
    the subcommand), as an int >= 1; None if absent or not such an int (argparse then
    reports it).  The last one wins, as in argparse."""
    value, i = None, 0
    while i < len(argv):
        token = str(argv[i])
        if token == "--threads":
            value = argv[i + 1] if i + 1 < len(argv) else None
            i += 2
            continue
        if token.startswith("--threads="):
            value = token.split("=", 1)[1]
        elif token == "--" or not token.startswith("-"):
            break                                    # the subcommand: its options follow
        i += 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n >= 1 else None


def choose(argv, environ=None):
    """The thread count the command should use, or None to leave it to the environment.

    ``--threads N`` in ``argv`` wins; else None when the user set one of
    :data:`ENV_VARS` (non-empty) in ``environ`` (default ``os.environ``); else
    :data:`DEFAULT`.
    """
    environ = os.environ if environ is None else environ
    n = option(argv)
    if n is not None:
        return n
    if any(environ.get(name) for name in ENV_VARS):
        return None
    return DEFAULT


@contextlib.contextmanager
def limit(n):
    """Run the block with ``n`` BLAS threads (None: leave the threads as they are).

    Before NumPy is imported: sets every one of :data:`ENV_VARS` to ``n`` for the rest
    of the process (and its child processes).  After: threadpoolctl's
    ``threadpool_limits(n)`` for the block, restored on exit, when threadpoolctl is
    installed; otherwise nothing.
    """
    if n is None:
        yield
        return
    if "numpy" not in sys.modules:
        for name in ENV_VARS:
            os.environ[name] = str(n)
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n):
        yield


def describe():
    """One line naming each loaded BLAS or OpenMP library and its current thread count
    (threadpoolctl's view), for ``minivlmoe --debug-threads``."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "blas threads: unknown (threadpoolctl is not installed)"
    pools = [f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info()]
    return "blas threads: " + (", ".join(pools) if pools else "no BLAS loaded")
