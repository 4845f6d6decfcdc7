"""The subcommands of the command line: train, eval, caption, retrieve, plot, routes, gradcheck,
sweep, upcycle.

Each ``cmd_<name>(args)`` takes the parsed arguments of :func:`minivlmoe.cli.build_parser`
and returns the exit status; an expected failure is one line
(:func:`minivlmoe.cli.fail`) or an exception :func:`minivlmoe.cli.main` turns into one
(the cli module's docstring lists them).  :func:`minivlmoe.cli.build_parser` imports this
module when it runs, after the BLAS threads are chosen, and each command imports NumPy and
the library inside itself, so nothing here loads NumPy at import time.

* ``cmd_gradcheck`` -- one row per (op, argument) of the test registry.
* ``cmd_train`` -- a new run, or the resume of one (``--resume``), on the built-in world
  or your data.
* ``cmd_eval``, ``cmd_caption``, ``cmd_retrieve`` -- a checkpoint or run folder
  (:func:`_load_run`) on its run's test split (:func:`_test_split`).
* ``cmd_plot`` -- the summary (and PNG) of run folders.
* ``cmd_routes`` -- where a run's MoE layers send its test tokens (minivlmoe/routes.py).
* ``cmd_sweep`` -- a grid of runs at equal active compute (minivlmoe/sweep.py).
* ``cmd_upcycle`` -- a dense run becomes an MoE run, trained further
  (minivlmoe/compress/upcycle.py).
"""

from __future__ import annotations

import os
import sys

from .cli import fail, os_error_line, os_reason   # the one error line of the command line


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
        return fail(f"--only {args.only!r} matches no gradcheck case")
    print(f"\n{'all rows passed' if not failures else f'{failures} row(s) FAILED'} "
          f"(tolerance per op, default 1e-6; see minivlmoe/gradcheck.py)"
          + (f"; {skipped} argument(s) skipped, reasons in their rows" if skipped else ""))
    return 1 if failures else 0


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


def _compressed_entry(config):
    """The ``"compressed"`` entry of a run's config (minivlmoe/compress), kept on resume."""
    return {k: config[k] for k in ("compressed",) if k in config}


def cmd_train(args):
    if args.expert_parallel:                       # one of R ranks (docs/parallel.md)
        try:
            from .parallel import comm, ep_train
            world = comm.world()
        except ImportError as e:
            return fail(f"--expert-parallel: {e}")
        parallel = ep_train.ExpertParallel(world)
        return ep_train.run_guarded(parallel, lambda: _train(args, parallel))
    return _train(args)


