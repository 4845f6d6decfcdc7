"""Divergence and clipping: when training stops, and when it warns.

The training loop (:func:`minivlmoe.train.train`) checks every step with these rules.

Step ``s``'s losses are checked as soon as they are known, before anything is logged
or saved.  Training stops with :class:`TrainingDiverged` (the CLI prints it as one line
and exits 1) when

* any loss of the step is NaN or infinite, or
* the total loss exceeds ``DIVERGENCE_FACTOR`` (10) times the lowest running mean seen
  so far in this call, the running mean being the mean of the last
  ``DIVERGENCE_WINDOW`` (20) step losses (of all the steps so far while fewer than 20
  have run), or
* after the first update, the model's forward or backward (or an evaluation) fails on
  the updated parameters with a FloatingPointError or a ValueError about non-finite
  values (the data and the configuration are unchanged since the first step, so only
  the parameters can have gone wrong), or
* an evaluation returns a NaN or infinite figure (then neither its metrics line nor
  its checkpoint is written).

A normal run's loss starts at its highest (about 6.8 for tiny, 8.4 for default) and
decreases with per-step noise; the largest ratio of a step's loss to the reference
measured on normal runs is 3.2 (tiny, 1000 steps, overfitting to a loss of 0.25) and
1.3 (default, 300 steps), so the factor 10 leaves a margin of 3.  ``--lr 10`` on tiny
breaks it at step 3 (353 > 10 x 6.80), ``--lr 100`` at step 2.  The reference starts
again after a resume.  Nothing of a step that breaks the rule is logged or saved, so
the checkpoint on disk is the one of the last evaluation before it.  (That checkpoint's
own loss is only measured by the next step: when the divergence starts with the very
update before an evaluation, only its test figures, which must be finite, vouch for
it.)

Gradients are clipped on *every* step of a normal run (norms 2 to 90 against
``max_grad_norm = 1``; with AdamW, which divides by the gradients' running RMS, a
constant clipping factor changes almost nothing), so being clipped is not a warning
sign by itself.  A warning line is printed once per evaluation interval (at the
evaluation, and at a ``stop_at`` end) when on more than half of the interval's steps
the gradient norm exceeded ``CLIP_WARN_RATIO`` (1000) times ``max_grad_norm``: ten
times the largest ratio a normal run shows (about 90, at initialization).
"""

from __future__ import annotations

import collections
import math
import sys

import numpy as np

from ._checks import shorten

DIVERGENCE_FACTOR = 10.0    # a step's total loss above this many times the reference ...
DIVERGENCE_WINDOW = 20      # ... the lowest mean of this many consecutive step losses
CLIP_WARN_RATIO = 1000.0    # warn when most steps' grad norm exceed this x max_grad_norm
class TrainingDiverged(FloatingPointError):
    """Training stopped because the loss diverged (the module docstring).

    The message names the step, the loss and the rule broken, and the checkpoint kept
    (the last one written before the rule broke).  Attributes: ``step`` (the step that
    broke the rule), ``loss`` (its total loss, may be NaN or inf; None if the forward
    failed), ``checkpoint`` (path of the checkpoint kept on disk, or None) and
    ``checkpoint_step``.
    """

    def __init__(self, message, *, step, loss=None, checkpoint=None, checkpoint_step=None):
        super().__init__(message)
        self.step, self.loss = step, loss
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step


class DivergenceCheck:
    """The divergence rule on the step losses (the module docstring)."""

    def __init__(self):
        self.window = collections.deque(maxlen=DIVERGENCE_WINDOW)     # last K totals
        self.best = math.inf                       # lowest mean of the window so far

    def problem(self, losses):
        """None if the step's losses keep the rule, else what is wrong (one line)."""
        bad = [f"{k}={v}" for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            return f"non-finite loss ({shorten(', '.join(bad))})"
        total = losses["total"]
        if self.best > 0 and total > DIVERGENCE_FACTOR * self.best:
            return (f"total loss {total:.4g} > {DIVERGENCE_FACTOR:g} x {self.best:.4g}, "
                    f"the lowest mean of {DIVERGENCE_WINDOW} consecutive step losses so far")
        self.window.append(total)
        self.best = min(self.best, sum(self.window) / len(self.window))
        return None


def non_finite(tree, path=""):
    """'key=value' of every NaN or infinite float in a nested dict/list of a record."""
    if isinstance(tree, dict):
        return [b for k, v in tree.items() for b in non_finite(v, f"{path}.{k}" if path
                                                                     else str(k))]
    if isinstance(tree, (list, tuple)):
        return [b for i, v in enumerate(tree) for b in non_finite(v, f"{path}[{i}]")]
    if isinstance(tree, float) and not math.isfinite(tree):
        return [f"{path}={tree}"]
    return []


def blew_up(error):
    """Is ``error``, raised by the model on updated parameters, a sign of divergence?

    FloatingPointError always; ValueError when it is a finiteness check of an op's input
    (the library's checks say "must be finite").  Anything else is a bug: re-raised.
    """
    return isinstance(error, FloatingPointError) or (isinstance(error, ValueError)
                                                     and "finite" in str(error))


class ClipMonitor:
    """Counts the steps whose gradient norm exceeds CLIP_WARN_RATIO x max_grad_norm."""

    def __init__(self, max_grad_norm):
        self.limit = None if max_grad_norm is None else CLIP_WARN_RATIO * max_grad_norm
        self.max_grad_norm = max_grad_norm
        self.norms, self.since = [], 0

    def add(self, grad_norm):
        self.norms.append(grad_norm)

    def report(self, step, stream):
        """Print the warning if more than half of the steps since the last report were
        clipped by more than CLIP_WARN_RATIO; start a new interval."""
        hard = 0 if self.limit is None else sum(n > self.limit for n in self.norms)
        if hard * 2 > len(self.norms):
            print(f"warning: gradient norm above {CLIP_WARN_RATIO:g} x max_grad_norm "
                  f"(= {self.max_grad_norm:g}) on {hard} of {len(self.norms)} steps "
                  f"since step {self.since} (median {float(np.median(self.norms)):.3g}): "
                  f"clipping dominates the gradients; check max_grad_norm and lr",
                  file=stream if stream is not None else sys.stderr, flush=True)
        self.norms, self.since = [], step
