"""The training progress line on stderr: step, losses, lr, tokens/s, elapsed and ETA.

:class:`Progress` writes one line at most every ``PROGRESS_EVERY_S`` seconds, one line
when an evaluation starts and one with its results; :func:`minivlmoe.train.train` feeds
it every step.
"""

from __future__ import annotations

import collections
import math
import time

PROGRESS_EVERY_S = 2.0


def _fmt_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """The stderr progress line, written at most every PROGRESS_EVERY_S seconds.

    tokens/s and the ETA come from the (time, step) pairs of the last 50 steps since the
    start or the last evaluation, the start or the evaluation's end included, so the very
    first line and the first line after an evaluation have them too.
    """

    def __init__(self, stream, total_steps, tokens_per_step, step=0):
        self.stream, self.total, self.tokens = stream, total_steps, tokens_per_step
        self.last = -math.inf
        # (time, step) of the last steps since the start or the last evaluation
        self.window = collections.deque([(time.perf_counter(), step)], maxlen=51)

    def update(self, step, losses, lr, elapsed):
        now = time.perf_counter()
        self.window.append((now, step))
        if self.stream is None or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        (t0, s0), (t1, s1) = self.window[0], self.window[-1]
        rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0      # steps per second
        eta = (self.total - step) / rate if rate > 0 else 0.0
        speed = f"{rate * self.tokens:,.0f}" if rate > 0 else "?"
        print(f"step {step:>5}/{self.total} | loss {losses['total']:.4f} "
              f"(con {losses['contrastive']:.3f} cap {losses['caption']:.3f} "
              f"aux {losses['aux']:.4f}) | lr {lr:.2e} | {speed} tok/s | "
              f"{_fmt_time(elapsed)} elapsed, ETA {_fmt_time(eta) if rate > 0 else '?'}",
              file=self.stream, flush=True)

    def evaluating(self, step, n_test):
        """Say that an evaluation starts (it takes seconds with no other output)."""
        if self.stream is not None:
            print(f"step {step:>5}/{self.total} | evaluating on {n_test} test pairs ...",
                  file=self.stream, flush=True)

    def evaluation(self, record):
        self.window.clear()                  # the evaluation's pause is not a slow step
        self.window.append((time.perf_counter(), record["step"]))
        if self.stream is not None:
            print(f"eval @ step {record['step']}: i2t R@1 {record['i2t_r1']:.3f}  "
                  f"t2i R@1 {record['t2i_r1']:.3f}  caption exact "
                  f"{record.get('caption_exact', float('nan')):.3f}  BLEU-4 "
                  f"{record.get('bleu4', float('nan')):.3f}", file=self.stream, flush=True)