def _train(args, parallel=None):
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
            return fail(f"cannot resume from {out}: {config_path} is missing "
                         f"({type(e).__name__})")
        except ValueError as e:                    # not JSON, not a run config, old version
            return fail(f"cannot resume from {out}: {config_path}: {e}")
        preset = saved.get("preset")
        data = None if "data" not in saved else open_source(saved["data"], args.data)
        if data is None and args.data is not None:
            return fail(f"--data does not match the run in {out} (trained on the "
                         f"built-in world); omit it to resume")
        if args.test_fraction is not None or args.patch is not None:
            return fail("--test-fraction and --patch are fixed by the run; omit them to "
                         "resume")
        if args.preset is not None and args.preset != preset:
            return fail(f"--preset {args.preset} does not match the run in {out} "
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
        except DataError:                   # a ValueError, but the file's fault: one line,
            raise                           # exit 1 (cli.main), not a usage error
        except (TypeError, ValueError) as e:
            args.parser.error(str(e))                                   # exit status 2
        if os.path.exists(out) and not os.path.isdir(out):
            return fail(f"--out must be a folder, but it names an existing file ({out})")
        if os.path.exists(os.path.join(out, run_folder.CKPT_NAME)) and not args.overwrite:
            return fail(f"{out} already holds a run; pass --resume to continue it, "
                         "--overwrite to start again, or choose another --out")
    problem = None if parallel is None else parallel.check(model_cfg, train_cfg)
    if problem is not None:                        # every rank stops; rank 0 says why
        return fail(problem) if parallel.writer else 1
    progress = None if args.quiet or (parallel and not parallel.writer) else sys.stderr
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
                                 preset=preset, progress=progress,
                                 extra_config=_compressed_entry(saved if args.resume else {}),
                                 parallel=parallel)
    except KeyboardInterrupt:
        return fail(f"interrupted; continue from the last checkpoint with "
                     f"`minivlmoe train --out {out} --resume`")
    except OSError as e:            # a checkpoint is replaced atomically or not at all
        ckpt = os.path.join(out, run_folder.CKPT_NAME)
        kept = ("" if not os.path.isfile(ckpt) else "; the previous checkpoint is intact"
                if e.filename is not None and os.fsdecode(e.filename) == ckpt
                else f"; the last checkpoint is intact ({ckpt})")
        return fail(f"cannot write the run: {os_error_line(e)}{kept}")
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
            return fail(f"cannot write --json: {os_reason(e)} ({args.json}); "
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
            return fail("--png needs matplotlib, which is not installed "
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
        return fail("the caption must not be empty")
    try:
        ids = tokenizer.encode([args.caption], model_cfg.max_text_len)  # (1, T)
    except ValueError as e:
        return fail(str(e))
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
        return fail(str(e))
    print(plot.summary(runs))
    if not args.png:
        return 0
    try:
        plot.plot_runs(runs, args.png)
    except ImportError:
        return fail(f"--png needs matplotlib, which is not installed (from the checkout: "
                     f"{plot.PLOT_EXTRA}; or pip install matplotlib); the summary above "
                     f"was printed")
    print(f"saved {args.png}")
    return 0


def cmd_routes(args):
    """Routing tables, patch maps and router curves of a run (minivlmoe/routes.py)."""
    from . import routes, run_folder
    from .tokenizer import PAD_ID

    if not os.path.isdir(args.run):
        return fail(f"run folder not found ({args.run})")
    ckpt, model_cfg, train_cfg, tokenizer = _load_run(args.run)
    if not {"moe", "split"} & {kind for kind, _ in model_cfg.layer_kinds()}:
        return fail(f"{args.run} has no MoE layer (experts={model_cfg.experts!r}): "
                    f"nothing is routed")
    try:
        metrics = run_folder.read_metrics(args.run)
    except ValueError as e:
        return fail(f"unreadable {run_folder.METRICS_NAME}: {e} ({args.run})")
    test = _test_split(ckpt, model_cfg, train_cfg, tokenizer, args.data)
    try:
        out = routes.report(ckpt.params, model_cfg, test, tokenizer, metrics, layer=args.layer,
                            n=args.n, batch=args.batch, pad_id=PAD_ID)
    except ValueError as e:                     # --layer that is not a MoE layer
        return fail(str(e))
    print(f"run {args.run}: step {ckpt.step}")
    print("\n".join(out["lines"]))
    if args.png:
        try:
            routes.render_png(args.png, counts=out["counts"], maps=out["maps"],
                              metrics=metrics, images=out["images"],
                              num_experts=model_cfg.num_experts, layer=out["layer"])
        except ImportError:
            return fail("--png needs matplotlib, which is not installed (from the checkout: "
                        "pip install -e '.[plot]'; or pip install matplotlib); the tables "
                        "above were printed")
        print(f"saved {args.png}")
    return 0


def cmd_sweep(args):
    """The grid (printed with its parameter counts), every run, the summary table and
    the figure; ``args.parser.error`` (exit 2) for a bad grid."""
    from . import runs, sweep

    top_k = args.top_k if args.top_k is not None else runs.preset_configs(args.preset)[0].top_k
    try:
        points = sweep.make_grid(args.experts_grid, args.modes, args.seeds,
                                 ablation=args.ablation, top_k=top_k)
    except ValueError as e:
        args.parser.error(str(e))                                   # exit status 2
    out = args.out or os.path.join("sweeps", args.preset)
    seen = {}
    for p in points:
        seen.setdefault((p.label, p.num_experts), p)
    print(f"sweep of preset {args.preset!r}: {len(points)} runs in {out} "
          f"(top-{top_k}, {len(args.seeds)} seed(s), {args.jobs} at a time); "
          f"active params per token exclude the router")
    for (label, E), p in seen.items():
        stored, active, router = sweep.param_counts(
            sweep.point_configs(p, args.preset, steps=args.steps, top_k=top_k)[0])
        print(f"  {label:<15} E={E:<3} stored {stored:>9,}  active/token {active:>9,}  "
              f"router/token {router:>6,}")
    try:
        rows = sweep.run_sweep(points, out, args.preset, steps=args.steps, top_k=top_k,
                               jobs=args.jobs, progress=sys.stderr)
    except sweep.SweepError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(f"minivlmoe: sweep interrupted; the same command continues it (finished runs "
              f"are kept, the others resume from their checkpoints in {out})",
              file=sys.stderr)
        return 130
    table = sweep.format_summary(sweep.summarize(rows))
    print(table)
    print(f"saved {sweep.write_summary(table, out)} and {os.path.join(out, sweep.ROWS_NAME)}")
    png = args.png or os.path.join(out, sweep.PNG_NAME)
    try:
        sweep.plot_summary(sweep.summarize(rows), png,
                           f"preset {args.preset}, top-{top_k}: experts at equal active "
                           f"compute (mean ± std over {len(args.seeds)} seed(s))")
    except ImportError:
        if args.png:
            return fail("--png needs matplotlib, which is not installed (pip install "
                        "matplotlib); the summary above was written")
        return 0
    print(f"saved {png}")
    return 0


def cmd_compress(args):
    """Prune (or factor) a run and fine-tune it into --out (minivlmoe/compress/finetune.py);
    with --sweep, the density curve (minivlmoe/compress/curve.py)."""
    import numpy as np

    from . import run_folder
    from .compress import finetune

    magnitude = args.method == "magnitude"
    if magnitude and (args.rank is not None or args.energy is not None):
        args.parser.error("--rank and --energy need --method lowrank")
    if not magnitude and (args.density is not None or args.structure != "unstructured"
                          or args.schedule != "oneshot" or args.interval is not None
                          or args.prune_ends):
        args.parser.error("--density, --structure, --schedule, --interval and --prune-ends "
                          "need --method magnitude")
    if not magnitude and (args.rank is None) == (args.energy is None):
        args.parser.error("--method lowrank needs exactly one of --rank R and --energy F")
    if args.sweep:
        if not magnitude or args.density is not None:
            args.parser.error("--sweep takes --densities (magnitude pruning), not "
                              "--density or --method lowrank")
    elif magnitude and args.density is None:
        args.parser.error("--method magnitude needs --density D")
    if args.schedule != "gradual" and args.interval is not None:
        args.parser.error("--interval needs --schedule gradual")
    if os.path.abspath(args.out) == os.path.abspath(args.run):
        return fail(f"--out must be a new folder, not the run itself ({args.out})")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return fail(f"--out must be a folder, but it names an existing file ({args.out})")
    ckpt, model_cfg, train_cfg, _ = _load_run(args.run)       # CheckpointError: one line
    if finetune.KEY in ckpt.config:
        return fail(f"{args.run} is already compressed ({ckpt.config[finetune.KEY]['method']}"
                    f"); compress its parent instead")
    if magnitude and not args.sweep and args.density > model_cfg.density:
        return fail(f"--density {args.density} is above the run's density "
                    f"{model_cfg.density} (pruning never adds entries)")
    if not magnitude:            # a rank the run's weights cannot take: a usage error
        from .compress.lowrank import check_arguments

        try:
            check_arguments(ckpt.params, model_cfg, rank=args.rank, energy=args.energy)
        except ValueError as e:
            args.parser.error(str(e))
    progress = None if args.quiet else sys.stderr
    if args.sweep:
        from .compress import curve

        return curve.cmd_sweep(args, progress)
    if os.path.exists(os.path.join(args.out, run_folder.CKPT_NAME)) and not args.overwrite:
        return fail(f"{args.out} already holds a run; pass --overwrite to replace it, or "
                    "choose another --out")
    what = (f"magnitude, density {args.density:g}, {args.structure}, {args.schedule}"
            if magnitude else f"lowrank, " + (f"rank {args.rank}" if args.rank is not None
                                               else f"energy {args.energy:g}"))
    if progress is not None:
        steps = args.finetune_steps or max(1, train_cfg.steps // 5)
        print(f"compressing {args.run} ({what}) into {args.out}: {steps} fine-tuning steps",
              file=progress, flush=True)
    try:
        with np.errstate(over="ignore", invalid="ignore"):   # divergence is checked in train
            result = finetune.compress_run(
                args.run, args.out, method=args.method, density=args.density,
                structure=args.structure, schedule=args.schedule,
                finetune_steps=args.finetune_steps, interval=args.interval, lr=args.lr,
                keep_ends=not args.prune_ends, rank=args.rank, energy=args.energy,
                data_path=args.data, progress=progress)
    except KeyboardInterrupt:
        if args.schedule == "gradual":   # train --resume would not prune any further
            return fail(f"interrupted; run the same compress command again to redo the "
                        f"gradual pruning into {args.out} (with --overwrite)")
        return fail(f"interrupted; the fine-tuning continues with `minivlmoe train --out "
                    f"{args.out} --resume`")
    print(finetune.format_result(result, builtin="data" not in ckpt.config))
    return 0


def cmd_upcycle(args):
    """Convert a dense run (minivlmoe/compress/upcycle.py), train it, print its report."""
    import numpy as np

    from . import run_folder
    from .compress import upcycle
    from .evaluate import format_report

    if args.top_k > args.experts:
        args.parser.error(f"--top-k must be in [1, --experts={args.experts}], got "
                          f"{args.top_k}")                           # exit status 2
    if not os.path.isfile(os.path.join(args.run, run_folder.CKPT_NAME)):
        return fail(f"no run to upcycle: {os.path.join(args.run, run_folder.CKPT_NAME)} "
                    f"is missing")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return fail(f"--out must be a folder, but it names an existing file ({args.out})")
    if os.path.exists(os.path.join(args.out, run_folder.CKPT_NAME)) and not args.overwrite:
        return fail(f"{args.out} already holds a run; pass --overwrite to replace it, or "
                    f"choose another --out")
    progress = None if args.quiet else sys.stderr
    try:
        with np.errstate(over="ignore", invalid="ignore"):   # divergence is checked by train
            result, info = upcycle.upcycle_run(
                args.run, args.out, num_experts=args.experts, top_k=args.top_k,
                mode=args.mode, steps=args.steps, noise=args.noise, data_path=args.data,
                progress=progress)
    except upcycle.UpcycleError as e:
        return fail(f"cannot upcycle {args.run}: {e}")
    except KeyboardInterrupt:
        return fail(f"interrupted; continue from the last checkpoint with "
                    f"`minivlmoe train --out {args.out} --resume`")
    p, s0 = info["parent_test"], info["step0_test"]
    print(f"upcycled {args.run} (step {info['parent_step']}) into {args.out}: "
          f"{args.experts} {args.mode} experts, top-{args.top_k}, blocks "
          f"{info['moe_blocks']}, noise {args.noise:g}, {info['steps']} steps")
    print(f"test caption loss: parent {p['test_caption']:.4f}, upcycled at step 0 "
          f"{s0['test_caption']:.4f}")
    if result.evaluations:
        print(format_report(result.evaluations[-1], builtin=info["data"] is None))
    print(f"metrics: {os.path.join(args.out, run_folder.METRICS_NAME)}  checkpoint: "
          f"{os.path.join(args.out, run_folder.CKPT_NAME)}")
    return 0
