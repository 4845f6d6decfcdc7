"""Where a training step's time goes: attention, routing, experts, losses, optimizer, data.

Runs a few warm-up steps, then times ``--steps`` full training steps of a preset (forward,
backward, AdamW update, batch gathering) with the model's ``timer`` hook
(:class:`minivlmoe.timing.SectionTimer`), and prints each section's share of the wall time
and the throughput in tokens per second ((1 + P) image tokens + T text tokens per pair).

The model's hook charges a whole MoE layer to "moe"; this script also wraps the
functions the layer calls, so the layer splits into "routing" (router forward and
backward, auxiliary losses), "dispatch" (capacity, plan, dispatch and combine) and
"experts" (the expert FFNs); what stays in "moe" is the layer's own glue.  "ffn" is the
dense FFN sublayers.  "other" is what no section covers (layer norms, residual adds,
reshapes, the bookkeeping between sections).

Run with one BLAS thread (the script sets it if unset):
    OPENBLAS_NUM_THREADS=1 python benchmarks/train_step.py --preset default --experts modality
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

from minivlmoe import heap, model, model_config, optim, runs, train
from minivlmoe.timing import NULL_TIMER, SectionTimer  # noqa: E402
from minivlmoe.moe import aux_losses, dispatch, experts, router
from minivlmoe.tokenizer import PAD_ID  # noqa: E402

ORDER = ("embed", "attention", "routing", "dispatch", "experts", "moe", "ffn", "losses",
         "optimizer", "data")
MOE_PARTS = {
    "routing": (router, ("forward", "backward")),
    "dispatch": (dispatch, ("priority_order", "capacity", "make_plan", "dispatch_forward",
                            "dispatch_backward", "combine_forward", "combine_backward")),
    "experts": (experts, ("forward", "backward")),
}
AUX_FUNCTIONS = [name for name in dir(aux_losses)
                 if name.endswith(("_forward", "_backward"))]


def instrument_moe(holder):
    """Wrap the MoE layer's building blocks so they report to ``holder["timer"]``.

    The wrappers replace module attributes (the layer calls ``router.forward(...)`` and
    so on through the modules), so nothing in the package is edited.
    """
    def wrap(fn, section):
        def timed(*args, **kwargs):
            with holder["timer"].section(section):
                return fn(*args, **kwargs)
        return timed

    for section, (module, names) in MOE_PARTS.items():
        for name in names:
            setattr(module, name, wrap(getattr(module, name), section))
    for name in AUX_FUNCTIONS:          # forward calls go through the module attribute
        setattr(aux_losses, name, wrap(getattr(aux_losses, name), "routing"))


def make_step(mcfg, tcfg):
    """``step(timer=NULL_TIMER)``: one training step of ``mcfg`` on batches of the built-in
    world drawn as :func:`minivlmoe.train.train` draws them (batch gathering, forward and
    backward, AdamW), on parameters initialized here; benchmarks/page_faults.py uses it."""
    tokenizer = runs.builtin_tokenizer()
    data = runs.make_data(tcfg, mcfg.image_size).train
    images = data.images.astype(mcfg.dtype)                           # (Bn, R, R, Ch)
    ids = tokenizer.encode(data.captions, mcfg.max_text_len)          # (Bn, T)
    keys = train.evaluate.caption_keys(data.captions)                  # (Bn,)
    rng = np.random.default_rng(0)
    params = model.init(rng, mcfg)
    state = optim.init_state(params)
    adamw = tcfg.adamw()
    stream = train.BatchStream(len(ids), tcfg.batch_size, rng)

    def step(timer=NULL_TIMER):
        with timer.section("data"):
            idx = stream.next()                                        # (B,)
            batch = images[idx], ids[idx], keys[idx]
        _, grads, _ = model.loss_and_grads(params, mcfg, batch[0], batch[1], pad_id=PAD_ID,
                                           keys=batch[2], rng=rng, train=True, all_losses=False,
                                           timer=timer)
        with timer.section("optimizer"):
            optim.step(params, grads, state, adamw)

    return step


def main():
    heap.keep_freed_heap()          # as the command line does (minivlmoe/heap.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(runs.PRESETS))
    parser.add_argument("--experts", default=None, choices=model_config.EXPERT_MODES)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()

    mcfg, tcfg = runs.preset_configs(args.preset, experts=args.experts,
                                      batch_size=args.batch_size)
    tcfg = runs.TrainConfig(**{**tcfg.to_dict(), "n_train": max(tcfg.batch_size, 512),
                                "n_test": 2, "steps": max(tcfg.steps,
                                                          args.steps + args.warmup)})
    step = make_step(mcfg, tcfg)
    holder = {"timer": SectionTimer()}
    instrument_moe(holder)

    def one_step(timer):
        holder["timer"] = timer
        step(timer)

    for _ in range(args.warmup):
        one_step(SectionTimer())
    timer = SectionTimer()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one_step(timer)
    total = time.perf_counter() - t0

    P = (mcfg.image_size // mcfg.patch) ** 2
    tokens = args.steps * tcfg.batch_size * (1 + P + mcfg.max_text_len)
    print(f"preset {args.preset}, experts {mcfg.experts}, width {mcfg.width}, layers "
          f"{mcfg.layers}, batch {tcfg.batch_size}, {mcfg.dtype}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
    print(f"{args.steps} steps in {total:.2f} s: {1000 * total / args.steps:.1f} ms/step, "
          f"{tokens / total:,.0f} tokens/s")
    print(f"{'section':<12} {'ms/step':>8} {'share':>7}")
    names = [n for n in ORDER if n in timer.seconds]
    names += sorted(n for n in timer.seconds if n not in ORDER)
    covered = 0.0
    for name in names:
        sec = timer.seconds[name]
        covered += sec
        print(f"{name:<12} {1000 * sec / args.steps:>8.1f} {sec / total:>7.1%}")
    other = max(0.0, total - covered)
    print(f"{'other':<12} {1000 * other / args.steps:>8.1f} {other / total:>7.1%}")


if __name__ == "__main__":
    main()
