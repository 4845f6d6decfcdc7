"""A scaling study: dense and MoE models at equal active compute per token (``minivlmoe sweep``).

The grid
--------
Every point of a sweep is the preset's model with one change, the number of experts E:

* E = 1 is the dense model (``experts="dense"``): its FFN at every MoE position has
  hidden width ``F * K`` (``F = expert_hidden``, ``K = top_k``), the K experts a token
  of the MoE models runs through;
* E >= 2 is a MoE model (``experts="shared"``, LIMoE, or ``"modality"``, VL-MoE) with E
  experts of width F per pool and top-K routing; with ``ablation`` also the modality
  mode with experts for the image tokens only and for the text tokens only
  (``moe_modalities``, VL-MoE's Table 3), the other modality through a dense FFN of
  width F * K.

Everything else (width D, layers, the non-MoE FFNs, the data, the optimizer, the steps)
is the preset's, so every point does the same multiply-adds per token: at a MoE
position a token costs ``2 * D * F * K`` in the FFN in every mode, plus ``D * E`` for
the router's logits (the one cost that grows with E: 16 * 64 = 1024 against
2 * 64 * 128 = 16384 at the default size, 6%).  Only the stored parameters grow:
``E * (2 D F + F + D)`` per pool instead of ``2 D F K + F K + D``.

:func:`param_counts` counts from the parameter tree (stored entries of the sparse
weights): *stored* is every parameter; *active per token* is every parameter a token
goes through, i.e. the stored ones minus, at each MoE position, the experts it is not
sent to (E - K of its pool's, and the other modality's pool or dense FFN), with the
router counted apart (*router per token*).  With K = 1 the active count is the same at
every point; with K >= 2 the dense FFN has D biases where the K experts have K * D.

Files (``out`` folder)
----------------------
* ``<label>-E<E>-s<seed>/``: each run is an ordinary run folder (train --out), so
  ``minivlmoe eval``, ``plot`` and ``caption`` work on it; a finished run is not
  trained again, an interrupted one resumes from its checkpoint (written at each of
  the preset's evaluations).
* ``sweep.jsonl``: one row per finished run (appended crash-safely, the last row of a
  run wins): the point, the configs, the parameter counts, the wall time and every
  metric of the final evaluation (test losses included).
* ``summary.txt``: mean and standard deviation over seeds per (mode, E); ``sweep.png``
  with matplotlib: test losses and R@1 against stored parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from . import atomic, model, run_checkpoint, runs, train
from .run_folder import CKPT_NAME, CONFIG_NAME, append_jsonl, read_jsonl, read_metrics
from .tree import flatten

ROWS_NAME = "sweep.jsonl"
SUMMARY_NAME = "summary.txt"
PNG_NAME = "sweep.png"
MODES = ("shared", "modality")
ABLATION = ("image", "text")       # moe_modalities of the ablation points


class SweepError(ValueError):
    """A sweep folder that cannot be used as asked (one line, exit status 1)."""


class Point(NamedTuple):
    """One run of the grid.

    Fields
    ------
    label : "dense", "shared", "modality", "modality-image" or "modality-text".
    experts : ModelConfig.experts.   num_experts : E (1 for dense).
    moe_modalities : ModelConfig.moe_modalities.   seed : TrainConfig.seed.
    """

    label: str
    experts: str
    num_experts: int
    moe_modalities: str
    seed: int

    @property
    def name(self):
        """The run folder's name, e.g. ``shared-E4-s0``."""
        return f"{self.label}-E{self.num_experts}-s{self.seed}"


