"""Whole-model inference forward at density 0.05 against the same model at density 1.

The model is a preset's (default: the default preset, modality experts), float32; the
forward is :func:`minivlmoe.model.losses_only` (image tower, text tower, contrastive and
caption losses, no backward) on one evaluation batch (``--batch``, 256 pairs by default).
Three sparse versions at ``--density`` are timed against the dense one:

  init        ``ModelConfig.density = d``: sparse_linear.init's random pattern, in groups
              of 16 rows sharing columns (what a model trained sparse from scratch has);
  row-group   the dense parameters magnitude-pruned, row-group structure (compress);
  unstructured  the dense parameters magnitude-pruned per row.

All four are timed interleaved in one run (dense, init, row-group, unstructured, dense,
...) and the median of each is reported with its ratio to the dense forward, so a busy
machine slows them alike.  Target of issue 9: ratio <= 0.7 at density 0.05.

Run with one BLAS thread (the script sets it if unset):
    OPENBLAS_NUM_THREADS=1 python benchmarks/compress_forward.py
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

from minivlmoe import model, runs  # noqa: E402
from minivlmoe.compress import prune  # noqa: E402
from minivlmoe.compress.curve import time_pair  # noqa: E402
from minivlmoe.tokenizer import PAD_ID  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", choices=sorted(runs.PRESETS))
    ap.add_argument("--experts", default="modality")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    cfg, tcfg = runs.preset_configs(args.preset, experts=args.experts)
    splits = runs.make_data(dataclasses.replace(tcfg, n_train=args.batch, n_test=2),
                            cfg.image_size)
    images = splits.train.images.astype(cfg.dtype)                     # (B, R, R, Ch)
    ids = runs.builtin_tokenizer().encode(splits.train.captions, cfg.max_text_len)  # (B, T)
    dense = model.init(np.random.default_rng(0), cfg)
    versions = {
        "dense (1.0)": dense,
        "init": model.init(np.random.default_rng(0), dataclasses.replace(cfg, density=args.density)),
        "row-group": prune.prune_params(dense, args.density, "row-group")[0],
        "unstructured": prune.prune_params(dense, args.density, "unstructured")[0],
    }
    fns = [lambda p=p: model.losses_only(p, cfg, images, ids, pad_id=PAD_ID)
           for p in versions.values()]
    times = time_pair(fns, args.repeats)
    print(f"preset {args.preset} ({args.experts}), batch {args.batch}, density "
          f"{args.density:g}, {args.repeats} interleaved repeats, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
    print(f"{'version':<14} {'median s':>9} {'ratio':>7}")
    for name, t in zip(versions, times):
        print(f"{name:<14} {t:>9.4f} {t / times[0]:>7.3f}")


if __name__ == "__main__":
    main()
