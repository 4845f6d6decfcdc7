"""The search for a regime where experts help (docs/experiments.md, "How the regime was found").

Each point is one run, seed 0, of the ``default`` preset with the overrides listed in
:data:`POINTS` (ModelConfig fields, then TrainConfig fields), trained as
``minivlmoe train`` trains (the same ``minivlmoe.train.train``).  The search compared
one dense model with one MoE model of the same active compute per point, in the order
below; the last pair became the ``scaling`` preset (``moe_every=1``, three objects,
65536 training pairs; the preset trains 1200 steps instead of 1500 to fit the sweep
into an hour).  Finished runs are not redone; one table at the end:

    OPENBLAS_NUM_THREADS=1 python benchmarks/scaling_search.py [--only NAME] [--out DIR]

About 45 minutes on one core for every point.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minivlmoe import runs, train  # noqa: E402
from minivlmoe.run_folder import read_metrics  # noqa: E402

THREE = {"max_objects": 3}
FRESH = {"max_objects": 3, "n_train": 65536}
# name, experts, E, ModelConfig overrides, TrainConfig overrides
POINTS = [
    ("A-dense", "dense", 1, {}, THREE),                  # the default, three objects
    ("A-shared8", "shared", 8, {}, THREE),
    ("C-dense", "dense", 1, {}, FRESH),                  # + 8x the training pairs
    ("C-shared8", "shared", 8, {}, FRESH),
    ("D-shared8", "shared", 8, {"moe_every": 1}, FRESH),  # + experts in every layer
    ("E-dense", "dense", 1, {"mlp_hidden": 32, "expert_hidden": 32}, FRESH),  # narrow FFNs
    ("E-shared8", "shared", 8, {"mlp_hidden": 32, "expert_hidden": 32, "moe_every": 1},
     FRESH),
    ("F-dense", "dense", 1, {}, {**FRESH, "steps": 600}),  # a short budget
    ("F-shared8", "shared", 8, {"moe_every": 1}, {**FRESH, "steps": 600}),
    ("G-modality8", "modality", 8, {"moe_every": 1}, FRESH),  # VL-MoE's modality experts
]
KEYS = ("test_caption", "test_contrastive", "i2t_r1", "t2i_r1", "caption_exact")


def run(point, out):
    """Train ``point`` in ``out/<name>`` unless it is finished; its final metrics."""
    name, experts, E, model_kw, train_kw = point
    mcfg, tcfg = runs.preset_configs("default", experts=experts, **train_kw)
    mcfg = dataclasses.replace(mcfg, num_experts=max(E, mcfg.top_k), **model_kw)
    run_dir = os.path.join(out, name)
    metrics = read_metrics(run_dir) if os.path.exists(run_dir) else []
    if not metrics or metrics[-1]["step"] != tcfg.steps:
        t = time.perf_counter()
        train.train(mcfg, tcfg, run_dir, resume=bool(metrics), progress=None,
                    preset="default")
        print(f"{name}: trained in {time.perf_counter() - t:.0f} s", flush=True)
        metrics = read_metrics(run_dir)
    return metrics[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="one point's name")
    ap.add_argument("--out", default=os.path.join("sweeps", "search"))
    args = ap.parse_args()
    points = [p for p in POINTS if args.only in (None, p[0])]
    if not points:
        sys.exit(f"scaling_search: no point named {args.only!r}; the points: "
                 f"{', '.join(p[0] for p in POINTS)}")
    rows = [(p, run(p, args.out)) for p in points]
    print(f"{'point':12s} {'experts':8s} {'E':>2s}  {'model':40s} {'train':35s} "
          + " ".join(f"{k:>16s}" for k in KEYS))
    for (name, experts, E, model_kw, train_kw), m in rows:
        print(f"{name:12s} {experts:8s} {E:2d}  {json.dumps(model_kw):40s} "
              f"{json.dumps(train_kw):35s} " + " ".join(f"{m[k]:16.4f}" for k in KEYS))


if __name__ == "__main__":
    main()
