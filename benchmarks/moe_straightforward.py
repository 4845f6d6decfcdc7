"""The MoE layer against a straightforward NumPy version of it (issue 13 item 3).

The straightforward form is what one writes in NumPy without the library's structure:
dense weights prepared once, no argument checks, no caches as named tuples, index
gathers instead of the sparse dispatch and combine matrices, one loop over the experts,
the backward written inline.  It computes the same layer as the default modality MoE
layer (an image pool and a text pool of E experts, top-1 raw gates, capacity
``ceil(1.25 N / E)`` per pool in token order, GELU-tanh experts, the load-balance and
z-loss with their weights; the weight-0 losses are not computed, as in training), and
the script first checks that in float64 against ``moe_layer.forward``/``backward``
(output, aux total, input gradient, every parameter gradient), then times both,
forward + backward, interleaved, at ``--tokens`` (16, 544, 2080):

    OPENBLAS_NUM_THREADS=1 python benchmarks/moe_straightforward.py

The issue's target: at 16 tokens, the layer at most about 2x the straightforward form.
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

from minivlmoe import runs  # noqa: E402
from minivlmoe.moe import dispatch, moe_layer  # noqa: E402

C = float(np.sqrt(2.0 / np.pi))   # GELU-tanh constants (minivlmoe/ops/gelu.py)
A = 0.044715


def dense_pool(pool):
    """A pool's params as plain dense arrays: router (E, D), (E,); per expert W1, b1, W2, b2."""
    router = (pool["router"]["W"].toarray(), pool["router"]["b"])
    experts = [(p["fc1"]["W"].toarray(), p["fc1"]["b"], p["fc2"]["W"].toarray(), p["fc2"]["b"])
               for p in pool["experts"].values()]
    return router, experts


def pool_step(x, dy, router, experts, cf, w_lb, w_z):
    """One pool, forward and backward: ``(y, aux_total, dx, grads)`` for x, dy (n, D)."""
    n, E = x.shape[0], len(experts)
    Wr, br = router
    # ---- forward: router, top-1, capacity in token order
    logits = x @ Wr.T + br                                         # (n, E)
    m = logits.max(axis=1, keepdims=True)                          # (n, 1)
    e = np.exp(logits - m)                                         # (n, E)
    s = e.sum(axis=1, keepdims=True)                               # (n, 1)
    p = e / s                                                      # (n, E)
    lse = m[:, 0] + np.log(s[:, 0])                                # (n,)
    top = p.argmax(axis=1)                                         # (n,)
    rows = np.arange(n)
    gate = p[rows, top]                                            # (n,) raw top-1 gate
    onehot = top[:, None] == np.arange(E)                          # (n, E)
    pos = np.cumsum(onehot, axis=0)[rows, top] - 1                 # (n,) place in the queue
    kept = pos < dispatch.capacity(n, E, 1, cf)                    # (n,)
    y = np.zeros_like(x)                                           # (n, D)
    saved = []
    for j, (W1, b1, W2, b2) in enumerate(experts):
        idx = np.flatnonzero(kept & (top == j))                    # (n_j,)
        a = x[idx] @ W1.T + b1                                     # (n_j, F)
        t = np.tanh(C * (a + A * a ** 3))                          # (n_j, F)
        h = 0.5 * a * (1.0 + t)                                    # (n_j, F)
        o = h @ W2.T + b2                                          # (n_j, D)
        y[idx] = gate[idx, None] * o
        saved.append((idx, a, t, h, o))
    f = onehot.mean(axis=0)                                        # (E,) routed fraction
    P = p.mean(axis=0)                                             # (E,)
    aux = w_lb * E * float(f @ P) + w_z * float(np.mean(lse * lse))
    # ---- backward
    dx = np.zeros_like(x)                                          # (n, D)
    dgate = np.zeros(n, dtype=x.dtype)                             # (n,)
    grads = []
    for (W1, b1, W2, b2), (idx, a, t, h, o) in zip(experts, saved):
        do = gate[idx, None] * dy[idx]                             # (n_j, D)
        dgate[idx] = np.sum(dy[idx] * o, axis=1)                   # (n_j,)
        dh = do @ W2                                               # (n_j, F)
        slope = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * C * (1.0 + 3 * A * a * a)
        da = dh * slope                                            # (n_j, F)
        dx[idx] += da @ W1
        grads.append((da.T @ x[idx], da.sum(axis=0), do.T @ h, do.sum(axis=0)))
    dp = np.zeros_like(p)                                          # (n, E)
    dp[rows, top] = dgate
    dp += w_lb * E * f / n                                         # load balance
    dlogits = p * (dp - np.sum(p * dp, axis=1, keepdims=True))     # (n, E) softmax
    dlogits += w_z * 2.0 * lse[:, None] * p / n                    # z-loss
    dx += dlogits @ Wr
    return y, aux, dx, ((dlogits.T @ x, dlogits.sum(axis=0)), grads)


