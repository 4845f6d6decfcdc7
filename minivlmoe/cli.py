"""Command line: ``python -m minivlmoe SUBCOMMAND`` (or the ``minivlmoe`` script).

Subcommands
-----------
gradcheck   finite-difference check of every op, one row per (op, argument).
train       train on the built-in image-caption world (presets tiny, default, large),
            or on your own images and captions (--data FILE.npz).
eval        evaluate a checkpoint on its run's test split.
caption     greedy captions of test images, next to the reference captions.
retrieve    the test images that best match a caption.
plot        the training losses and evaluations of run folders (text, or a PNG).
routes      where a run's MoE layers send its test tokens (tables, maps, curves).
sweep       dense and MoE models at equal active compute over a grid of expert counts.
compress    prune (or factor) a trained run and fine-tune it into a new run folder;
            --sweep: the density-quality-speed curve.
upcycle     turn a trained dense run into an MoE run (its FFN copied into every expert)
            and train it further (minivlmoe/compress/upcycle.py).


This module is the parser, :func:`main` and the error handling; the subcommands are in
:mod:`minivlmoe.commands` (imported by :func:`build_parser`, after the threads are set).

Global option: ``--threads N`` BLAS threads, 1 by default (minivlmoe/threads.py says why
and who wins over whom); it goes before the subcommand.

Exit status: 0 success, 1 a failed check or an expected failure (one line on
stderr, ``minivlmoe: error: <what> (<path or value>)``, no traceback), 2 bad
command-line arguments (argparse's usage error).

Expected failures
-----------------
:func:`main` is the one place that turns them into that line; each class is chosen so
that a bug still shows its traceback:

* ``OSError`` -- the file system refused (a missing or unwritable folder, a file where
  a folder is needed, permission, a full disk).  Every I/O the commands do is on paths
  the user named, so an OSError is never a bug of ours; the line gives the system's
  reason and the path.
* :class:`minivlmoe.divergence.TrainingDiverged` -- the loss diverged (the rule is in
  :mod:`minivlmoe.divergence`); the line names the step, the loss and the rule, and the
  last good checkpoint, which is kept.
* :class:`minivlmoe.checkpoint.CheckpointError` -- a checkpoint or run folder that
  cannot be used.
* Bad data the user typed (a caption, a flag, a run's config.json) is validated where
  it enters, in the subcommand: flags by argparse (a usage error, exit 2, before any
  file is looked at), a caption or config by catching the ValueError of the one call
  that reads it.  ValueError and TypeError are *not* caught globally: anywhere else
  they mean a bug, and so does any other exception.
"""

from __future__ import annotations

import argparse
import os
import sys

# No NumPy at the top: main() sets the BLAS threads before anything loads NumPy
# (minivlmoe/threads.py); import it inside the functions that need it.
from . import heap, threads


def fail(message):
    """One line on stderr and exit status 1 (no traceback)."""
    print(f"minivlmoe: error: {message}", file=sys.stderr)
    return 1


def os_reason(error):
    """The system's reason of an OSError, without the errno and the path."""
    return error.strerror or str(error) or type(error).__name__


def os_error_line(error):
    """``<reason> (<path>)`` of an OSError (the path when it names one)."""
    paths = [p for p in (error.filename, error.filename2) if p is not None]
    where = " -> ".join(map(os.fsdecode, paths))
    return os_reason(error) + (f" ({where})" if paths else "")


