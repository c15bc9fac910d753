"""Nanoseconds per entry of each fused CPU kernel (numba_kernels), alone, on one Llama MLP-shaped tensor.

Usage:
  python bench/bench_kernels.py [--rows 5632] [--width 2048] [--threads 1 2] [--repeat 7]

The tensors are bfloat16 like the models of bench_merge.py: a base (randn * 0.02) and two fine-tunes (base +
randn * 0.002). Each kernel runs on the whole tensor with numba's pool at each --threads count; the table
shows the best and the median of --repeat runs in ns per entry (wall time / entries, so with two threads
the figure is half the per-core cost when the kernel scales). A merge runs these with the reader and the
writer competing for the same cores, so there they take longer than here: this is the compute alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np
import torch

from mergesmith.methods import numba_kernels as K
from mergesmith.methods.task_vector_fast import SUM_BLOCK, _threshold


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16).ravel()


def kernels(rows: int, width: int, threads: int) -> dict[str, Callable[[], object]]:
    """The calls a merge makes per tensor, grouped by method (each runs the same way in the merge)."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(rows, width, generator=gen) * 0.02).bfloat16()
    fts = [(base.float() + torch.randn(rows, width, generator=gen) * 0.002).bfloat16() for _ in range(2)]
    b, f1, f2 = bf16_bits(base), bf16_bits(fts[0]), bf16_bits(fts[1])
    n = b.size
    block = max(1 << 15, -(-n // (8 * threads)))  # as task_vector_fast._block
    out = np.empty(n, np.uint16)
    masks = np.empty((2, n), np.uint8)
    zeros, none = np.zeros(2, np.int64), np.zeros(2, np.uint64)
    half = np.full(2, 0.5, np.float32)
    ones = np.ones(2, np.float32)
    masked = np.full(2, K.KEEP_MASKED, np.int64)
    magnitude = np.full(2, K.KEEP_MAGNITUDE, np.int64)
    drawn, seeds, bounds = (
        np.full(2, K.KEEP_RANDOM, np.int64),
        np.array([5, 6], np.uint64),
        np.full(2, 1 << 31),
    )
    # TIES at density 0.5: each fine-tune's magnitude threshold, found as the merge finds it
    found = [_threshold(K, b, f, n, n // 2, True, block) for f in (f1, f2)]
    thr, cut = (np.array([x[i] for x in found], np.int64) for i in (0, 1))
    della_thr = K.della_thresholds(width, np.float32(0.4), np.float32(0.2))
    rows_per_task = max(1, rows // (8 * threads))
    combine_args = (half, True, True, np.float32(1), False, np.float32(1), out, block)
    three = (b, f1, f2)
    w3 = np.ones(3, np.float32)
    return {
        "linear: weighted_sum (3 models)": lambda: K.weighted_sum(three, w3, np.float32(3), True, out, block),
        "slerp: slerp_sums": lambda: K.slerp_sums(b, f1, SUM_BLOCK),
        "slerp: lerp_into": lambda: K.lerp_into(b, f1, np.float32(0.6), np.float32(0.4), out, block),
        "ties: hist_high (per fine-tune)": lambda: K.hist_high(b, f1, block),
        "ties: combine_fused (2, magnitude)": lambda: K.combine_fused(
            b, (f1, f2), magnitude, thr, cut, none, zeros, masks, ones, *combine_args
        ),
        "dare: random_sums (per fine-tune)": lambda: K.random_sums(b, f1, 5, 1 << 31, masks[0], 0, block),
        "della: della_mask (per fine-tune)": lambda: K.della_mask(
            b, f1, rows, width, della_thr, 12345, masks[1], 0, 16, rows_per_task
        ),
        "dare/della: combine_fused (2, masked)": lambda: K.combine_fused(
            b, (f1, f2), masked, zeros, zeros, none, zeros, masks, ones * np.float32(1.3), *combine_args
        ),
        "della: combine_fused (2, masked, factor 1)": lambda: K.combine_fused(
            b, (f1, f2), masked, zeros, zeros, none, zeros, masks, ones, *combine_args
        ),
        "dare, no rescale: combine_fused (2, drawn)": lambda: K.combine_fused(
            b, (f1, f2), drawn, zeros, zeros, seeds, bounds, masks, ones, *combine_args
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=5632)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, numba.config.NUMBA_NUM_THREADS])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    n = args.rows * args.width
    threads = sorted({max(1, min(t, numba.config.NUMBA_NUM_THREADS)) for t in args.threads})
    print(f"{args.rows} x {args.width} bfloat16 ({n / 1e6:.1f}M entries); ns per entry, best / median")
    print(f"{'kernel':<40}" + "".join(f"{f'{t} thread' + ('s' if t > 1 else ''):>18}" for t in threads))
    results: dict[str, list[str]] = {}
    for t in threads:
        numba.set_num_threads(t)
        for name, call in kernels(args.rows, args.width, t).items():
            call()  # compiles (or loads from numba's cache) outside the timing
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            best, median = min(times) / n * 1e9, statistics.median(times) / n * 1e9
            results.setdefault(name, []).append(f"{best:.2f} / {median:.2f}")
    for name, cells in results.items():
        print(f"{name:<40}" + "".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
