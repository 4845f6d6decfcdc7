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
  :mod:`minivlmoe.divergence`); the line names the step, the loss and the rule, and the last
  good checkpoint, which is kept.
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
from . import threads


def cmd_gradcheck(args):
    """One row per (op, argument) of every case in the test registry, reading order
    (minivlmoe.testing.GROUPS); a skipped argument's row says ``skip (<reason>)``."""
    import numpy as np

    from .gradcheck import check_case
    from .testing import all_cases

    rng = np.random.default_rng(args.seed)
    header = f"{'op':<44} {'argument':<22} {'shape':<16} {'max rel err':>11} {'checked':>7}  result"
    failures = matched = skipped = 0
    for case in all_cases(rng, args.only):
        matched += 1
        if matched == 1:
            print(header)
            print("-" * len(header))
        for row in check_case(case, rng):
            if row.skipped:
                print(f"{row.op:<44} {row.argument:<22} {str(row.shape):<16} "
                      f"{'-':>11} {0:>7}  skip ({row.skipped})", flush=True)
                skipped += 1
                continue
            failures += not row.passed
            print(f"{row.op:<44} {row.argument:<22} {str(row.shape):<16} "
                  f"{row.max_rel_error:>11.2e} {row.checked:>7}  "
                  f"{'pass' if row.passed else 'FAIL'}", flush=True)
    if not matched:
        return _fail(f"--only {args.only!r} matches no gradcheck case")
    print(f"\n{'all rows passed' if not failures else f'{failures} row(s) FAILED'} "
          f"(tolerance per op, default 1e-6; see minivlmoe/gradcheck.py)"
          + (f"; {skipped} argument(s) skipped, reasons in their rows" if skipped else ""))
    return 1 if failures else 0


def _fail(message):
    """One line on stderr and exit status 1 (no traceback)."""
    print(f"minivlmoe: error: {message}", file=sys.stderr)
    return 1


def _os_reason(error):
    """The system's reason of an OSError, without the errno and the path."""
    return error.strerror or str(error) or type(error).__name__


def _os_error_line(error):
    """``<reason> (<path>)`` of an OSError (the path when it names one)."""
    paths = [p for p in (error.filename, error.filename2) if p is not None]
    where = " -> ".join(map(os.fsdecode, paths))
    return _os_reason(error) + (f" ({where})" if paths else "")


def _load_run(path):
    """(checkpoint, ModelConfig, TrainConfig, Tokenizer) of a checkpoint file or run folder.

    Raises CheckpointError (a ValueError) with a one-line message.
    """
    from . import run_checkpoint, run_folder

    if os.path.isdir(path):
        path = os.path.join(path, run_folder.CKPT_NAME)
    return run_checkpoint.load_checkpoint(path)


def _test_split(ckpt, model_cfg, train_cfg, tokenizer, data_path=None):
    """The run's test split: the built-in world drawn again, or its data file read again
    and verified (``data_path``: where the file is now, if it moved)."""
    from . import runs

    return runs.run_splits(ckpt.config, model_cfg, train_cfg, tokenizer, data_path).test


def _train_overrides(args):
    """TrainConfig fields given on the command line (None = not given)."""
    return {"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size,
            "lr": args.lr, "eval_every": args.eval_every, "max_objects": args.max_objects,
            "n_train": args.n_train}


