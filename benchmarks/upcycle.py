"""Upcycled MoE vs the same MoE from scratch vs the dense parent trained further, at equal
training steps (docs/compression.md#upcycling).

Per seed, one run at a time (finished runs are reused):

    dense{P}-s{S}     dense parent, P steps                  train --experts dense --steps P
    up{N}-s{S}        the parent upcycled, N more steps      upcycle --experts E --steps N
    cont{N}-s{S}      the parent trained N more steps, same schedule as the upcycled run
    {mode}{P+N}-s{S}  the MoE from scratch, P + N steps      train --experts MODE --steps P+N
    dense{P+N}-s{S}   the dense model from scratch, P + N steps

then the table of test caption loss, R@1 and caption exact match (mean and std over the
seeds) on the default preset.  With top-1 routing every arm does the same FFN compute per
token, so equal steps are equal training compute (the router's E x D is left out).

    OPENBLAS_NUM_THREADS=1 nice -n 5 python benchmarks/upcycle.py --out runs/upcycle
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

from minivlmoe import run_folder, runs, train          # noqa: E402
from minivlmoe.compress import upcycle                 # noqa: E402

FIGURES = ("test_caption", "i2t_r1", "t2i_r1", "caption_exact")


def finished(path, steps):
    records = run_folder.read_metrics(path) if os.path.isdir(path) else []
    return bool(records) and records[-1]["step"] == steps


def arms(args):
    P, N = args.parent_steps, args.steps
    return [("dense parent", f"dense{P}", P), ("upcycled", f"up{N}", N),
            (f"dense parent + {N}", f"cont{N}", N), (f"{args.mode} scratch", f"{args.mode}{P + N}",
                                                  P + N),
            ("dense scratch", f"dense{P + N}", P + N)]


def run_all(args, seed):
    P, N = args.parent_steps, args.steps
    for label, name, steps in arms(args):
        out = os.path.join(args.out, f"{name}-s{seed}")
        if finished(out, steps):
            continue
        print(f"seed {seed}: {label} -> {out}", file=sys.stderr, flush=True)
        parent = os.path.join(args.out, f"dense{P}-s{seed}")
        if name.startswith("up"):
            upcycle.upcycle_run(parent, out, num_experts=args.experts, mode=args.mode,
                                steps=N)
        elif name.startswith("cont"):
            upcycle.continue_run(parent, out, steps=N)
        else:
            experts = "dense" if name.startswith("dense") else args.mode
            model_cfg, train_cfg = runs.preset_configs("default", experts=experts, steps=steps,
                                                       seed=seed)
            if experts != "dense":
                model_cfg = dataclasses.replace(model_cfg, num_experts=args.experts)
            train.train(model_cfg, train_cfg, out, preset="default", progress=None)


def summary(args):
    rows = []
    for label, name, steps in arms(args):
        finals = [run_folder.read_metrics(os.path.join(args.out, f"{name}-s{s}"))[-1]
                  for s in args.seeds
                  if finished(os.path.join(args.out, f"{name}-s{s}"), steps)]
        if not finals:
            continue
        row = {"arm": label, "run": name, "steps": steps, "seeds": len(finals)}
        for f in FIGURES:
            values = np.array([r[f] for r in finals])
            row[f] = (float(values.mean()), float(values.std()), values.tolist())
        rows.append(row)
    return rows


def format_rows(rows, args):
    P, N = args.parent_steps, args.steps
    head = (f"| arm | steps | test caption loss | i2t R@1 | t2i R@1 | caption exact | "
            f"caption loss per seed |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cells = " | ".join(f"{r[f][0]:.4f} ± {r[f][1]:.4f}" for f in FIGURES)
        total = f"{P} + {N}" if r["run"].startswith(("up", "cont")) else str(r["steps"])
        per_seed = ", ".join(f"{v:.4f}" for v in r["test_caption"][2])
        seeds = f"{r['seeds']} seed{'s' if r['seeds'] > 1 else ''}"
        lines.append(f"| {r['arm']} ({seeds}) | {total} | {cells} | {per_seed} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/upcycle")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parent-steps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--mode", choices=upcycle.UPCYCLE_MODES, default="shared")
    p.add_argument("--summary-only", action="store_true", help="only the table of finished runs")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if not args.summary_only:
        for seed in args.seeds:
            run_all(args, seed)
    rows = summary(args)
    print(format_rows(rows, args))
    with open(os.path.join(args.out, "upcycle_summary.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
