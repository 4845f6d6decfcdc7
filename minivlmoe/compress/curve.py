"""The density-quality-speed curve: ``minivlmoe compress RUN --sweep --out DIR``.

For every density d of the grid (default 1, 0.5, 0.25, 0.1, 0.05, 0.02), one point:

* ``pruned``: RUN magnitude-pruned to d and fine-tuned (:func:`finetune.compress_run`,
  with the sweep's structure, schedule, steps and lr) into ``DIR/pruned-<d>``;
* ``scratch``: the same model trained from scratch at ``ModelConfig.density = d`` (the
  random fixed pattern of :func:`minivlmoe.ops.sparse_linear.init`) with RUN's training
  configuration into ``DIR/scratch-<d>``; at RUN's own density that *is* RUN, whose last
  evaluation is used;
* ``lowrank``: RUN factored at the rank whose stored-parameter count is nearest the pruned
  model's (:func:`matched_rank`, written against
  :func:`minivlmoe.compress.lowrank.lowrank_params`), fine-tuned like the pruned model,
  into ``DIR/lowrank-<d>``; skipped with the reason when that module is not there;
* ``timing``: seconds of one training step (forward, backward, AdamW) and of one
  inference forward (:func:`minivlmoe.model.losses_only`) on a training batch, for the
  pruned parameters and for RUN's, measured interleaved (:func:`time_pair`) so a busy
  machine slows both alike; the ratio is what to read;
* ``bytes``: the pruned run's ckpt.npz and its parameters' arrays, against RUN's.

Each point is one line of ``DIR/curve.jsonl``, appended when the point is finished; a
rerun skips finished points, and an interrupted run folder is resumed.  At the end
``DIR/curve.md`` (the table) and, with matplotlib, ``DIR/curve.png`` are written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

from .. import model, optim, train
from ..run_checkpoint import load_checkpoint
from ..run_folder import CKPT_NAME, METRICS_NAME, append_jsonl, read_metrics
from ..runs import builtin_tokenizer, make_data
from ..tokenizer import PAD_ID
from ..tree import flatten, unflatten
from . import finetune, prune

CURVE_NAME = "curve.jsonl"
QUALITY = ("i2t_r1", "t2i_r1", "caption_exact", "test_caption")


def read_points(path):
    """The points of a curve.jsonl (none if it is missing; a torn last line, left by a
    kill mid-write, is dropped: that point is computed again)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    points = []
    for n, line in enumerate(lines, 1):
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}: line {n} is not valid JSON") from None
    return points


def _tag(density):
    return f"{density:g}"


def _quality(record):
    return None if record is None else {k: record.get(k) for k in QUALITY}


def _finished_record(run_dir, steps):
    """The last metrics record of a finished run folder, else None."""
    if not os.path.isfile(os.path.join(run_dir, METRICS_NAME)):
        return None
    records = read_metrics(run_dir)
    return records[-1] if records and records[-1]["step"] == steps else None


def matched_rank(params, model_cfg, target, lowrank_params):
    """The rank r whose ``lowrank_params(params, model_cfg, rank=r)`` stores the number of
    parameters nearest ``target`` (ties: the smaller r), by bisection on r (the count
    grows with r).  Returns ``(r, count)``."""
    low = 1
    high = min(model_cfg.width, model_cfg.embed_dim)

    def count(r):
        return prune.stored_parameters(lowrank_params(params, model_cfg, rank=r)[0])

    while low < high:                      # the smallest r with count(r) >= target
        mid = (low + high) // 2
        if count(mid) >= target:
            high = mid
        else:
            low = mid + 1
    candidates = [r for r in (low - 1, low) if r >= 1]
    best = min(candidates, key=lambda r: (abs(count(r) - target), r))
    return best, count(best)


