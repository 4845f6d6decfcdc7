"""Low-rank compression of a trained run, measured: before, right after, after fine-tuning.

Loads a run's checkpoint (read only), evaluates it, factors its attention and FFN
weights at ``--rank`` (:func:`minivlmoe.compress.lowrank.lowrank_params`), evaluates the
factored model, fine-tunes it for ``--steps`` AdamW steps on the run's training split
(fresh optimizer moments; warmup then cosine from ``--lr``, batches of the run's size,
data order from ``--seed``) and evaluates it again.  Prints the per-layer table and one
line of metrics per stage; ``--json`` writes them.  Library calls only (the ``compress``
subcommand's fine-tuning writes a run folder instead).

    OPENBLAS_NUM_THREADS=1 python benchmarks/lowrank_finetune.py RUN_DIR --rank 9 --steps 300
    ... --control      # the same fine-tuning of the unfactored model, for comparison
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

from minivlmoe import evaluate, model, optim  # noqa: E402
from minivlmoe.compress import lowrank  # noqa: E402
from minivlmoe.run_checkpoint import load_checkpoint  # noqa: E402
from minivlmoe.runs import run_splits  # noqa: E402
from minivlmoe.tokenizer import PAD_ID  # noqa: E402
from minivlmoe.train import BatchStream  # noqa: E402

KEYS = ("i2t_r1", "t2i_r1", "caption_exact", "test_caption", "test_contrastive")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run folder (its ckpt.npz is read, never written)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--energy", type=float, default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--control", action="store_true",
                   help="fine-tune the unfactored model the same way instead (the control)")
    args = p.parse_args(argv)
    if args.rank is None and args.energy is None:
        args.rank = 9

    ckpt, mcfg, tcfg, tokenizer = load_checkpoint(os.path.join(args.run, "ckpt.npz"))
    train, test = run_splits(ckpt.config, mcfg, tcfg, tokenizer)
    stages = {}

    def measure(name, params, cfg):
        t0 = time.perf_counter()
        r = evaluate.evaluate(params, cfg, test, tokenizer)
        stages[name] = {k: r[k] for k in KEYS}
        print(f"{name:<22} " + "  ".join(f"{k} {r[k]:.4f}" for k in KEYS)
              + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)

    measure("trained (unfactored)", ckpt.params, mcfg)
    params, fcfg, report = lowrank.lowrank_params(ckpt.params, mcfg, rank=args.rank,
                                                  energy=args.energy)
    print(lowrank.format_report(report), flush=True)
    if args.control:                      # same fine-tuning, no factoring
        params, fcfg = ckpt.params, mcfg
    else:
        measure("factored, no tuning", params, fcfg)

    images = train.images.astype(fcfg.dtype, copy=False)             # (Bn, R, R, Ch)
    ids = tokenizer.encode(train.captions, fcfg.max_text_len)        # (Bn, T)
    keys = evaluate.caption_keys(train.captions)                     # (Bn,)
    data_ss, model_ss = np.random.SeedSequence(args.seed).spawn(2)
    stream = BatchStream(len(ids), tcfg.batch_size, np.random.default_rng(data_ss))
    model_rng = np.random.default_rng(model_ss)
    adamw = optim.AdamWConfig(lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                              weight_decay=tcfg.weight_decay, min_lr_ratio=tcfg.min_lr_ratio,
                              max_grad_norm=tcfg.max_grad_norm)
    state = optim.init_state(params)                                 # moments reset
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = stream.next()                                          # (B,)
        losses, grads, _ = model.loss_and_grads(params, fcfg, images[idx], ids[idx],
                                                pad_id=PAD_ID, keys=keys[idx],
                                                rng=model_rng, train=True)
        optim.step(params, grads, state, adamw)
        if step % 50 == 0 or step == args.steps:
            print(f"  step {step}: train total {losses['total']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    measure(f"{'unfactored' if args.control else 'factored'} + {args.steps} steps", params,
            fcfg)
    t = lowrank.totals(report)
    out = {"run": args.run, "control": args.control, "rank": args.rank, "energy": args.energy,
           "steps": args.steps, "lr": args.lr, "params_ratio": t["params_ratio"], "totals": t, "stages": stages}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
