"""Expert parallelism on R = 1, 2, 4 ranks: time per step, bytes per rank, communication.

One "step" is the default preset's MoE layer (D = 64, F = 128, E = 4, K = 1, capacity
factor 1.25, modality pools, float32) on the tokens of one default batch (B = 64
pairs of the built-in world: the U non-pad tokens the layer sees), forward + backward
of parallel/ep_moe.py plus the Allreduce of the router gradients (what data
parallelism adds for the layer's replicated weights).  Each rank holds its share of
the tokens and E/R experts.

The driver launches ``mpiexec -n R`` for R = 1, 2, 4 in turn, ``--rounds`` times
interleaved (1, 2, 4, 1, 2, 4, ...), so a busy machine slows all alike, and prints
the medians over rounds and the ratios to R = 1 side by side.  Per step it reports:
the step time (the slowest rank), the bytes this rank sends to other ranks (rank 0,
split by message: plan = the routing choices for the global capacity plan, dispatch
and combine = the two all-to-alls, forward and backward, aux = the reduced sums of the
aux losses, allreduce = the router gradients), and the share of the step spent inside
MPI calls.  R = 1 also times moe_layer itself (the single-process layer) for the
machinery's overhead.

On a 2-core machine R = 2 and 4 share two cores (4 ranks oversubscribe them), so
this measures the mechanics -- message counts, volumes, the cost of the exchange --
not a speed-up.  The volume that bounds the speed-up on real hardware is printed as a
formula of N, D, K, R and measured bytes (docs/parallel.md).

    OPENBLAS_NUM_THREADS=1 python benchmarks/expert_parallel.py [--rounds 3 --steps 20]
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

RANKS = (1, 2, 4)
TAGS = ("plan", "dispatch", "combine", "aux", "allreduce")


def default_batch():
    """(x (U, D) float32, modality (U,), MoEConfig, params) of the default preset's
    MoE layer on one batch of 64 pairs: the same on every rank (fixed seeds)."""
    from minivlmoe import runs, sequence, model
    from minivlmoe.moe import moe_layer
    from minivlmoe.tokenizer import PAD_ID

    model_cfg, train_cfg = runs.preset_configs("default", n_train=64, n_test=8)
    train_split, _ = runs.make_data(train_cfg, model_cfg.image_size)
    tok = runs.builtin_tokenizer()
    ids = tok.encode(train_split.captions, model_cfg.max_text_len)      # (B, T)
    params = model.init(np.random.default_rng(0), model_cfg)
    images = train_split.images.astype(model_cfg.dtype)                 # (B, R, R, Ch)
    seq, _ = sequence.embed(params, model_cfg, images, ids[:, :-1], ids, PAD_ID,
                            ids[:, 1:] != PAD_ID)
    rows = seq.rows                                                     # (U,)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows.size, model_cfg.width)).astype(model_cfg.dtype)  # (U, D)
    mcfg = model_cfg.moe_config()
    layer = moe_layer.init(rng, model_cfg.width, model_cfg.expert_hidden, mcfg, 1.0,
                           model_cfg.np_dtype)
    return x, seq.modality[rows], mcfg, layer


def worker(steps, warmup):
    """Run under mpiexec: time ``steps`` steps, rank 0 prints one JSON line."""
    from minivlmoe.moe import moe_layer
    from minivlmoe.parallel import comm as comm_mod, ep_moe, ep_train

    comm = comm_mod.world()
    x, modality, config, params = default_batch()
    n = x.shape[0]
    bounds = np.concatenate([[0], np.cumsum([len(a) for a in
                                             np.array_split(np.arange(n), comm.size)])])
    lo, hi = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    mine = ep_moe.shard(params, config, comm.rank, comm.size)
    x_r, mod_r = x[lo:hi], modality[lo:hi]                     # (n_r, D), (n_r,)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(x.dtype)[lo:hi]

    def routers(grads):
        return {p: {"router": grads[p]["router"]} for p in grads}

    def step():
        y, aux, cache = ep_moe.forward(x_r, mine, config, comm, mod_r)
        _, grads = ep_moe.backward(dy, cache, 1.0)
        ep_train.allreduce_tree(routers(grads), comm)
        return aux

    times, comm_times, single = [], [], []
    for i in range(warmup + steps):
        comm.barrier()
        comm.reset_counters()
        t0 = time.perf_counter()
        aux = step()
        dt = time.perf_counter() - t0
        slowest = comm.allreduce_sum(np.zeros(comm.size) + np.eye(comm.size)[comm.rank] * dt,
                                     tag="bench")              # (R,) every rank's time
        if i >= warmup:
            times.append(float(slowest.max()))
            comm_times.append(sum(v for k, v in comm.seconds.items() if k != "bench"))
            sent = {k: comm.bytes_sent.get(k, 0) for k in TAGS}
        if comm.size == 1 and i >= warmup:                      # the single-process layer
            t0 = time.perf_counter()
            _, _, c = moe_layer.forward(x, params, config, modality)
            moe_layer.backward(dy, c, 1.0)
            single.append(time.perf_counter() - t0)
    if comm.rank == 0:
        kept = sum(int(s.load.sum()) for s in aux.stats.values())
        print(json.dumps({"ranks": comm.size, "tokens": n, "kept": kept,
                          "width": x.shape[1], "itemsize": x.itemsize,
                          "step_s": float(np.median(times)),
                          "comm_s": float(np.median(comm_times)),
                          "single_s": float(np.median(single)) if single else None,
                          "bytes": sent}), flush=True)


def driver(rounds, steps, warmup):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                           + os.environ.get("PATH", ""))
    if mpiexec is None:
        sys.exit("expert_parallel.py: mpiexec not found (pip install -e '.[mpi]')")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    results = {r: [] for r in RANKS}
    for _ in range(rounds):                                     # interleaved
        for r in RANKS:
            out = subprocess.run([mpiexec, "-n", str(r), sys.executable, __file__, "--worker",
                                  "--steps", str(steps), "--warmup", str(warmup)],
                                 env=env, capture_output=True, text=True, check=True)
            results[r].append(json.loads(out.stdout.strip().splitlines()[-1]))
    cores = os.cpu_count()
    first = results[1][0]
    n, kept, d, s = first["tokens"], first["kept"], first["width"], first["itemsize"]
    print(f"default preset MoE layer: U = {n} tokens, D = {d}, K = 1, E = 4, kept "
          f"{kept} assignments, float32; {rounds} rounds x {steps} steps; {cores} cores "
          f"(Rk > {cores} oversubscribes: this measures mechanics, not a speed-up)")
    base = np.median([x["step_s"] for x in results[1]])
    single = np.median([x["single_s"] for x in results[1]])
    print(f"single-process moe_layer forward+backward: {single * 1e3:.2f} ms")
    print(f"{'Rk':>2} {'step ms':>8} {'x Rk=1':>6} {'comm %':>7} {'bytes/rank/step':>16}  "
          + "  ".join(f"{t:>9}" for t in TAGS) + f"  {'4 (Rk-1)/Rk kept D s/Rk':>26}")
    for r in RANKS:
        step = np.median([x["step_s"] for x in results[r]])
        share = np.median([x["comm_s"] / x["step_s"] for x in results[r]])
        sent = results[r][-1]["bytes"]
        bound = 4 * (r - 1) / r * kept * d * s / r
        print(f"{r:>2} {step * 1e3:8.2f} {step / base:6.2f} {100 * share:6.1f}% "
              f"{sum(sent.values()):16,d}  " + "  ".join(f"{sent[t]:9,d}" for t in TAGS)
              + f"  {bound:26,.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.warmup)
    else:
        driver(args.rounds, args.steps, args.warmup)


if __name__ == "__main__":
    main()
