"""Sparse linear layer vs the same layer with a dense NumPy weight: one training step.

A step is forward, input gradient and weight gradient (plus the bias), float32,
N = 4096 tokens, shapes 128 -> 512 and 512 -> 128, at several stored densities.
The two are timed interleaved in one run (dense, sparse, dense, sparse, ...) and the
median of each is reported, so a busy machine slows both alike; the ratio is what counts.

Two input layouts for the sparse layer:
  token-major    x and dy are C-contiguous (N, D) arrays: the layer pays for the layout
                 change (a blocked transpose) on every call. The worst case.
  feature-major  x and dy arrive as transposed views of (D, N) arrays, as they do inside a
                 chain of sparse layers (each returns such a view): no copies.
The dense layer uses BLAS, which takes any layout without copying.

Run with one BLAS thread (the script sets it if unset):
    OPENBLAS_NUM_THREADS=1 python benchmarks/sparse_linear.py
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

from minivlmoe.ops import sparse_linear  # noqa: E402


def dense_step(x, Wd, b, dy):
    y = x @ Wd.T + b                 # (N, Dout)
    dx = dy @ Wd                     # (N, Din)
    dW = dy.T @ x                    # (Dout, Din)
    db = dy.sum(0)                   # (Dout,)
    return y, dx, dW, db


def sparse_step(x, params, dy):
    y, cache = sparse_linear.forward(x, params)
    dx, grads = sparse_linear.backward(dy, cache)
    return y, dx, grads


def bench(fns, repeats):
    """Interleaved timing; returns the median seconds of each function."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()  # warm up
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    args = parser.parse_args()
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}  N={args.tokens}  "
          f"float32  median of {args.repeats} interleaved repeats")
    print(f"{'shape':<11}{'density':>8}{'dense ms':>10}{'sparse ms':>10}{'ratio':>7}"
          f"{'fm ms':>8}{'fm ratio':>9}  target")
    targets = {0.01: 0.3, 0.05: 0.7}
    worst = {}
    for d_in, d_out in ((128, 512), (512, 128)):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.tokens, d_in)).astype(np.float32)
        dy = rng.standard_normal((args.tokens, d_out)).astype(np.float32)
        x_fm = np.ascontiguousarray(x.T).T           # same values, (D, N)-contiguous storage
        dy_fm = np.ascontiguousarray(dy.T).T
        for density in args.densities:
            params = sparse_linear.init(rng, d_in, d_out, density, dtype=np.float32)
            Wd, b = params["W"].toarray(), params["b"]
            t_dense, t_sparse, t_fm = bench([
                lambda: dense_step(x, Wd, b, dy),
                lambda: sparse_step(x, params, dy),
                lambda: sparse_step(x_fm, params, dy_fm),
            ], args.repeats)
            r, r_fm = t_sparse / t_dense, t_fm / t_dense
            limit = targets.get(density, 1.3)
            worst[(d_in, d_out, density)] = (r, r_fm, limit)
            print(f"{d_in}->{d_out:<6}{density:>8.2f}{1e3 * t_dense:>10.2f}{1e3 * t_sparse:>10.2f}"
                  f"{r:>7.2f}{1e3 * t_fm:>8.2f}{r_fm:>9.2f}  <= {limit} "
                  f"{'ok' if r <= limit else 'MISSED'} (token-major)"
                  f"{'' if r <= limit else ' / ' + ('ok' if r_fm <= limit else 'MISSED') + ' (feature-major)'}",
                  flush=True)
    missed = [k for k, (r, _, lim) in worst.items() if r > lim]
    print(f"\ntoken-major targets missed: {len(missed)} of {len(worst)}"
          + (f" {missed}" if missed else ""))


if __name__ == "__main__":
    main()