def straightforward_step(x, dy, modality, pools, cf, w_lb, w_z):
    """The modality layer: image tokens to the image pool, text tokens to the text pool."""
    y, dx, aux, grads = np.zeros_like(x), np.zeros_like(x), 0.0, {}
    for m, name in enumerate(("image", "text")):
        idx = np.flatnonzero(modality == m)                        # (n_p,)
        y_p, aux_p, dx_p, grads[name] = pool_step(x[idx], dy[idx], *pools[name], cf, w_lb, w_z)
        y[idx], dx[idx] = y_p, dx_p
        aux += aux_p
    return y, aux, dx, grads


def inputs(n, dtype, seed=0):
    mcfg = runs.preset_configs("default", experts="modality")[0]
    mcfg = type(mcfg)(**{**mcfg.to_dict(), "dtype": np.dtype(dtype).name})
    cfg = mcfg.moe_config()
    rng = np.random.default_rng(seed)
    params = moe_layer.init(rng, mcfg.width, mcfg.expert_hidden, cfg, 1.0, dtype)
    for pool in params.values():              # biases off zero, so their gradients count
        pool["router"]["b"][:] = 0.1 * rng.standard_normal(cfg.num_experts)
    x = rng.standard_normal((n, mcfg.width)).astype(dtype)        # (n, D)
    dy = rng.standard_normal((n, mcfg.width)).astype(dtype)       # (n, D)
    modality = (rng.random(n) >= 17 / 40).astype(np.int64)         # (n,) 17 of 40 image
    return cfg, params, x, dy, modality


def check(n=544):
    """Float64: the straightforward form computes moe_layer's numbers.  Returns the
    worst relative difference."""
    cfg, params, x, dy, modality = inputs(n, np.float64)
    w = cfg.aux_weights
    pools = {name: dense_pool(params[name]) for name in ("image", "text")}
    y, aux, dx, grads = straightforward_step(x, dy, modality, pools, cfg.capacity_factor,
                                             w["load_balance"], w["z_loss"])
    y_ref, aux_ref, cache = moe_layer.forward(x, params, cfg, modality, all_losses=False)
    dx_ref, g_ref = moe_layer.backward(dy, cache, 1.0)

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

    worst = {"y": rel(y, y_ref), "aux_total": abs(aux - aux_ref.aux_total) / aux_ref.aux_total,
             "dx": rel(dx, dx_ref)}
    for name in ("image", "text"):
        (dWr, dbr), experts = grads[name]
        worst[f"{name}.router.W"] = rel(dWr, g_ref[name]["router"]["W"].toarray())
        worst[f"{name}.router.b"] = rel(dbr, g_ref[name]["router"]["b"])
        for j, (dW1, db1, dW2, db2) in enumerate(experts):
            e = g_ref[name]["experts"][f"e{j}"]
            for label, a, b in (("fc1.W", dW1, e["fc1"]["W"].toarray()), ("fc1.b", db1, e["fc1"]["b"]),
                                ("fc2.W", dW2, e["fc2"]["W"].toarray()), ("fc2.b", db2, e["fc2"]["b"])):
                if np.any(b):
                    worst[f"{name}.e{j}.{label}"] = rel(a, b)
    name, value = max(worst.items(), key=lambda kv: kv[1])
    print(f"[check] float64, {n} tokens: worst relative difference {value:.1e} ({name}) "
          f"over y, aux_total, dx and {len(worst) - 3} parameter gradients")
    return value


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16,544,2080")
    ap.add_argument("--rounds", type=int, default=9, help="timed blocks per side (9)")
    args = ap.parse_args()
    if check() > 1e-10:
        print("FAILED: the straightforward form does not compute the layer's numbers")
        sys.exit(1)
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, float32, "
          f"forward + backward, interleaved, medians of {args.rounds} blocks")
    print("| tokens | moe_layer ms | straightforward ms | ratio |")
    print("|---|---|---|---|")
    for n in (int(t) for t in args.tokens.split(",")):
        cfg, params, x, dy, modality = inputs(n, np.float32)
        w = cfg.aux_weights
        pools = {name: dense_pool(params[name]) for name in ("image", "text")}

        def ours():
            _, _, cache = moe_layer.forward(x, params, cfg, modality, all_losses=False)
            moe_layer.backward(dy, cache, 1.0)

        def plain():
            straightforward_step(x, dy, modality, pools, cfg.capacity_factor,
                                 w["load_balance"], w["z_loss"])

        inner = max(1, 4000 // max(n, 200))
        times = {ours: [], plain: []}
        for fn in (ours, plain):
            fn()
        for r in range(args.rounds):
            for fn in ((ours, plain) if r % 2 == 0 else (plain, ours)):
                t = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[fn].append((time.perf_counter() - t) / inner * 1e3)
        a, b = statistics.median(times[ours]), statistics.median(times[plain])
        print(f"| {n} | {a:.3f} | {b:.3f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