def _int_at_least(low):
    """An argparse type: an integer >= ``low`` (a usage error otherwise)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def _data_option(p):
    p.add_argument("--data", metavar="FILE",
                   help="where the run's data file is now, if it moved (same content)")


def _subcommand(sub, func, name, **kwargs):
    """A subparser whose parsed arguments run ``func`` (and carry the subparser itself, so
    a command can report a usage error, exit 2, after parsing)."""
    p = sub.add_parser(name, **kwargs)
    p.set_defaults(func=func, parser=p)
    return p


def build_parser():
    from . import commands
    from .model_config import EXPERT_MODES
    from .runs import PRESETS

    # allow_abbrev=False: threads.option reads --threads from argv before this parser runs
    parser = argparse.ArgumentParser(prog="minivlmoe", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help=f"BLAS threads (default {threads.DEFAULT}, unless "
                        "OPENBLAS_NUM_THREADS or OMP_NUM_THREADS is set); give it before "
                        "the subcommand")
    parser.add_argument("--debug-threads", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    p = _subcommand(sub, commands.cmd_gradcheck, "gradcheck",
                    help="finite-difference check of every op's backward")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--only", default=None, help="only ops whose name contains this text")

    p = _subcommand(sub, commands.cmd_train, "train",
                    help="train on the built-in world or your own data",
                    description="Train on the built-in image-caption world, or on your "
                    "own images and captions (--data FILE.npz, docs/your_data.md). "
                    "Writes DIR/config.json, DIR/metrics.jsonl, DIR/history.jsonl and "
                    "DIR/ckpt.npz.")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model size, steps and data (default: default)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps (preset's by default)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default runs/PRESET-EXPERTS)")
    p.add_argument("--seed", type=_nonneg_int, help="init, data order and noise seed (0)")
    p.add_argument("--experts", choices=EXPERT_MODES,
                   help="modality (VL-MoE), shared (LIMoE) or dense (default modality)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="default float32")
    p.add_argument("--batch-size", type=_positive_int, help="pairs per step")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate")
    p.add_argument("--eval-every", type=_nonneg_int, metavar="N",
                   help="evaluate and checkpoint every N steps (0: only at the end)")
    p.add_argument("--max-objects", type=int, choices=(1, 2, 3),
                   help="objects per image in the data (difficulty)")
    p.add_argument("--n-train", type=_positive_int, help="training pairs")
    p.add_argument("--data", metavar="FILE",
                   help="train on your own .npz of images and captions, or a folder of "
                        "images with captions.tsv (needs Pillow); docs/your_data.md")
    p.add_argument("--test-fraction", type=_fraction, metavar="F",
                   help="share of --data pairs held out for testing when the file has no "
                        "split (default 0.2)")
    p.add_argument("--patch", type=_positive_int,
                   help="patch size for --data (must divide the image size; default: a "
                        "divisor of it up to 8)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start again even if --out holds a run")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--expert-parallel", action="store_true",
                   help="one of R ranks under `mpiexec -n R` (needs the mpi extra): experts "
                        "spread over the ranks, the batch split; rank 0 writes "
                        "(docs/parallel.md)")

    p = _subcommand(sub, commands.cmd_eval, "eval",
                    help="evaluate a checkpoint on its test split")
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint file or a run folder")
    p.add_argument("--no-decode", action="store_true", help="skip the caption metrics")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _data_option(p)

    p = _subcommand(sub, commands.cmd_caption, "caption",
                    help="greedy captions of test images")
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint file or a run folder")
    p.add_argument("--n", type=_positive_int, default=8, help="number of images (8)")
    p.add_argument("--png", metavar="FILE", help="save a grid of images (needs matplotlib)")
    _data_option(p)

    p = _subcommand(sub, commands.cmd_retrieve, "retrieve",
                    help="test images that best match a caption")
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint file or a run folder")
    p.add_argument("caption", help='e.g. "a small red circle left of a large blue square"')
    p.add_argument("--top", type=_positive_int, default=5, help="number of images (5)")
    p.add_argument("--ascii", action="store_true", help="draw the best image as text")
    _data_option(p)

    p = _subcommand(sub, commands.cmd_plot, "plot",
                    help="training losses and evaluations of run folders",
                    description="Print a summary of each run folder's history.jsonl "
                    "and metrics.jsonl; with --png, draw them (several runs overlaid).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (DIR of train --out)")
    p.add_argument("--png", metavar="FILE",
                   help="save the figure as a PNG (needs matplotlib: pip install -e '.[plot]')")

    p = _subcommand(sub, commands.cmd_routes, "routes",
                    help="where a run's MoE layers send its test tokens",
                    description="Per MoE layer and pool, the token counts by expert and "
                    "kind (image, caption, retrieval text) and the dropped fraction; "
                    "patch and word maps of a few test images; router entropy and "
                    "load balance over training.")
    p.add_argument("run", metavar="RUN", help="a run folder (DIR of train --out)")
    p.add_argument("--n", type=_positive_int, default=4, help="test images with maps (4)")
    p.add_argument("--layer", type=_int_at_least(0), default=None,
                   help="block index of the MoE layer of the maps (the first MoE layer)")
    p.add_argument("--batch", type=_positive_int, default=256,
                   help="test pairs routed together, as in an evaluation (256)")
    p.add_argument("--png", metavar="FILE",
                   help="save heatmaps, maps and curves (needs matplotlib)")
    _data_option(p)
    _sweep_parser(sub, commands, PRESETS)
    _compress_parser(sub, commands)
    _upcycle_parser(sub, commands)
    return parser


def _density(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a density in (0, 1], got {text}")
    return value


_density.__name__ = "density"


def _compress_parser(sub, commands):
    p = _subcommand(sub, commands.cmd_compress, "compress",
                    help="prune or factor a trained run, fine-tune it into a new run folder",
                    description="Magnitude-prune (or factor by truncated SVD) the sparse "
                    "weights of a trained run's blocks, then fine-tune it with AdamW into --out, an "
                    "ordinary run folder (eval, caption, retrieve, train --resume work on "
                    "it). With --sweep: the density-quality-speed curve into --out "
                    "(docs/compression.md).")
    p.add_argument("run", metavar="RUN", help="a trained run folder (DIR of train --out)")
    p.add_argument("--method", choices=("magnitude", "lowrank"), default="magnitude",
                   help="magnitude pruning (default) or low rank (--rank or --energy)")
    p.add_argument("--density", type=_density, help="stored fraction of every row, in (0, 1]")
    p.add_argument("--structure", choices=("unstructured", "row-group"),
                   default="unstructured", help="per row (default) or column groups shared "
                   "by consecutive rows")
    p.add_argument("--schedule", choices=("oneshot", "gradual"), default="oneshot",
                   help="prune once, or along a cubic schedule while fine-tuning")
    p.add_argument("--interval", type=_positive_int, metavar="N",
                   help="steps between prunings of --schedule gradual (steps/10)")
    p.add_argument("--finetune-steps", type=_positive_int, metavar="N",
                   help="fine-tuning steps (a fifth of the run's steps)")
    p.add_argument("--prune-ends", action="store_true",
                   help="also prune the patch projection, the retrieval projections and the "
                   "LM head (kept by default; docs/compression.md says why)")
    p.add_argument("--lr", type=_positive_float, help="fine-tuning peak lr (3x the run's)")
    p.add_argument("--rank", type=_positive_int, help="rank of every factored weight (lowrank)")
    p.add_argument("--energy", type=_fraction,
                   help="keep this share of each weight's squared singular values (lowrank)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="the new run folder (the sweep folder with --sweep)")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --out")
    p.add_argument("--sweep", action="store_true",
                   help="the curve: prune + fine-tune, sparse from scratch, low rank, step "
                   "times and bytes at every --densities value (resumable)")
    p.add_argument("--densities", type=_comma_list(_density),
                   default=[1.0, 0.5, 0.25, 0.1, 0.05, 0.02], metavar="D,D,...",
                   help="densities of --sweep (1,0.5,0.25,0.1,0.05,0.02)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    _data_option(p)


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _upcycle_parser(sub, commands):
    p = _subcommand(sub, commands.cmd_upcycle, "upcycle",
                    help="a trained dense run becomes an MoE run, trained further",
                    description="Sparse upcycling (Komatsuzaki et al. 2023): copy the "
                    "dense run's FFN at every MoE position into each of E experts, add "
                    "fresh routers, keep every other weight, then train the MoE for N "
                    "steps into an ordinary run folder (docs/compression.md).")
    p.add_argument("run", metavar="RUN", help="a dense run folder (train --experts dense)")
    p.add_argument("--experts", type=_int_at_least(2), required=True, metavar="E",
                   help="experts per pool (>= 2)")
    p.add_argument("--top-k", type=_positive_int, default=1, metavar="K",
                   help="experts per token (1; K >= 2 runs K full copies per token)")
    p.add_argument("--mode", choices=("shared", "modality"), default="shared",
                   help="one pool for both modalities (shared, default: the parent's FFN "
                   "serves both) or an image and a text pool (modality)")
    p.add_argument("--out", metavar="DIR", required=True, help="the new run folder")
    p.add_argument("--steps", type=_positive_int, metavar="N",
                   help="training steps after the conversion (half the parent's steps)")
    p.add_argument("--noise", type=_nonneg_float, default=0.0, metavar="STD",
                   help="relative std of noise on each expert's weights (0: exact copies)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run that --out already holds")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    _data_option(p)


def _comma_list(item):
    """An argparse type: a comma-separated list of ``item`` values (``1,2,4``)."""
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        try:
            return [item(v) for v in values]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                             f"{item.__name__}, got {text!r}") from None
    parse.__name__ = f"list of {item.__name__}"
    return parse


def _sweep_parser(sub, commands, presets):
    p = _subcommand(sub, commands.cmd_sweep, "sweep",
                    help="dense vs MoE at equal active compute over expert "
                    "counts, modes and seeds (minivlmoe/sweep.py)",
                    description="Train the preset's model at every point of a grid of "
                    "expert counts (1 = dense) and expert modes, with several seeds, at "
                    "equal active compute per token; one run folder per point under "
                    "--out, finished runs are skipped, interrupted ones resume.")
    p.add_argument("--preset", choices=sorted(presets), default="default",
                   help="the grid's base model and training (default: default)")
    p.add_argument("--experts-grid", type=_comma_list(int), default=[1, 2, 4, 8, 16],
                   metavar="E,E,...", help="expert counts, 1 = dense (1,2,4,8,16)")
    p.add_argument("--modes", type=_comma_list(str), default=["shared", "modality"],
                   metavar="M,M", help="MoE modes among shared,modality (both)")
    p.add_argument("--seeds", type=_comma_list(int), default=[0, 1, 2], metavar="S,S,...",
                   help="seeds of every point (0,1,2)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps (preset's by default)")
    p.add_argument("--top-k", type=_positive_int, metavar="K",
                   help="experts per token (preset's by default); the dense FFN gets K x")
    p.add_argument("--ablation", action="store_true",
                   help="also modality mode with image experts only and text experts only")
    p.add_argument("--out", metavar="DIR", help="the sweep folder (sweeps/PRESET)")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="runs at a time, each a process with one BLAS thread (1)")
    p.add_argument("--png", metavar="FILE",
                   help="the figure (default DIR/sweep.png when matplotlib is installed)")


def main(argv=None):
    """Run one subcommand with the BLAS threads chosen (module docstring); the expected
    failures become one line and exit status 1, anything else keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    heap.keep_freed_heap()                       # no page faults between steps (heap.py)
    with threads.limit(threads.choose(argv)):    # before the parser's imports load NumPy
        return _run(argv)


def _run(argv):
    from .checkpoint import CheckpointError
    from .divergence import TrainingDiverged
    from .userdata import DataError

    args = build_parser().parse_args(argv)
    if args.debug_threads:
        print(f"minivlmoe: {threads.describe()}", file=sys.stderr)
    try:
        return args.func(args)
    except (CheckpointError, DataError) as e:  # a bad checkpoint, run or data: one line
        return fail(str(e))
    except TrainingDiverged as e:  # names the step, the loss, the rule and the checkpoint
        return fail(str(e))
    except OSError as e:  # the file system refused: its reason and the path
        return fail(f"{args.command}: {os_error_line(e)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