def cmd_train(args):
    import dataclasses
    import json

    import numpy as np

    from . import run_folder, runs, train

    from .userdata import DataError, UserData, open_source

    if args.data is None and (args.test_fraction is not None or args.patch is not None):
        args.parser.error("--test-fraction and --patch need --data FILE")
    if args.data is not None and (args.max_objects is not None or args.n_train is not None):
        args.parser.error("--max-objects and --n-train describe the built-in world; "
                          "they do not apply with --data")
    name = args.preset or "default"
    if args.data is not None:
        name = os.path.splitext(os.path.basename(args.data))[0]
    out = args.out or os.path.join("runs", f"{name}-{args.experts or 'modality'}")
    overrides = {k: v for k, v in _train_overrides(args).items() if v is not None}
    model_kw = {k: v for k, v in (("experts", args.experts), ("dtype", args.dtype))
                if v is not None}
    if args.resume:
        config_path = os.path.join(out, run_folder.CONFIG_NAME)
        try:
            with open(config_path, encoding="utf-8") as f:
                saved = json.load(f)
            model_cfg, train_cfg, _ = runs.parse_run_config(saved)
        except OSError as e:
            return _fail(f"cannot resume from {out}: {config_path} is missing "
                         f"({type(e).__name__})")
        except ValueError as e:                    # not JSON, not a run config, old version
            return _fail(f"cannot resume from {out}: {config_path}: {e}")
        preset = saved.get("preset")
        data = None if "data" not in saved else open_source(saved["data"], args.data)
        if data is None and args.data is not None:
            return _fail(f"--data does not match the run in {out} (trained on the "
                         f"built-in world); omit it to resume")
        if args.test_fraction is not None or args.patch is not None:
            return _fail("--test-fraction and --patch are fixed by the run; omit them to "
                         "resume")
        if args.preset is not None and args.preset != preset:
            return _fail(f"--preset {args.preset} does not match the run in {out} "
                         f"(preset {preset!r}); omit it to resume")
        # flags given with --resume must agree with the run: the checkpoint's config check
        # in train.train reports any difference
        try:
            train_cfg = dataclasses.replace(train_cfg, **overrides)
            model_cfg = dataclasses.replace(model_cfg, **model_kw)
        except (TypeError, ValueError) as e:
            args.parser.error(str(e))                                   # exit status 2
    else:
        preset = args.preset or "default"
        data = None if args.data is None else UserData(args.data, args.test_fraction)
        try:                                # the arguments first, then the folder
            model_cfg, train_cfg = runs.preset_configs(preset, **model_kw, **overrides,
                                                       data=data, patch=args.patch)
        except DataError:
            raise
        except (TypeError, ValueError) as e:
            args.parser.error(str(e))                                   # exit status 2
        if os.path.exists(out) and not os.path.isdir(out):
            return _fail(f"--out must be a folder, but it names an existing file ({out})")
        if os.path.exists(os.path.join(out, run_folder.CKPT_NAME)) and not args.overwrite:
            return _fail(f"{out} already holds a run; pass --resume to continue it, "
                         "--overwrite to start again, or choose another --out")
    progress = None if args.quiet else sys.stderr
    if progress is not None:
        on = "" if data is None else (f" on {data.path} ({train_cfg.n_train} train, "
                                      f"{train_cfg.n_test} test pairs, {model_cfg.image_size}"
                                      f"x{model_cfg.image_size}, patch {model_cfg.patch}, "
                                      f"V={model_cfg.vocab_size})")
        print(f"training preset {preset!r} ({model_cfg.experts} experts, {train_cfg.steps} "
              f"steps){on} into {out}", file=progress, flush=True)
    try:
        # a diverging run overflows; train.train checks every loss and evaluation for
        # NaN and inf and stops with one line, so NumPy's warnings would only add noise
        with np.errstate(over="ignore", invalid="ignore"):
            result = train.train(model_cfg, train_cfg, out, data=data, resume=args.resume,
                                 preset=preset, progress=progress)
    except KeyboardInterrupt:
        return _fail(f"interrupted; continue from the last checkpoint with "
                     f"`minivlmoe train --out {out} --resume`")
    except OSError as e:            # a checkpoint is replaced atomically or not at all
        ckpt = os.path.join(out, run_folder.CKPT_NAME)
        kept = ("" if not os.path.isfile(ckpt) else "; the previous checkpoint is intact"
                if e.filename is not None and os.fsdecode(e.filename) == ckpt
                else f"; the last checkpoint is intact ({ckpt})")
        return _fail(f"cannot write the run: {_os_error_line(e)}{kept}")
    if not result.history:
        print(f"the run in {out} is already complete ({result.step} steps)")
    if result.evaluations:
        from .evaluate import format_report

        print(format_report(result.evaluations[-1], builtin=data is None))
    print(f"metrics: {os.path.join(out, run_folder.METRICS_NAME)}  checkpoint: "
          f"{os.path.join(out, run_folder.CKPT_NAME)}")
    return 0


def cmd_eval(args):
    from .evaluate import evaluate, format_report

    ckpt, model_cfg, train_cfg, tokenizer = _load_run(args.ckpt)
    test = _test_split(ckpt, model_cfg, train_cfg, tokenizer, args.data)
    results = evaluate(ckpt.params, model_cfg, test, tokenizer, decode=not args.no_decode)
    print(f"checkpoint {args.ckpt}: step {ckpt.step}, {model_cfg.experts} experts, "
          f"{train_cfg.n_test} test pairs")
    print(format_report(results, builtin="data" not in ckpt.config))
    if args.json:
        import json

        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"step": ckpt.step, **results}, f, indent=2)
                f.write("\n")
        except OSError as e:
            return _fail(f"cannot write --json: {_os_reason(e)} ({args.json}); "
                         "the report above was printed")
    return 0


