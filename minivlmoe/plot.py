"""Runs as pictures: the training losses of one or more run folders, with their evaluations.

A run folder (:mod:`minivlmoe.run_folder`) holds ``history.jsonl`` (one line per training step:
step, lr, grad_norm, total, contrastive, caption, aux and the aux parts) and
``metrics.jsonl`` (one line per evaluation: the test metrics of
:func:`minivlmoe.evaluate.evaluate`).  :func:`load_run` reads both; :func:`summary` is a
compact text table per run (first / last / min of each training loss, the last
evaluation's metrics); :func:`plot_runs` draws every run into one PNG (matplotlib,
imported lazily with the ``Agg`` backend: no screen needed):

* one panel per training loss (total, contrastive, caption, aux; log scale), the
  per-step values faint, their running mean solid, and the test losses of the
  evaluations as dots of the same color;
* grad_norm (log scale) and the learning rate per step;
* image-to-text and text-to-image R@1, and caption exact match and BLEU-4, at the
  evaluation steps.

Several runs share the panels, one color each (compare expert modes at a glance).
``minivlmoe plot RUN [RUN ...] [--png FILE]`` is the command line (minivlmoe/cli.py).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from .run_folder import HISTORY_NAME, METRICS_NAME, read_jsonl

LOSSES = ("total", "contrastive", "caption", "aux")
FINAL_METRICS = (("i2t_r1", "i2t R@1"), ("t2i_r1", "t2i R@1"), ("caption_exact", "caption exact"),
                 ("bleu4", "BLEU-4"), ("test_total", "test total"))
PLOT_EXTRA = "pip install -e '.[plot]'"     # from the checkout, as the README installs


class Run(NamedTuple):
    """One run folder's records.

    name : the folder as given (the legend label).   history : list of per-step dicts
    (history.jsonl).   metrics : list of per-evaluation dicts (metrics.jsonl).
    """

    name: str
    history: list
    metrics: list


def load_run(path):
    """The :class:`Run` of the folder ``path``; ValueError if it holds no run records."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"run folder not found ({path})")
    files = [os.path.join(path, name) for name in (HISTORY_NAME, METRICS_NAME)]
    if not any(os.path.exists(f) for f in files):
        raise ValueError(f"no {HISTORY_NAME} or {METRICS_NAME} in the run folder ({path})")
    records = []
    for f in files:
        try:
            records.append(read_jsonl(f))
        except ValueError as e:                 # a line that is not JSON
            raise ValueError(f"unreadable {os.path.basename(f)}: {e} ({f})") from None
    return Run(path.rstrip(os.sep) or path, *records)


def _fmt(value):
    return "  n/a" if value is None else f"{value:.4f}"


def summary(runs):
    """A compact text table per run: first/last/min training loss, final metrics."""
    lines = []
    for run in runs:
        steps = [r["step"] for r in run.history]
        lines.append(f"run {run.name}: {len(steps)} steps in {HISTORY_NAME}"
                     + (f" (1..{steps[-1]})" if steps else " (none: no per-step losses)")
                     + f", {len(run.metrics)} evaluations in {METRICS_NAME}")
        if run.history:
            lines.append(f"  {'loss':<12} {'first':>8} {'last':>8} {'min':>8} {'at step':>8}")
            for key in LOSSES:
                values = [(r[key], r["step"]) for r in run.history if key in r]
                if values:
                    low = min(values)
                    lines.append(f"  {key:<12} {values[0][0]:8.4f} {values[-1][0]:8.4f} "
                                 f"{low[0]:8.4f} {low[1]:8d}")
        if run.metrics:
            last = run.metrics[-1]
            lines.append(f"  final (step {last['step']}): " + "  ".join(
                f"{label} {_fmt(last.get(key))}" for key, label in FINAL_METRICS))
    return "\n".join(lines)


def _running_mean(values, window):
    """Mean of the last ``window`` values at each position (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(records, key):
    pairs = [(r["step"], r[key]) for r in records
             if r.get(key) is not None and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_runs(runs, png, *, dpi=110):
    """Draw ``runs`` (a list of :class:`Run`) into the PNG file ``png``.

    Raises ImportError when matplotlib is missing (the extra: ``pip install -e '.[plot]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    loss_axes = dict(zip(LOSSES, axes[0]))
    for run_i, run in enumerate(runs):
        color = f"C{run_i % 10}"
        window = max(1, len(run.history) // 40)
        for key, ax in loss_axes.items():
            steps, values = _series(run.history, key)
            if steps and all(v > 0 for v in values):
                ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
                ax.plot(steps, _running_mean(values, window), color=color, lw=1.6)
            steps, values = _series(run.metrics, f"test_{key}")
            steps = [t for t, v in zip(steps, values) if v > 0]      # log scale: > 0 only
            values = [v for v in values if v > 0]
            if steps:
                ax.plot(steps, values, "o", color=color, mec="black", ms=6, zorder=3)
        for ax, key in ((axes[1, 0], "grad_norm"), (axes[1, 1], "lr")):
            steps, values = _series(run.history, key)
            ax.plot(steps, values, color=color, lw=1.2)
        for ax, pairs in ((axes[1, 2], (("i2t_r1", "-", "o"), ("t2i_r1", "--", "s"))),
                          (axes[1, 3], (("caption_exact", "-", "o"), ("bleu4", "--", "s")))):
            for key, style, marker in pairs:
                steps, values = _series(run.metrics, key)
                ax.plot(steps, values, style, marker=marker, color=color, lw=1.4, ms=5)

    titles = {"total": "training loss: total", "contrastive": "contrastive loss",
              "caption": "caption loss", "aux": "aux (router) loss"}
    for key, ax in loss_axes.items():
        ax.set_title(titles[key])
        ax.set_ylabel("loss (log scale)")
        if ax.lines:
            ax.set_yscale("log")
    axes[1, 0].set(title="gradient norm (before clipping)", ylabel="grad norm (log scale)")
    if axes[1, 0].lines:
        axes[1, 0].set_yscale("log")
    axes[1, 1].set(title="learning rate", ylabel="lr")
    axes[1, 2].set(title="retrieval recall@1 (test)", ylabel="R@1", ylim=(-0.02, 1.02))
    axes[1, 3].set(title="captioning (test)", ylabel="score", ylim=(-0.02, 1.02))
    for ax in axes.ravel():
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3, which="both")

    runs_legend = [Line2D([], [], color=f"C{i % 10}", lw=2, label=os.path.basename(r.name)
                          or r.name) for i, r in enumerate(runs)]
    grey = "0.35"
    fig.legend(handles=runs_legend + [
        Line2D([], [], color=grey, alpha=0.3, label="train, per step"),
        Line2D([], [], color=grey, lw=1.6, label="train, running mean"),
        Line2D([], [], color=grey, marker="o", ls="", mec="black", label="test (evaluation)")],
        fontsize=9, loc="upper center", ncol=len(runs_legend) + 3, bbox_to_anchor=(0.5, 0.955),
        frameon=False)
    for ax, labels in ((axes[1, 2], ("image→text", "text→image")),
                       (axes[1, 3], ("exact match", "BLEU-4"))):
        ax.legend(handles=[Line2D([], [], color=grey, ls="-", marker="o", label=labels[0]),
                           Line2D([], [], color=grey, ls="--", marker="s", label=labels[1])],
                  fontsize=8, loc="best")
    fig.suptitle("minivlmoe runs: " + ", ".join(r.name for r in runs), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
