"""The small measurements behind docs/performance.md: NumPy primitives at our shapes.

Prints, each timed against its alternative side by side in one run (best of 5 repeats
of many calls, one BLAS thread, float32):

* sums over a short axis: ``a.sum(axis=-1)`` against ``a @ ones`` (minivlmoe/ops/sums.py)
  for the layer norms' (64, 40, 64) and an attention block's (64, 4, 11, 28), and the
  bias gradient's column sum of (2560, 64);
* the token table's gradient: ``np.add.at`` against the sorted run sums of
  ``np.add.reduceat`` (minivlmoe/ops/token_embed.py), 64 captions of 12 ids;
* the fused Q/K/V product (2560, 64) x (64, 192): ms and GFLOP/s;
* one attention block product on 256 small matrices, (256, 17, 16) x (256, 16, 17):
  ms and GFLOP/s, the cost of one BLAS call per matrix.

    OPENBLAS_NUM_THREADS=1 python benchmarks/primitives.py
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import timeit  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

from minivlmoe.ops import sums  # noqa: E402


def us(fn, number=200):
    """Best of 5 repeats, microseconds per call."""
    fn()
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main():
    rng = np.random.default_rng(0)
    f32 = np.float32
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, float32, "
          "best of 5 repeats")
    print(f"{'what':<44} {'NumPy us':>9} {'ours us':>9} {'ratio':>6}")
    rows = []
    for shape in ((64, 40, 64), (64, 4, 11, 28)):
        a = rng.standard_normal(shape).astype(f32)
        rows.append((f"row sum {shape}", us(lambda: a.sum(axis=-1, keepdims=True)),
                     us(lambda: sums.row_sum(a))))
    g = rng.standard_normal((2560, 64)).astype(f32)
    rows.append(("column sum (2560, 64)", us(lambda: g.sum(axis=0)),
                 us(lambda: sums.column_sum(g))))
    ids = rng.integers(0, 20, size=(64, 12)).reshape(-1)                  # (B*T,)
    dx = rng.standard_normal((64 * 12, 64)).astype(f32)                  # (B*T, D)

    def add_at():
        d = np.zeros((20, 64), f32)
        np.add.at(d, ids, dx)
        return d

    def run_sums():
        d = np.zeros((20, 64), f32)
        order = np.argsort(ids, kind="stable")
        s = ids[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        d[s[starts]] = np.add.reduceat(dx[order], starts, axis=0)
        return d

    assert np.allclose(add_at(), run_sums(), atol=1e-4)
    rows.append(("token-table gradient: add.at vs reduceat", us(add_at), us(run_sums)))
    for name, numpy_us, ours_us in rows:
        print(f"{name:<44} {numpy_us:>9.1f} {ours_us:>9.1f} {numpy_us / ours_us:>6.1f}")

    x = rng.standard_normal((2560, 64)).astype(f32)
    W = rng.standard_normal((192, 64)).astype(f32)
    t = us(lambda: x @ W.T) * 1e-6
    flop = 2 * 2560 * 64 * 192
    print(f"fused Q/K/V product (2560, 64) x (64, 192): {t * 1e3:.3f} ms, "
          f"{flop / t / 1e9:.0f} GFLOP/s")
    q = rng.standard_normal((256, 17, 16)).astype(f32)
    k = rng.standard_normal((256, 16, 17)).astype(f32)
    t = us(lambda: q @ k) * 1e-6
    flop = 2 * 256 * 17 * 16 * 17
    print(f"block product (256, 17, 16) x (256, 16, 17): {t * 1e3:.3f} ms, "
          f"{flop / t / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