def make_grid(experts_grid, modes, seeds, *, ablation=False, top_k=1):
    """The points of a sweep, in order: per seed, dense then each E and mode.

    Raises ValueError (the command line's usage error) naming the bad value: an
    empty grid, E < 1, top_k > E, an unknown mode, duplicates, a negative seed, or the
    ablation without the modality mode.
    """
    experts_grid, modes, seeds = list(experts_grid), list(modes), list(seeds)
    for name, values in (("experts grid", experts_grid), ("modes", modes), ("seeds", seeds)):
        if not values:
            raise ValueError(f"{name} must not be empty, got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} must not repeat a value, got {values}")
    for E in experts_grid:
        if isinstance(E, bool) or not isinstance(E, int) or E < 1:
            raise ValueError(f"expert counts must be integers >= 1 (1 = dense), got {E!r}")
        if E > 1 and top_k > E:
            raise ValueError(f"top-k must be at most every expert count > 1, got top-k "
                             f"{top_k} with E = {E}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes must be among {list(MODES)}, got {mode!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seeds must be integers >= 0, got {seed!r}")
    if ablation and "modality" not in modes:
        raise ValueError(f"the ablation is of the modality mode: modes must include "
                         f"'modality', got {modes}")
    labels = [(mode, mode, "both") for mode in modes]
    if ablation:
        labels += [(f"modality-{where}", "modality", where) for where in ABLATION]
    points = []
    for seed in seeds:
        for E in sorted(experts_grid):
            if E == 1:
                points.append(Point("dense", "dense", 1, "both", seed))
            else:
                points += [Point(label, experts, E, where, seed)
                           for label, experts, where in labels]
    return points


def point_configs(point, preset="default", *, steps=None, top_k=None):
    """(ModelConfig, TrainConfig) of a point: the preset's, with the point's experts."""
    mcfg, tcfg = runs.preset_configs(preset, experts=point.experts, steps=steps,
                                     seed=point.seed)
    K = mcfg.top_k if top_k is None else top_k
    mcfg = dataclasses.replace(mcfg, num_experts=max(point.num_experts, K), top_k=K,
                               moe_modalities=point.moe_modalities)
    return mcfg, tcfg


def _size(tree):
    return sum(leaf.nnz if isinstance(leaf, sp.csr_array) else int(np.size(leaf))
               for leaf in flatten(tree).values())


def param_counts(cfg):
    """``(stored, active per token, router per token)`` of a ModelConfig (module
    docstring), counted on a freshly initialized parameter tree."""
    params = model.init(np.random.default_rng(0), cfg)
    stored = _size(params)
    active, router = stored, 0
    for block in params["blocks"].values():
        if "moe" not in block:
            continue
        moe = block["moe"]
        pools = [moe] if "router" in moe else list(moe.values())   # shared | image, text
        active -= _size(moe) + (_size(block["ffn"]) if "ffn" in block else 0)
        pool = pools[0]                # a token goes through one pool (all the same size)
        experts = list(pool["experts"].values())
        active += cfg.top_k * _size(experts[0])
        router += _size(pool["router"])
    return stored, active, router


# ----------------------------------------------------------------------------- one run

