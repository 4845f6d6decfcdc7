"""Agreement checks of expert parallelism against one process, run under mpiexec.

    mpiexec -n Rk python -m minivlmoe.parallel.agreement layer
    mpiexec -n 2 python -m minivlmoe.parallel.agreement train DIR

``layer``: for every case (shared and modality pools, k = 1 and 2, drops and
dropless, BPR on and off, router noise, uneven shares, a rank without any token) the
expert-parallel layer (parallel/ep_moe.py) and moe_layer on the same global batch, in
float64: output, input gradient, every parameter gradient (router contributions summed
over ranks), every aux loss, the plan (same on every rank), and the all-to-all counts
(they sum to the kept assignments; what r sends to q is what q receives from r).

``train``: the tiny preset in float64 on Rk ranks (train.train with
ep_train.ExpertParallel) against one process: the per-step losses and gradient norms;
a checkpoint from Rk ranks resumed in one process and one from one process resumed on
Rk ranks, each to the same next steps.

The error of an array is ``max |a - ref| / max |ref|`` (0 when both are 0); rank 0
prints one line per case and a final ``max relative error`` line, and the exit status
is 1 if any figure exceeds :data:`TOLERANCE` or a structural check fails.
This is test scaffolding (tests/test_parallel.py launches it), not library code.
"""

from __future__ import annotations

import sys
import zlib

import numpy as np
import scipy.sparse as sp

from ..moe import moe_layer
from ..moe.moe_config import MoEConfig
from ..tree import flatten
from . import comm as comm_mod
from . import ep_moe, ep_train

TOLERANCE = 1e-12
AUX_ALL = {"load_balance": 0.01, "importance": 0.02, "z_loss": 0.001,
           "entropy_local": 0.03, "entropy_global": 0.04}


def rel_error(a, ref):
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    scale = float(np.max(np.abs(ref), initial=0.0))
    diff = float(np.max(np.abs(a - ref), initial=0.0))
    return diff / scale if scale else diff


def _leaves(tree):
    return {k: (v.data if isinstance(v, sp.csr_array) else np.asarray(v))
            for k, v in flatten(tree).items()}


def layer_cases():
    """(name, MoEConfig kwargs, N, modality kind, train, rank-0 share or None)."""
    cases = []
    for mode in ("shared", "modality"):
        for k in (1, 2):
            for cf in (0.75, None):
                for bpr in (False, True):
                    cases.append((f"{mode} k={k} cf={cf} bpr={int(bpr)}",
                                  dict(num_experts=4, k=k, capacity_factor=cf, bpr=bpr,
                                       mode=mode, aux_weights=AUX_ALL), 37, "mixed", False,
                                  None))
    cases.append(("shared k=2 cf=1.0 noise", dict(num_experts=4, k=2, capacity_factor=1.0,
                  noise_std=0.3, aux_weights=AUX_ALL), 33, "none", True, None))
    cases.append(("shared k=2 cf=0.5 rank 0 has no token", dict(
        num_experts=4, k=2, capacity_factor=0.5, bpr=True, aux_weights=AUX_ALL),
        24, "mixed", False, 0))
    cases.append(("modality k=2 cf=1.25 rank 0 no image token", dict(
        num_experts=4, k=2, capacity_factor=1.25, mode="modality", aux_weights=AUX_ALL),
        30, "text-first", False, None))
    return cases


def _bounds(n, size, first):
    if first is not None:                       # rank 0 gets `first` tokens, the rest even
        rest = np.array_split(np.arange(n - first), size - 1) if size > 1 else []
        sizes = [first] + [len(a) for a in rest]
    else:
        sizes = [len(a) for a in np.array_split(np.arange(n), size)]
    return np.concatenate([[0], np.cumsum(sizes)])


