"""Minor page faults and time per training step, with and without keeping the freed heap.

Runs the same training steps (the default preset's model, one BLAS thread) in fresh
processes, alternately with ``minivlmoe.heap.keep_freed_heap()`` (what the command line
does) and without it (glibc's default thresholds), ``--rounds`` times each, and prints
per setting the median of the minor page faults per step (``resource.getrusage``) and
of the milliseconds per step, and the ratio of the times::

    python benchmarks/page_faults.py [--experts dense] [--steps 30] [--rounds 3]

Each measurement is its own process because the thresholds can only be raised, not
restored, within one; the rounds alternate so that a busy machine slows both alike.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(experts, steps, warmup):
    """One process's measurement: ``{"faults": per step, "ms": per step, "kept": bool}``."""
    import resource
    import time

    sys.path.insert(0, ROOT)
    from minivlmoe import heap

    kept = heap.keep_freed_heap()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from minivlmoe import runs
    from train_step import make_step      # the same step as benchmarks/train_step.py

    mcfg, tcfg = runs.preset_configs("default", experts=experts)
    tcfg = runs.TrainConfig(**{**tcfg.to_dict(), "n_train": 512, "n_test": 2})
    one_step = make_step(mcfg, tcfg)

    for _ in range(warmup):
        one_step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"faults": faults / steps, "ms": 1000 * seconds / steps, "kept": kept}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", default="dense", choices=("modality", "shared", "dense"))
    ap.add_argument("--steps", type=int, default=30, help="measured steps per process (30)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (3)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per setting (3)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.experts, args.steps, args.warmup)))
        return
    results = {"kept": [], "default": []}
    for _ in range(args.rounds):
        for setting in ("default", "kept"):
            env = {**os.environ, "MINIVLMOE_KEEP_HEAP": "1" if setting == "kept" else "0"}
            out = subprocess.run([sys.executable, __file__, "--child", "--experts",
                                  args.experts, "--steps", str(args.steps), "--warmup",
                                  str(args.warmup)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            row = json.loads(out.splitlines()[-1])
            if row["kept"] != (setting == "kept"):
                sys.exit(f"page_faults: the {setting} process had kept={row['kept']}")
            results[setting].append(row)
    print(f"default preset, experts {args.experts}, {args.steps} steps after {args.warmup}, "
          f"{args.rounds} processes per setting, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}")
    med = {}
    for setting, rows in results.items():
        med[setting] = (statistics.median(r["faults"] for r in rows),
                        statistics.median(r["ms"] for r in rows))
        label = "kept heap (the CLI)" if setting == "kept" else "glibc defaults"
        print(f"  {label:<20} minor faults/step {med[setting][0]:>9,.0f}   "
              f"ms/step {med[setting][1]:6.1f}")
    print(f"  time ratio kept / defaults: {med['kept'][1] / med['default'][1]:.2f}")


if __name__ == "__main__":
    main()
