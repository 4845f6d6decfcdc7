"""Why minivlmoe's GELU uses the tanh form: time of the exact (scipy erf) form vs the
tanh form, forward + backward on 1M float32 values, measured side by side in one run.

    OPENBLAS_NUM_THREADS=1 python benchmarks/gelu.py
"""

import os
import sys
import time

import numpy as np
from scipy.special import erf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

from minivlmoe.ops import gelu


def exact_step(x, dy):
    cdf = 0.5 * (1.0 + erf(x * float(1 / np.sqrt(2))))
    pdf = np.exp(-0.5 * x * x) * float(1 / np.sqrt(2 * np.pi))
    return x * cdf, dy * (cdf + x * pdf)


def tanh_step(x, dy):
    y, cache = gelu.forward(x)
    return y, gelu.backward(dy, cache)


def main(n=1_000_000, repeats=9):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    dy = rng.standard_normal(n).astype(np.float32)
    times = {"exact (erf)": [], "tanh (minivlmoe)": []}
    for _ in range(repeats):
        for name, fn in (("exact (erf)", exact_step), ("tanh (minivlmoe)", tanh_step)):
            t0 = time.perf_counter()
            fn(x, dy)
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:<18} {1e3 * t:8.2f} ms  (forward + backward, {n} float32 values)")
    print(f"exact / tanh time ratio: {med['exact (erf)'] / med['tanh (minivlmoe)']:.1f}x")
    y_exact, _ = exact_step(x.astype(np.float64), dy.astype(np.float64))
    y_tanh, _ = tanh_step(x.astype(np.float64), dy.astype(np.float64))
    print(f"max |exact - tanh| over these inputs: {np.abs(y_exact - y_tanh).max():.2e}")


if __name__ == "__main__":
    main()