def check_layer(comm, out):
    """All layer cases; returns the largest error (inf on a structural failure)."""
    worst = 0.0
    d, hidden = 6, 5
    for name, kw, n, mod_kind, train, first in layer_cases():
        config = MoEConfig(**kw)
        rng = np.random.default_rng(zlib.crc32(name.encode()))  # same seed on every rank
        x = rng.standard_normal((n, d))                          # (N, D) float64
        dy = rng.standard_normal((n, d))                         # (N, D)
        modality = {"mixed": rng.integers(0, 2, n), "none": None,
                    "text-first": (np.arange(n) < 3 * n // 4).astype(np.int64)}[mod_kind]
        params = moe_layer.init(rng, d, hidden, config, 1.0, np.float64)
        noise_seed = int(rng.integers(2**31))
        daux = 0.7
        y_ref, aux_ref, c_ref = moe_layer.forward(
            x, params, config, modality, rng=np.random.default_rng(noise_seed), train=train)
        dx_ref, dp_ref = moe_layer.backward(dy, c_ref, daux)

        bounds = _bounds(n, comm.size, first)
        lo, hi = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
        counts = np.diff(bounds)                                 # (Rk,)
        mine = ep_moe.shard(params, config, comm.rank, comm.size)
        mod_r = None if modality is None else modality[lo:hi]
        y, aux, cache = ep_moe.forward(x[lo:hi], mine, config, comm, mod_r,
                                       rng=np.random.default_rng(noise_seed), train=train)
        dx, dp = ep_moe.backward(dy[lo:hi], cache, daux)
        y_all = comm.allgather_rows(y, counts)                   # (N, D)
        dx_all = comm.allgather_rows(dx, counts)                 # (N, D)

        # parameter gradients: routers summed over ranks, experts from their owners
        ref_leaves = _leaves(dp_ref)
        got = _leaves(dp)
        full = {}
        for key, ref in ref_leaves.items():
            part = got.get(key, np.zeros_like(ref))              # experts I do not hold: 0
            full[key] = comm.allreduce_sum(part)
        e_y, e_dx = rel_error(y_all, y_ref), rel_error(dx_all, dx_ref)
        e_dp = max(rel_error(full[k], ref_leaves[k]) for k in ref_leaves)
        e_aux = max([rel_error(aux.aux_total, aux_ref.aux_total)]
                    + [rel_error(aux.losses[k], aux_ref.losses[k]) for k in aux_ref.losses])

        # structure: same plan everywhere, equal stats, counts that add up
        ok = True
        for pool, st in aux_ref.stats.items():
            mine_st = aux.stats[pool]
            ok &= mine_st.capacity == st.capacity and np.array_equal(mine_st.load, st.load) \
                and np.array_equal(mine_st.routed, st.routed)
            ok &= (st.usage is None) == (mine_st.usage is None) and (
                st.usage is None or np.array_equal(mine_st.usage, st.usage))
        ok &= abs(aux.dropped_fraction - aux_ref.dropped_fraction) < 1e-15
        kept_ref, sent, idle = 0, 0, 0
        for (_, idx, pc, _), (_, _, pc_ref, _) in zip(cache.pools, c_ref.pools):
            pool_counts = comm.allgather_counts(hi - lo if idx is None else idx.size)  # (Rk,)
            pool_bounds = np.concatenate([[0], np.cumsum(pool_counts)])  # (Rk+1,)
            if pc is None:
                ok &= pc_ref is None
                continue
            plan = pc.plan
            digest = np.concatenate([plan.experts.ravel(), plan.slot.ravel(),
                                     [plan.capacity]]).astype(np.int64)
            every = comm.allgather_rows(digest[None, :], np.ones(comm.size, np.int64))
            ok &= bool(np.all(every == every[0]))                # every rank: the same plan
            ref_plan = pc_ref.dispatch.plan
            ok &= np.array_equal(plan.kept, ref_plan.kept) and np.array_equal(
                plan.slot, ref_plan.slot)
            send = comm.allgather_rows(pc.exchange.send[None, :], np.ones(comm.size, np.int64))
            recv = comm.allgather_rows(pc.exchange.recv[None, :], np.ones(comm.size, np.int64))
            ok &= np.array_equal(send, recv.T)                   # r -> q sent = q from r got
            ok &= int(send.sum()) == plan.num_slots              # counts = kept assignments
            kept_ref += ref_plan.num_slots
            sent += int(send.sum() - np.trace(send))
            by_rank = [slice(pool_bounds[q], pool_bounds[q + 1]) for q in range(comm.size)]
            load_by_rank = np.array([np.bincount(plan.experts[q][plan.kept[q]],
                                                 minlength=config.num_experts)
                                     for q in by_rank])          # (Rk, E) kept per rank, expert
            idle += int(np.sum(load_by_rank == 0))               # (rank, expert) with no token
        worst = max(worst, e_y, e_dx, e_dp, e_aux)
        if not ok:
            worst = np.inf
        if comm.rank == 0:
            print(f"Rk={comm.size} {name:40s} y {e_y:.1e}  dx {e_dx:.1e}  dparams {e_dp:.1e}  "
                  f"aux {e_aux:.1e}  dropped {aux.dropped_fraction:.3f}  kept {kept_ref}  "
                  f"rows to other ranks {sent}  idle (rank, expert) {idle}  "
                  f"plan/counts {'ok' if ok else 'FAILED'}", file=out, flush=True)
    return worst


def check_train(comm, folder, out):
    """The tiny preset on Rk ranks against one process; returns the largest error."""
    import os

    from .. import runs
    from ..train import train

    model_cfg, train_cfg = runs.preset_configs("tiny", dtype="float64", steps=4,
                                               eval_every=0)
    par = ep_train.ExpertParallel(comm)
    keys = ("total", "contrastive", "caption", "aux", "grad_norm")
    a, b = os.path.join(folder, "ranks"), os.path.join(folder, "single")
    # Rk ranks: steps 1-2, checkpoint (stop_at) in A
    ep = train(model_cfg, train_cfg, a, stop_at=2, progress=None, parallel=par,
               decode_eval=False)
    ref = res_a = None
    if comm.rank == 0:                          # one process: the reference, B, resume A
        ref = train(model_cfg, train_cfg, None, progress=None, decode_eval=False)
        train(model_cfg, train_cfg, b, stop_at=2, progress=None, decode_eval=False)
        res_a = train(model_cfg, train_cfg, a, resume=True, progress=None, decode_eval=False)
    comm.barrier()
    res_b = train(model_cfg, train_cfg, b, resume=True, progress=None, parallel=par,
                  decode_eval=False)            # Rk ranks resume the 1-process checkpoint
    worst = 0.0
    if comm.rank == 0:
        rows = [("Rk ranks, steps 1-2", ep.history, ref.history[:2]),
                ("Rk ranks resume a 1-process ckpt, steps 3-4", res_b.history, ref.history[2:]),
                ("1 process resumes an Rk-rank ckpt, steps 3-4", res_a.history, ref.history[2:])]
        for label, got, want in rows:
            errs = {k: max(rel_error(g[k], w[k]) for g, w in zip(got, want)) for k in keys}
            ok = [g["step"] for g in got] == [w["step"] for w in want]
            worst = max(worst, *errs.values()) if ok else np.inf
            print(f"train Rk={comm.size} {label:45s} " + "  ".join(
                f"{k} {v:.1e}" for k, v in errs.items())
                + "  losses " + ", ".join(f"{g['total']:.6f}" for g in got), file=out,
                flush=True)
    worst = worst if np.isfinite(worst) else 1e300              # rank 0's figure ...
    return float(comm.allreduce_sum(np.array([worst]))[0])     # ... on every rank


def check_failure(comm, folder):
    """Rank Rk-1 fails at step 2 while the others wait inside a collective: run_guarded
    must end the job with one line (MPI_Abort), not hang."""
    from .. import runs
    from ..train import train

    model_cfg, train_cfg = runs.preset_configs("tiny", steps=4, eval_every=0)
    par = ep_train.ExpertParallel(comm)
    step_fn, calls = par.loss_and_grads, []

    def failing(*args, **kwargs):
        calls.append(1)
        if comm.rank == comm.size - 1 and len(calls) == 2:
            raise ValueError("a failure injected on purpose at step 2")
        return step_fn(*args, **kwargs)
    par.loss_and_grads = failing
    return ep_train.run_guarded(par, lambda: train(model_cfg, train_cfg, folder,
                                                    progress=None, parallel=par) and 0)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    comm = comm_mod.world()
    what = argv[0] if argv else "layer"
    if what == "layer":
        worst = check_layer(comm, sys.stdout)
    elif what == "fail":
        return check_failure(comm, argv[1])
    elif what == "train":
        worst = check_train(comm, argv[1], sys.stdout)
    else:
        raise SystemExit(f"usage: agreement (layer | train DIR), got {what!r}")
    if comm.rank == 0:
        print(f"max relative error {worst:.2e} (tolerance {TOLERANCE:g})", flush=True)
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
