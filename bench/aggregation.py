"""Aggregation math cost, as ratios to a plain numpy weighted sum of the same bytes, measured side by side.

    python bench/aggregation.py [--quick]

For K clients and one square layer (d x d) with LoRA ranks drawn from 4..64, each strategy's
server-side math on that layer is timed (median of reps) and its peak Python-heap memory
measured (tracemalloc), both divided by the same numbers for ``sum_k w_k x_k`` in numpy over
the same factor arrays. Also prints the factored-vs-dense FlexLoRA speed-up (dense: materialise
Delta W and ``np.linalg.svd``). Writes docs/aggregation-bench.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pollinate.strategies.fedavg import weighted_mean
from pollinate.strategies.flexlora_math import flexlora_redistribute
from pollinate.strategies.hetlora_math import hetlora_aggregate
from pollinate.strategies.lowrank import pad_rank, split_factors
from pollinate.strategies.merged import add_to_deltas
from pollinate.strategies.sketch_math import (orthonormal_basis, project_upload, projected_svd, sketch_matrix,
                                              sketch_upload)

DOCS = Path(__file__).resolve().parent.parent / "docs"


def measure(fn: Callable[[], object], reps: int) -> tuple[float, int]:
    """(median seconds, peak traced bytes) of ``fn``."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), peak


def layer(k: int, d: int, seed: int, homogeneous_rank: int | None = None):
    rng = np.random.default_rng(seed)
    ranks = [homogeneous_rank or int(r) for r in rng.choice([4, 8, 16, 32, 64], size=k)]
    as_ = [rng.standard_normal((r, d), dtype=np.float32) for r in ranks]
    bs = [rng.standard_normal((d, r), dtype=np.float32) for r in ranks]
    weights = list(rng.dirichlet(np.ones(k)))
    return ranks, as_, bs, weights


def numpy_sum(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    return sum(w * x for w, x in zip(weights, arrays))  # the plain baseline: what numpy does unassisted


def sketch_end_to_end(as_, bs, weights, scalings, rank: int) -> None:
    size = sum(a.shape[0] for a in as_) + 8
    omega = sketch_matrix(0, as_[0].shape[1], size)
    y = sum(sketch_upload(a, b, w * s, omega) for a, b, w, s in zip(as_, bs, weights, scalings))
    q = orthonormal_basis(y)
    z = sum(project_upload(q, a, b, w * s) for a, b, w, s in zip(as_, bs, weights, scalings))
    left, s, vt = projected_svd(q, z)  # the server's step, as strategies/sketch.py takes it: the first R
    split_factors(left, s, vt, rank)  # directions are the adapter, the rest is merged into the base
    root = np.sqrt(s[rank:])
    add_to_deltas({}, "m", [root[:, None] * vt[rank:]], [left[:, rank:] * root])


def run(ks: list[int], ds: list[int], reps: int) -> list[str]:
    rows = ["| K | d | fedavg time | fedavg mem | hetlora time | flora time | flexlora time | sketch time (all clients + server) |",
            "|---|---|---|---|---|---|---|---|"]
    for d in ds:
        for k in ks:
            ranks, as_, bs, w = layer(k, d, seed=k * d)
            scalings = [16.0 / r for r in ranks]
            # fedavg needs equal ranks: every client at rank 16 (the same bytes for the numpy baseline)
            _, ha, hb, _ = layer(k, d, seed=k * d + 1, homogeneous_rank=16)
            named = [{"a": a, "b": b} for a, b in zip(ha, hb)]
            base_t, base_m = measure(lambda: (numpy_sum(ha, w), numpy_sum(hb, w)), reps)
            avg_t, avg_m = measure(lambda: weighted_mean(named, w), reps)
            pad_a = [pad_rank(a, b, max(ranks))[0] for a, b in zip(as_, bs)]
            pad_b = [pad_rank(a, b, max(ranks))[1] for a, b in zip(as_, bs)]
            het_base_t, _ = measure(lambda: (numpy_sum(pad_a, w), numpy_sum(pad_b, w)), reps)
            het_t, _ = measure(lambda: hetlora_aggregate(as_, bs, w, max(ranks)), reps)
            flora_t, _ = measure(lambda: add_to_deltas({}, "m", as_, [wk * s * b for wk, s, b in zip(w, scalings, bs)]),
                                 reps)
            flex_t, _ = measure(lambda: flexlora_redistribute(bs, as_, w, scalings, [64], [16.0 / 64]), reps)
            sk_t, _ = measure(lambda: sketch_end_to_end(as_, bs, w, scalings, 64), max(1, reps // 2))
            rows.append(f"| {k} | {d} | {avg_t / base_t:.2f}x ({base_t / avg_t:.2f} of numpy throughput) | "
                        f"{avg_m / max(1, base_m):.2f}x | {het_t / het_base_t:.1f}x | {flora_t / het_base_t:.1f}x | "
                        f"{flex_t / het_base_t:.1f}x | {sk_t / het_base_t:.1f}x |")
            print(rows[-1], flush=True)
    return rows


def flexlora_speedup(d: int, k: int, reps: int) -> str:
    ranks, as_, bs, w = layer(k, d, seed=7)
    scalings = [16.0 / r for r in ranks]

    def dense() -> None:
        delta = sum(wk * s * (b.astype(np.float64) @ a) for wk, s, a, b in zip(w, scalings, as_, bs))
        u, s_, vt = np.linalg.svd(delta, full_matrices=False)
        _ = (u[:, :64] * s_[:64]) @ vt[:64]

    dense_t, dense_m = measure(dense, max(1, reps // 2))
    fact_t, fact_m = measure(lambda: flexlora_redistribute(bs, as_, w, scalings, [64], [0.25]), reps)
    line = (f"| {d} | {k} | {max(ranks)} | {dense_t:.3f} s | {fact_t:.4f} s | **{dense_t / fact_t:.0f}x** | "
            f"{dense_m / max(1, fact_m):.1f}x less |")
    print(line, flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (about a minute)")
    args = parser.parse_args()
    reps = 3 if args.quick else 7
    ks, ds = ([4, 16], [1024]) if args.quick else ([4, 16, 64], [1024, 4096])
    table = run(ks, ds, reps)
    speed = ["| d | K | max rank | dense SVD | factored | speed-up | peak memory |", "|---|---|---|---|---|---|---|"]
    speed += [flexlora_speedup(d, 8, reps) for d in ([1024] if args.quick else [1024, 4096])]
    DOCS.mkdir(exist_ok=True)
    (DOCS / "aggregation-bench.md").write_text(
        f"# Aggregation math cost\n\n`python bench/aggregation.py{' --quick' if args.quick else ''}` "
        f"(median of {reps} runs; 2-core CPU). One d x d layer, LoRA ranks drawn from 4..64.\n\n"
        "Ratios are to a plain numpy weighted sum over the same arrays (fedavg: every client at rank 16; the others: "
        "the heterogeneous factors zero-padded to the largest rank). fedavg's target is >= 0.5 of the numpy "
        "throughput.\n\n" + "\n".join(table) +
        "\n\n## FlexLoRA: factored (QR + small SVD) vs dense (materialise Delta W, full SVD)\n\n"
        "Target: >= 20x at 4096^2, K = 8, r <= 64.\n\n" + "\n".join(speed) + "\n")


if __name__ == "__main__":
    main()