def time_pair(fns, repeats):
    """Median seconds of each of ``fns`` (no-argument callables), called interleaved
    ``repeats`` times after one warm-up call each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def step_times(params_list, model_cfg, train_cfg, repeats=10):
    """(train step seconds, inference forward seconds) of each parameter tree in
    ``params_list`` on one training batch of the run, measured interleaved."""
    splits = make_data(dataclasses.replace(train_cfg, n_train=train_cfg.batch_size,
                                           n_test=2), model_cfg.image_size)
    tok = builtin_tokenizer()
    images = splits.train.images.astype(model_cfg.dtype, copy=False)   # (B, R, R, Ch)
    ids = tok.encode(splits.train.captions, model_cfg.max_text_len)    # (B, T)
    adamw = train_cfg.adamw()

    def train_step(p, state):
        def run():
            _, grads, _ = model.loss_and_grads(p, model_cfg, images, ids, pad_id=PAD_ID,
                                               rng=np.random.default_rng(0), train=True)
            optim.step(p, grads, state, adamw)
        return run

    def forward(p):
        return lambda: model.losses_only(p, model_cfg, images, ids, pad_id=PAD_ID)

    copies = [unflatten({k: v.copy() for k, v in flatten(p).items()})
              for p in params_list]                   # the timed AdamW steps update them
    trains = time_pair([train_step(p, optim.init_state(p)) for p in copies], repeats)
    forwards = time_pair([forward(p) for p in params_list], repeats)
    return trains, forwards


def run_point(run, out, density, *, structure, schedule, finetune_steps, lr, interval,
              keep_ends=True, progress=None, repeats=10):
    """One point of the curve (a dict: the module docstring's fields)."""
    ckpt, model_cfg, train_cfg, _ = load_checkpoint(os.path.join(run, CKPT_NAME))
    parent_record = read_metrics(run)[-1] if os.path.isfile(
        os.path.join(run, METRICS_NAME)) else None
    tag = _tag(density)
    point = {"density": density, "structure": structure, "schedule": schedule}

    pruned_dir = os.path.join(out, f"pruned-{tag}")
    steps = finetune_steps or max(1, train_cfg.steps // 5)
    record = _finished_record(pruned_dir, steps)
    if record is None:
        record = finetune.compress_run(run, pruned_dir, density=density, structure=structure,
                                       schedule=schedule, finetune_steps=steps, lr=lr,
                                       interval=interval, keep_ends=keep_ends,
                                       progress=progress).record
    pruned_ckpt, _, _, _ = load_checkpoint(os.path.join(pruned_dir, CKPT_NAME))
    stored = prune.stored_parameters(pruned_ckpt.params)
    point["pruned"] = {**_quality(record), "stored_parameters": stored,
                       "finetune_steps": steps}

    if density == model_cfg.density:
        scratch = parent_record                        # RUN is the model at this density
    else:
        scratch_dir = os.path.join(out, f"scratch-{tag}")
        scratch = _finished_record(scratch_dir, train_cfg.steps)
        if scratch is None:
            scratch_cfg = dataclasses.replace(model_cfg, density=density)
            resume = os.path.isfile(os.path.join(scratch_dir, CKPT_NAME))
            result = train.train(scratch_cfg, train_cfg, scratch_dir, resume=resume,
                                 progress=progress, preset=ckpt.config.get("preset"))
            scratch = result.evaluations[-1] if result.evaluations else \
                read_metrics(scratch_dir)[-1]
    point["scratch"] = {**_quality(scratch), "steps": train_cfg.steps}

    point["lowrank"] = lowrank_point(run, out, density, ckpt.params, model_cfg, stored,
                                     steps, lr, progress)

    trains, forwards = step_times([ckpt.params, pruned_ckpt.params], model_cfg, train_cfg,
                                  repeats)
    point["timing"] = {"train_step_s": trains[1], "train_step_s_parent": trains[0],
                       "train_ratio": trains[1] / trains[0],
                       "forward_s": forwards[1], "forward_s_parent": forwards[0],
                       "forward_ratio": forwards[1] / forwards[0], "repeats": repeats}
    point["bytes"] = {"ckpt": os.path.getsize(os.path.join(pruned_dir, CKPT_NAME)),
                      "ckpt_parent": os.path.getsize(os.path.join(run, CKPT_NAME)),
                      "params": finetune.params_bytes(pruned_ckpt.params),
                      "params_parent": finetune.params_bytes(ckpt.params)}
    point["parent"] = _quality(parent_record)
    return point


def lowrank_point(run, out, density, params, model_cfg, target, steps, lr, progress):
    """Low rank at the pruned model's stored-parameter count (``target``), fine-tuned
    like it; ``{"skipped": reason}`` when minivlmoe.compress.lowrank is not there."""
    try:
        from .lowrank import lowrank_params
    except ImportError as e:
        return {"skipped": f"minivlmoe.compress.lowrank is not available ({e})"}
    rank, count = matched_rank(params, model_cfg, target, lowrank_params)
    lr_dir = os.path.join(out, f"lowrank-{_tag(density)}")
    record = _finished_record(lr_dir, steps)
    if record is None:
        record = finetune.compress_run(run, lr_dir, method="lowrank", rank=rank,
                                       finetune_steps=steps, lr=lr, progress=progress).record
    return {**_quality(record), "rank": rank, "stored_parameters": count}


def sweep(run, out, densities, *, structure="unstructured", schedule="oneshot",
          finetune_steps=None, lr=None, interval=None, keep_ends=True, progress=sys.stderr,
          repeats=10):
    """Every point of the curve not yet in ``out/curve.jsonl``; then the table and the
    figure.  Returns the list of points (in grid order)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, CURVE_NAME)
    done = {}
    for p in read_points(path):
        done[(p["density"], p["structure"], p["schedule"])] = p
    points = []
    for d in densities:
        key = (d, structure, schedule)
        if key not in done:
            if progress is not None:
                print(f"curve: density {d:g} ({structure}, {schedule})", file=progress,
                      flush=True)
            done[key] = run_point(run, out, d, structure=structure, schedule=schedule,
                                  finetune_steps=finetune_steps, lr=lr, interval=interval,
                                  keep_ends=keep_ends, progress=progress, repeats=repeats)
            append_jsonl(path, done[key])
        points.append(done[key])
    with open(os.path.join(out, "curve.md"), "w", encoding="utf-8") as f:
        f.write(format_table(points) + "\n")
    return points


def _f(value, fmt=".3f"):
    return "-" if value is None else format(value, fmt)


def format_table(points):
    """The curve as a Markdown table."""
    head = ("| density | pruned i2t / t2i / exact | scratch i2t / t2i / exact | "
            "low rank i2t / t2i / exact (rank) | stored params | train step x | "
            "forward x | ckpt bytes |")
    lines = [head, "|" + "---|" * 8]
    for p in sorted(points, key=lambda p: -p["density"]):
        pr, sc, lr = p["pruned"], p["scratch"], p["lowrank"]
        low = ("skipped" if "skipped" in lr else
               f"{_f(lr['i2t_r1'])} / {_f(lr['t2i_r1'])} / {_f(lr['caption_exact'])} "
               f"({lr['rank']})")
        lines.append(
            f"| {p['density']:g} | {_f(pr['i2t_r1'])} / {_f(pr['t2i_r1'])} / "
            f"{_f(pr['caption_exact'])} | {_f(sc['i2t_r1'])} / {_f(sc['t2i_r1'])} / "
            f"{_f(sc['caption_exact'])} | {low} | {pr['stored_parameters']:,} | "
            f"{p['timing']['train_ratio']:.2f} | {p['timing']['forward_ratio']:.2f} | "
            f"{p['bytes']['ckpt']:,} |")
    return "\n".join(lines)


def plot(points, png):
    """Quality, time ratios and bytes against density (log axis), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: -p["density"])
    d = [p["density"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for kind, style in (("pruned", "-o"), ("scratch", "--s"), ("lowrank", ":^")):
        rows = [(p["density"], p[kind]) for p in points if "skipped" not in p[kind]]
        if not rows:
            continue
        for metric, color in (("i2t_r1", "C0"), ("t2i_r1", "C1"), ("caption_exact", "C2")):
            ax.plot([x for x, _ in rows], [q[metric] for _, q in rows], style, color=color,
                    label=f"{kind} {metric}")
    ax.set(xscale="log", xlabel="density", ylabel="test metric", title="quality")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(d, [p["timing"]["train_ratio"] for p in points], "-o", label="training step")
    ax.plot(d, [p["timing"]["forward_ratio"] for p in points], "-s", label="inference forward")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="density", ylabel="time / time of the parent",
           title="time (one BLAS thread)")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(d, [p["bytes"]["ckpt"] / p["bytes"]["ckpt_parent"] for p in points], "-o",
            label="ckpt.npz")
    ax.plot(d, [p["bytes"]["params"] / p["bytes"]["params_parent"] for p in points], "-s",
            label="parameters")
    ax.set(xscale="log", yscale="log", xlabel="density", ylabel="bytes / parent's",
           title="stored bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def cmd_sweep(args, progress):
    """``compress RUN --sweep``: the curve into --out (called by commands.cmd_compress)."""
    points = sweep(args.run, args.out, args.densities, structure=args.structure,
                   schedule=args.schedule, finetune_steps=args.finetune_steps, lr=args.lr,
                   interval=args.interval, keep_ends=not args.prune_ends, progress=progress)
    print(format_table(points))
    print(f"points: {os.path.join(args.out, CURVE_NAME)}  table: "
          f"{os.path.join(args.out, 'curve.md')}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("(no figure: matplotlib is not installed)")
        return 0
    png = os.path.join(args.out, "curve.png")
    plot(points, png)
    print(f"figure: {png}")
    return 0
