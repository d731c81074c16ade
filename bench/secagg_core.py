"""SecAgg+ compute cost, as ratios to a plain numpy sum of the same float32 vectors, measured side by side.

    python bench/secagg_core.py [--quick]

(until pyproject.toml lists ``secagg`` in [tool.setuptools] packages: ``PYTHONPATH=. python bench/...``)

For n clients with float32 vectors of 1M and 4M values, one secure-aggregation round runs in one
process (``secagg.run_round``; every client and the server in turn, no network) on a random
k-regular graph (k = 2 ceil(log2 n), capped at n - 1; t = k // 2 + 1). Times are medians over reps:

- per stage, the sum over all clients and the server's own time;
- "all parties": the sequential sum, i.e. the CPU seconds the round costs in total;
- "critical path": the slowest client of each stage plus the server, what a deployment whose clients
  run in parallel waits for (transport excluded).

Both are divided by the plaintext baseline: the server's numpy sum of the n weighted float32 vectors.
Writes docs/secagg-core-bench.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from pollinate.secagg import (Quantization, RoundConfig, StageTimes, dequantize_sum, minimum_threshold, quantize,
                    regular_graph, run_round, suggested_degree)
from pollinate.secagg.keys import KEY_BYTES
from pollinate.secagg.messages import CIPHERTEXT_BYTES, WIRE_SHARE_BYTES

DOCS = Path(__file__).resolve().parent.parent / "docs"
STAGES = ("advertise_keys", "share_keys", "mask_input", "unmask")


def one_round(n: int, length: int, seed: int, dropped: int = 0) -> dict[str, float]:
    """Timings of one round; the last ``dropped`` clients vanish after sharing keys (stage 2)."""
    rng = np.random.default_rng(seed)
    values = [rng.uniform(-1, 1, length).astype(np.float32) for _ in range(n)]
    weights = list(rng.dirichlet(np.ones(n)))
    degree = suggested_degree(n)
    q = Quantization(clip=1.0, levels=2**16, modulus_bits=32)
    config = RoundConfig(seed, regular_graph(range(n), degree, seed), minimum_threshold(degree), length, q)

    survivors = range(n - dropped)
    start = time.perf_counter()
    plain = sum(weights[u] * values[u] for u in survivors)  # the baseline: what numpy does unassisted
    out = {"plaintext": time.perf_counter() - start}

    quantise_times = []
    inputs = {}
    for u in range(n):
        start = time.perf_counter()
        inputs[u] = quantize(values[u], weights[u], q)
        quantise_times.append(time.perf_counter() - start)
    times = StageTimes()
    result = run_round(config, inputs, drop_after={u: 2 for u in range(n - dropped, n)}, times=times)
    start = time.perf_counter()
    recovered = dequantize_sum(result.total, len(result.survivors), q)
    dequantise = time.perf_counter() - start
    error = float(np.abs(recovered - plain).max())
    if error > n * q.step / 2 + 1e-6:  # float32 baseline rounding is ~1e-7, far below the bound
        raise AssertionError(f"secagg sum is off by {error}, beyond the quantisation bound {n * q.step / 2}")

    out["quantise"] = sum(quantise_times)
    for stage in STAGES:
        out[f"{stage}.clients"] = times.clients[stage]
        out[f"{stage}.server"] = times.server[stage]
    out["server.aggregate"] = times.server["aggregate"] + dequantise + times.server["setup"]
    out["all"] = out["quantise"] + sum(times.clients.values()) + sum(times.server.values()) + dequantise
    out["critical"] = (max(quantise_times) + sum(times.slowest_client.values()) + sum(times.server.values())
                       + dequantise)
    out["error"] = error
    out["degree"] = degree
    return out


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms" if seconds >= 0.01 else f"{1000 * seconds:.1f} ms"


def bytes_per_client(degree: int, length: int) -> tuple[int, int]:
    """(masked upload, protocol overhead up + down) in payload bytes, ids as 8 bytes each."""
    up = 2 * KEY_BYTES + degree * (8 + CIPHERTEXT_BYTES) + degree * (8 + WIRE_SHARE_BYTES)
    down = degree * (8 + 2 * KEY_BYTES) + degree * (8 + CIPHERTEXT_BYTES) + degree * 8
    return 4 * length, up + down


def run(cases: list[tuple[int, int]], lengths: list[int], reps: dict[int, int]) -> list[str]:
    header = ("| n | k | values | plaintext sum | quantise (clients) | keys | shares | masking (clients / server) "
              "| unmasking (clients / server) | aggregate (server) | all parties | ratio | critical path | ratio "
              "| max error | upload bytes (masked / float32) | key+share bytes per client |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for length in lengths:
        for n, dropped in cases:
            runs = [one_round(n, length, 1000 * n + r, dropped) for r in range(reps[length])]
            m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            upload, overhead = bytes_per_client(int(m["degree"]), length)
            label = f"{n} ({dropped} dropped)" if dropped else str(n)
            rows.append(
                f"| {label} | {int(m['degree'])} | {length / 1e6:.0f}M | {ms(m['plaintext'])} | {ms(m['quantise'])} "
                f"| {ms(m['advertise_keys.clients'] + m['advertise_keys.server'])} "
                f"| {ms(m['share_keys.clients'] + m['share_keys.server'])} "
                f"| {ms(m['mask_input.clients'])} / {ms(m['mask_input.server'])} "
                f"| {ms(m['unmask.clients'])} / {ms(m['unmask.server'])} | {ms(m['server.aggregate'])} "
                f"| {ms(m['all'])} | **{m['all'] / m['plaintext']:.0f}x** | {ms(m['critical'])} "
                f"| **{m['critical'] / m['plaintext']:.0f}x** | {m['error']:.1e} "
                f"| {upload / 1e6:.1f} MB / {upload / 1e6:.1f} MB (1.00x) | {overhead / 1e3:.1f} kB |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n in {5, 10}, 1M values, one repetition")
    args = parser.parse_args()
    if args.quick:
        cases, lengths, reps = [(5, 0), (10, 2)], [1_000_000], {1_000_000: 1}
    else:
        cases, lengths = [(5, 0), (10, 0), (20, 0), (10, 2)], [1_000_000, 4_000_000]
        reps = {1_000_000: 7, 4_000_000: 3}
    print(f"secagg core, median of {reps} reps per vector size")
    rows = run(cases, lengths, reps)
    if args.quick:
        return
    text = [
        "# Secure aggregation (SecAgg+) compute cost",
        "",
        f"`python bench/secagg_core.py` (median of {reps[1_000_000]} runs at 1M values, {reps[4_000_000]} at 4M; "
        "2-core CPU shared with other jobs). One round, every client and the server in one process, no network "
        "(`secagg.run_round`); no dropouts except in the \"(2 dropped)\" rows, where two clients vanish after "
        "sharing keys and the server rebuilds their masking keys and strips their pairwise masks. Random "
        "k-regular graph, k = 2 ceil(log2 n) capped at n - 1, t = k // 2 + 1; ring Z_2^32, 2^16 quantisation "
        "levels over [-1, 1]. Quantise counts every client, dropped ones included.",
        "",
        "- **plaintext sum**: the server's numpy sum of the n weighted float32 vectors: the baseline.",
        "- **keys / shares**: stage 1 and 2, all clients plus server (X25519, HKDF, Shamir, AES-GCM: "
        "independent of the vector size).",
        "- **masking**: stage 3; clients expand k + 1 ChaCha20 masks each, the server adds the masked vectors.",
        "- **unmasking**: stage 4; clients answer, the server rebuilds seeds and strips n self-masks "
        "(plus the pairwise masks of any dropped client).",
        "- **all parties**: CPU time of the whole round summed over clients and server; **critical path**: the slowest "
        "client of each stage plus the server, what parallel clients wait for. Ratios are to the plaintext sum.",
        "- **max error**: largest |secagg sum - float sum| over coordinates; the documented bound is n x step / 2 "
        "= n x 1.5e-5.",
        "- **bytes**: the masked upload is uint32, the same size as float32; key and share messages add "
        "O(k) bytes per client.",
        "",
        *rows,
        "",
        "The issue's target (end-to-end time per round <= 1.5x plaintext at 10 clients x 1M values, transport "
        "included) is about a whole round; this table is only its compute part, against a numpy sum that takes "
        "milliseconds, so the compute ratios here are far above 1.5x and say little about the target on their own. "
        "What secure aggregation adds to a round is roughly the critical path minus the plaintext sum (tens of ms "
        "at 1M values, a few hundred at 4M) plus three extra round trips (keys, shares, unmasking) of a few kB "
        "each; the masked upload is the same size as the float32 one. Whether that stays within 1.5x depends on "
        "the transport and training time it is added to, which this bench does not measure.",
        "",
    ]
    DOCS.mkdir(exist_ok=True)
    (DOCS / "secagg-core-bench.md").write_text("\n".join(text))
    print(f"wrote {DOCS / 'secagg-core-bench.md'}")


if __name__ == "__main__":
    main()