def cmd_caption(args):
    from .evaluate import generate_captions
    from .tokenizer import normalize

    ckpt, model_cfg, train_cfg, tokenizer = _load_run(args.ckpt)
    test = _test_split(ckpt, model_cfg, train_cfg, tokenizer, args.data)
    refs = [normalize(c) for c in test.captions]          # the form decoded captions have
    n = min(args.n, len(test))
    images = test.images[:n].astype(model_cfg.dtype, copy=False)      # (n, R, R, Ch)
    hyps = generate_captions(ckpt.params, model_cfg, images, tokenizer)
    for i, (hyp, ref) in enumerate(zip(hyps, refs[:n])):
        mark = "ok " if hyp == ref else "   "
        held = " (held-out pair)" if test.heldout is not None and test.heldout[i] else ""
        print(f"[{i:>3}] {mark} generated: {hyp}\n            reference: {ref}{held}")
    print(f"exact match {sum(h == r for h, r in zip(hyps, refs)) / n:.3f} "
          f"on {n} test images")
    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return _fail("--png needs matplotlib, which is not installed "
                         "(from the checkout: pip install -e '.[plot]'; or pip install "
                         "matplotlib); the captions above were printed")
        cols = min(4, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for i, ax in enumerate(axes.ravel()[:n]):
            ax.imshow(test.images[i], interpolation="nearest")
            ax.set_title(f"gen: {hyps[i]}\nref: {test.captions[i]}", fontsize=6,
                         color="black" if hyps[i] == refs[i] else "red")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        plt.close(fig)
        print(f"saved {args.png}")
    return 0


def cmd_retrieve(args):
    import numpy as np

    from . import inference
    from .world import to_ascii
    from .tokenizer import PAD_ID, UNK_ID, normalize, tokenize
    from ._checks import shorten

    ckpt, model_cfg, train_cfg, tokenizer = _load_run(args.ckpt)
    if not args.caption.strip():
        return _fail("the caption must not be empty")
    try:
        ids = tokenizer.encode([args.caption], model_cfg.max_text_len)  # (1, T)
    except ValueError as e:
        return _fail(str(e))
    unknown = [w for w in tokenize(args.caption) if tokenizer.ids.get(w, UNK_ID) == UNK_ID]
    if unknown:
        print(f"note: words not in the vocabulary (read as <unk>): {shorten(' '.join(unknown))}",
              file=sys.stderr)
    test = _test_split(ckpt, model_cfg, train_cfg, tokenizer, args.data)
    images = test.images.astype(model_cfg.dtype, copy=False)           # (B, R, R, Ch)
    img_emb = inference.encode_images(ckpt.params, model_cfg, images)  # (B, De)
    txt_emb = inference.encode_texts(ckpt.params, model_cfg, ids, pad_id=PAD_ID)  # (1, De)
    scores = img_emb @ txt_emb[0]                                       # (B,)
    order = np.argsort(-scores, kind="stable")[:args.top]              # (top,)
    print(f"best matches among {len(test)} test images for {args.caption!r} "
          f"(= marks an image whose own caption is this caption):")
    query = normalize(args.caption)
    for rank, i in enumerate(order, 1):
        mark = "=" if normalize(test.captions[i]) == query else " "
        print(f"{rank:>3}. {mark} image {i:>4}  score {scores[i]:+.3f}  "
              f"its caption: {test.captions[i]}")
    if args.ascii:
        print(to_ascii(test.images[order[0]].astype(np.float32)))
    return 0


def cmd_plot(args):
    from . import plot

    try:
        runs = [plot.load_run(path) for path in args.runs]
    except (OSError, ValueError) as e:
        return _fail(str(e))
    print(plot.summary(runs))
    if not args.png:
        return 0
    try:
        plot.plot_runs(runs, args.png)
    except ImportError:
        return _fail(f"--png needs matplotlib, which is not installed (from the checkout: "
                     f"{plot.PLOT_EXTRA}; or pip install matplotlib); the summary above "
                     f"was printed")
    print(f"saved {args.png}")
    return 0


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


def build_parser():
    from .model import EXPERT_MODES
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
    p = sub.add_parser("gradcheck", help="finite-difference check of every op's backward")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--only", default=None, help="only ops whose name contains this text")
    p.set_defaults(func=cmd_gradcheck)

    p = sub.add_parser("train", help="train on the built-in world or your own data",
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
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its test split")
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint file or a run folder")
    p.add_argument("--no-decode", action="store_true", help="skip the caption metrics")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _data_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("caption", help="greedy captions of test images")
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint file or a run folder")
    p.add_argument("--n", type=_positive_int, default=8, help="number of images (8)")
    p.add_argument("--png", metavar="FILE", help="save a grid of images (needs matplotlib)")
    _data_option(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("retrieve", help="test images that best match a caption")
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint file or a run folder")
    p.add_argument("caption", help='e.g. "a small red circle left of a large blue square"')
    p.add_argument("--top", type=_positive_int, default=5, help="number of images (5)")
    p.add_argument("--ascii", action="store_true", help="draw the best image as text")
    _data_option(p)
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser("plot", help="training losses and evaluations of run folders",
                       description="Print a summary of each run folder's history.jsonl "
                       "and metrics.jsonl; with --png, draw them (several runs overlaid).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (DIR of train --out)")
    p.add_argument("--png", metavar="FILE",
                   help="save the figure as a PNG (needs matplotlib: pip install -e '.[plot]')")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv=None):
    """Run one subcommand with the BLAS threads chosen (module docstring); the expected
    failures become one line and exit status 1, anything else keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
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
        return _fail(str(e))
    except TrainingDiverged as e:  # names the step, the loss, the rule and the checkpoint
        return _fail(str(e))
    except OSError as e:  # the file system refused: its reason and the path
        return _fail(f"{args.command}: {_os_error_line(e)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
