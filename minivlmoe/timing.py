"""Wall time per named section of a training step, and the timer that measures nothing.

Anything with a ``section(name)`` context manager is a timer::

    with timer.section("attention"):
        ...

The model calls ``section`` around its parts (embed, attention, moe, ffn, losses); the
training loop adds "data" and "optimizer".  :class:`SectionTimer` adds up the seconds
of each section; :data:`NULL_TIMER` (the default everywhere) does nothing, so the code
that is timed reads the same whether or not anyone measures it.
"""

from __future__ import annotations

import contextlib
import time


class SectionTimer:
    """Accumulates wall time per named section: ``with timer.section("attention"): ...``.

    ``seconds`` maps each section name to its total seconds.  Nested sections are
    charged to the innermost one only, so the shares add up.
    """

    def __init__(self):
        self.seconds = {}
        self._stack = []

    @contextlib.contextmanager
    def section(self, name):
        now = time.perf_counter()
        if self._stack:                                  # pause the enclosing section
            outer, start = self._stack[-1]
            self.seconds[outer] = self.seconds.get(outer, 0.0) + now - start
        self._stack.append((name, now))
        try:
            yield
        finally:
            end = time.perf_counter()
            _, start = self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + end - start
            if self._stack:                              # resume the enclosing section
                outer, _ = self._stack[-1]
                self._stack[-1] = (outer, end)


class _NullTimer:
    """A timer whose sections are no-op contexts."""

    def section(self, name):
        return contextlib.nullcontext()


NULL_TIMER = _NullTimer()
