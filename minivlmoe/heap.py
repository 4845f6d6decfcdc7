"""Keep the freed heap between training steps instead of handing it back to the OS.

Every training step allocates the same arrays again (activations, caches, gradients),
a few tens of MB in all, and frees them at its end.  glibc's malloc serves a block
larger than its *mmap threshold* with a fresh ``mmap`` and returns it to the OS when it
is freed, and it trims the top of the heap whenever more than its *trim threshold* is
free there.  Both thresholds start small (128 kB; the mmap threshold then adapts up to
32 MB), so each step faults the pages it needs back in: thousands of minor page faults
per step, each a kernel entry and a zeroed page (``benchmarks/page_faults.py``: about
15,000 per step of the default dense model; with the heap kept 8, and the step takes
0.81x the time; docs/running.md).

:func:`keep_freed_heap` sets the two thresholds once, at the start of a command, with
glibc's ``mallopt``: blocks up to :data:`MMAP_THRESHOLD` come from the heap, and up to
:data:`TRIM_THRESHOLD` of free heap is kept.  Freed memory is then reused by the next
step at once.  Why it is safe: it changes where memory comes from, never what a program
computes (the arithmetic is bit-identical); what it costs is that the process keeps its
peak heap until it exits, a few hundred MB at most for these models (arrays larger than
the mmap threshold, such as a data set, are still mapped and unmapped as before).  It does
nothing where malloc is not glibc's (macOS, musl, Windows) and when the environment
variable ``MINIVLMOE_KEEP_HEAP=0`` says so (to measure the difference:
``benchmarks/page_faults.py``).  This module imports no NumPy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1   # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024   # bytes: the largest 64-bit glibc takes as a rule
TRIM_THRESHOLD = 512 * 1024 * 1024
ENV_VAR = "MINIVLMOE_KEEP_HEAP"


def _glibc():
    """glibc's C library, or None where the C library is another one."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()            # only glibc has this function
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_heap(environ=None):
    """Raise glibc's mmap and trim thresholds (module docstring) unless ``environ``
    (default ``os.environ``) has ``MINIVLMOE_KEEP_HEAP=0``.

    Returns True if both were set, False if nothing was done (not glibc, turned off, or
    ``mallopt`` refused).
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VAR, "1").strip() == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_ok) and bool(trim_ok)