def _status(run_dir, config, steps):
    """"done", "resume" or "new" for the run folder of ``config``."""
    path = os.path.join(run_dir, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        return "new"
    except (OSError, ValueError) as e:
        raise SweepError(f"run folder {run_dir}: {CONFIG_NAME} unreadable "
                         f"({type(e).__name__}); delete the folder to redo the run") from None
    for part in ("model", "train", "preset"):
        if saved.get(part) != json.loads(json.dumps(config[part])):
            raise SweepError(f"run folder {run_dir} holds another run (its {part!r} config "
                             f"differs, e.g. other --steps or --preset); use another --out")
    if not os.path.exists(os.path.join(run_dir, CKPT_NAME)):
        return "new"
    ckpt, *_ = run_checkpoint.load_checkpoint(os.path.join(run_dir, CKPT_NAME))
    metrics = read_metrics(run_dir)
    if ckpt.step == steps and metrics and metrics[-1]["step"] == steps:
        return "done"
    return "resume"


def run_point(point, out, preset="default", *, steps=None, top_k=None):
    """Train (or resume, or skip) one point in ``out/<point.name>``; its sweep row.

    Returns ``(row, status)`` with status "done" (already finished: nothing trained),
    "resume" or "new".  Training prints nothing (``progress=None``).
    """
    mcfg, tcfg = point_configs(point, preset, steps=steps, top_k=top_k)
    run_dir = os.path.join(out, point.name)
    config = runs.run_config(mcfg, tcfg, runs.builtin_tokenizer(), preset)
    status = _status(run_dir, config, tcfg.steps)
    if status != "done":
        train.train(mcfg, tcfg, run_dir, resume=status == "resume", progress=None,
                    preset=preset)
    final = read_metrics(run_dir)[-1]
    stored, active, router = param_counts(mcfg)
    row = {"step": final["step"], "run": point.name, "label": point.label,
           "experts": point.experts, "num_experts": point.num_experts,
           "moe_modalities": point.moe_modalities, "top_k": mcfg.top_k, "seed": point.seed,
           "preset": preset, "stored_params": stored, "active_params_per_token": active,
           "router_params_per_token": router, "wall_s": final["elapsed_s"],
           "metrics": {k: v for k, v in final.items()
                       if k not in ("experts", "step", "elapsed_s")},
           "model": mcfg.to_dict(), "train": tcfg.to_dict()}
    return row, status


def _run_in_worker(job):
    """:func:`run_point` in a worker process (``--jobs N``)."""
    point, out, preset, steps, top_k = job
    return run_point(Point(*point), out, preset, steps=steps, top_k=top_k)


# ----------------------------------------------------------------------------- the sweep

def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_sweep(points, out, preset="default", *, steps=None, top_k=None, jobs=1,
              progress=sys.stderr):
    """Run every point (``jobs`` at a time), appending each finished run's row to
    ``out/sweep.jsonl``; returns the rows of ``points``, in their order.

    With ``jobs > 1`` the runs go to a pool of ``jobs`` worker processes (multiprocessing,
    "spawn"), each with one BLAS thread; this process writes every row.  A progress line
    per finished run: run i of n, its result, the elapsed time and the ETA (from the
    mean time of the runs trained so far).
    """
    os.makedirs(out, exist_ok=True)
    rows_path = os.path.join(out, ROWS_NAME)
    have = {r["run"]: r for r in read_jsonl(rows_path)}
    rows, t0, trained = {}, time.perf_counter(), []
    jobs_list = [(tuple(p), out, preset, steps, top_k) for p in points]

    def finished(i, row, status, t_run):
        if have.get(row["run"]) != row:
            append_jsonl(rows_path, row)
        rows[row["run"]] = row
        if status != "done":
            trained.append(t_run)
        left = len(points) - i
        eta = (sum(trained) / len(trained) * math.ceil(left / jobs)) if trained else 0.0
        m = {k: row["metrics"].get(k, float("nan"))
             for k in ("test_caption", "test_contrastive", "i2t_r1", "t2i_r1")}
        took = "already done" if status == "done" else f"{row['wall_s']:.1f} s"
        if progress is not None:
            print(f"sweep: run {i} of {len(points)} {row['run']}: {took}, test caption "
                  f"{m['test_caption']:.3f}, contrastive {m['test_contrastive']:.3f}, "
                  f"R@1 {m['i2t_r1']:.3f}/{m['t2i_r1']:.3f} | elapsed "
                  f"{_clock(time.perf_counter() - t0)}, ETA {_clock(eta)}",
                  file=progress, flush=True)

    if jobs == 1:
        for i, job in enumerate(jobs_list, 1):
            t = time.perf_counter()
            row, status = _run_in_worker(job)
            finished(i, row, status, time.perf_counter() - t)
    else:
        _run_pool(jobs_list, jobs, finished)
    return [rows[p.name] for p in points]


def _ignore_sigint():
    """Workers leave Ctrl-C to the main process, which then terminates them (a kill
    during a checkpoint save leaves the previous checkpoint: the writes are atomic)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_pool(jobs_list, jobs, finished):
    import multiprocessing

    from .threads import ENV_VARS

    saved = {name: os.environ.get(name) for name in ENV_VARS}
    os.environ.update({name: "1" for name in ENV_VARS})     # the workers' BLAS: one thread
    try:
        pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_ignore_sigint)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        for i, (row, status) in enumerate(pool.imap_unordered(_run_in_worker, jobs_list), 1):
            # a run's own time is its wall time; the pool's gaps are shared by ``jobs``
            finished(i, row, status, row["wall_s"] if status != "done" else 0.0)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------- summary

SUMMARY_METRICS = (("test_caption", "test caption CE"), ("test_contrastive", "test contrastive"),
                   ("i2t_r1", "i2t R@1"), ("t2i_r1", "t2i R@1"),
                   ("caption_exact", "caption exact"))


def summarize(rows):
    """Per (label, E), in the rows' order: ``{"label", "num_experts", "stored_params",
    "active_params_per_token", "router_params_per_token", "seeds", "wall_s",
    <metric>: (mean, std)}``; std is the sample standard deviation (None for one seed)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["label"], row["num_experts"]), []).append(row)
    out = []
    for (label, E), group in groups.items():
        entry = {"label": label, "num_experts": E,
                 "stored_params": group[0]["stored_params"],
                 "active_params_per_token": group[0]["active_params_per_token"],
                 "router_params_per_token": group[0]["router_params_per_token"],
                 "seeds": [r["seed"] for r in group],
                 "wall_s": float(np.mean([r["wall_s"] for r in group]))}
        for key, _ in SUMMARY_METRICS + (("bleu4", ""),):
            values = [r["metrics"][key] for r in group if key in r["metrics"]]
            if values:
                entry[key] = (float(np.mean(values)),
                              float(np.std(values, ddof=1)) if len(values) > 1 else None)
        out.append(entry)
    order = {"dense": 0, **{m: 1 + i for i, m in enumerate(MODES)},
             **{f"modality-{w}": 9 + i for i, w in enumerate(ABLATION)}}
    return sorted(out, key=lambda e: (order.get(e["label"], 99), e["num_experts"]))


def format_summary(summary):
    """The summary as a text table (mean ± std over seeds)."""
    def cell(value):
        if value is None:
            return "-"
        mean, std = value
        return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"

    head = ["mode", "E", "stored", "active/token", "router/token", "seeds", "wall s"]
    head += [title for _, title in SUMMARY_METRICS]
    lines = []
    for e in summary:
        lines.append([e["label"], str(e["num_experts"]), f"{e['stored_params']:,}",
                      f"{e['active_params_per_token']:,}", f"{e['router_params_per_token']:,}",
                      str(len(e["seeds"])), f"{e['wall_s']:.1f}"]
                     + [cell(e.get(key)) for key, _ in SUMMARY_METRICS])
    widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    rule = "-" * len(fmt(head))
    return "\n".join([fmt(head), rule] + [fmt(r) for r in lines])


def write_summary(text, out):
    """Write ``out/summary.txt`` atomically; returns its path."""
    path = os.path.join(out, SUMMARY_NAME)
    atomic.atomic_write(path, (text + "\n").encode("utf-8"))
    return path


def plot_summary(summary, path, title=""):
    """Test caption CE, test contrastive loss and both R@1 against stored parameters, one
    line per mode with its std over seeds as error bars, dense as the dashed reference.

    Raises ImportError when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [("test_caption", "test caption cross-entropy (lower is better)"),
              ("test_contrastive", "test contrastive loss (lower is better)"),
              ("i2t_r1", "image→text R@1 (higher is better)"),
              ("t2i_r1", "text→image R@1 (higher is better)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    dense = [e for e in summary if e["label"] == "dense"]
    labels = [lab for lab in dict.fromkeys(e["label"] for e in summary) if lab != "dense"]
    thousands = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k")
    for ax, (key, name) in zip(axes.flat, panels):
        ref = [e for e in dense if key in e]
        for e in ref:                           # the reference: a gray point and line
            ax.errorbar([e["stored_params"]], [e[key][0]], yerr=[e[key][1] or 0.0],
                        color="gray", marker="*", markersize=10, capsize=3)
            ax.axhline(e[key][0], color="gray", linestyle="--", linewidth=1,
                       label="dense (E=1)")
        for lab, marker in zip(labels, "osD^v"):
            pts = [e for e in summary if e["label"] == lab and key in e]
            if not pts:
                continue
            line, = ax.plot([e["stored_params"] for e in ref + pts],
                            [e[key][0] for e in ref + pts], marker=marker, label=lab)
            ax.errorbar([e["stored_params"] for e in pts], [e[key][0] for e in pts],
                        yerr=[e[key][1] or 0.0 for e in pts], fmt="none",
                        color=line.get_color(), capsize=3)
            for e in pts:
                ax.annotate(f"E={e['num_experts']}", (e["stored_params"], e[key][0]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(thousands)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("stored parameters (log scale; equal active compute per token)")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "experts at equal active compute (mean ± std over seeds)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
