"""SecAgg+ round time and bytes, against plaintext and against Flower's SecAgg+, measured side by side.

    python bench/secagg.py [--nodes 5 10 20] [--lengths 1000000 4000000] [--reps 3] [--quick]
    python bench/secagg.py --render runs/secagg-bench.jsonl [--before runs/older.jsonl]   # re-render the doc

For each n, one Flower simulation (the Simulation Engine ``pollinate simulate`` uses) with n nodes runs
``bench/secagg_apps.py``: per vector length L, one untimed warm-up round of each configuration, then
``reps`` repetitions of four configurations, interleaved in a rotating order (so machine load hits all
alike): pollinate in the clear, pollinate SecAgg+, Flower's default fit workflow, Flower's
SecAggPlusWorkflow. No model is trained: each node answers with a fixed seeded vector of L float32
values (four named tensors), so the rounds time aggregation and transport only. Each simulation runs in
its own process (Ray is started per n). Writes docs/secagg-bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))

from bench.secagg_apps import CONFIGS, PLAN_ENV, Plan, flower_secaggplus  # noqa: E402

SERVER_APP, CLIENT_APP = "bench.secagg_apps:server", "bench.secagg_apps:client"
STAGES = {"train": "keys (+ upload held)", "train.secagg_share": "shares", "train.secagg_mask": "mask + upload",
          "train.secagg_unmask": "unmask"}


def simulate(plan: Plan) -> None:
    """One simulation of ``plan.nodes`` nodes running the bench apps (in this process)."""
    from pollinate.proto.run_config import RunConfig
    from pollinate.simulations import engine

    cfg = RunConfig().replace(**{"federation.min-nodes": plan.nodes, "federation.round-timeout": 3600.0})
    with tempfile.TemporaryDirectory() as work:
        plan_path = Path(work) / "plan.json"
        plan_path.write_text(json.dumps(plan.__dict__))
        os.environ[PLAN_ENV] = str(plan_path)
        engine.run(cfg, plan.nodes, Path(work) / "app", cpus_per_client=1.0,
                   server_app=SERVER_APP, client_app=CLIENT_APP)


def run_all(nodes: list[int], lengths: list[int], reps: dict[str, int], results: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1")
    for n in nodes:
        plan = Plan(nodes=n, lengths=lengths, reps=reps, results=str(results))
        print(f"--- {n} nodes: {lengths} values, reps {reps}", flush=True)
        subprocess.run([sys.executable, __file__, "--simulate", json.dumps(plan.__dict__)], env=env, check=True,
                       cwd=ROOT)


# --------------------------------------------------------------------------- the tables

def load(results: Path) -> dict[tuple[int, int, str], list[dict[str, Any]]]:
    rows: dict[tuple[int, int, str], list[dict[str, Any]]] = defaultdict(list)
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row["rep"] >= 0:  # warm-up rounds are not measured
            rows[(row["nodes"], row["length"], row["config"])].append(row)
    return rows


def median(rows: list[dict[str, Any]], fn: Any) -> float:
    return statistics.median(fn(r) for r in rows)


def per_client(rows: list[dict[str, Any]], direction: str) -> float:
    return median(rows, lambda r: sum(e[f"bytes_{direction}"] for e in r["exchanges"]) / r["nodes"])


def mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def main_table(rows: dict[tuple[int, int, str], list[dict[str, Any]]]) -> list[str]:
    header = ("| n | values | reps | pollinate plain | pollinate SecAgg+ | **ratio** | Flower plain | Flower SecAgg+ "
              "| Flower ratio | **pollinate / Flower SecAgg+** | MB up per client (plain / ours / Flower) "
              "| MB down per client (plain / ours / Flower) | max error (ours / Flower) |")
    out = [header, "|" + "---|" * (header.count("|") - 1)]
    for (n, length) in sorted({(n, length) for n, length, _ in rows}):
        r = {c: rows.get((n, length, c), []) for c in CONFIGS}
        if not all(r.values()):
            continue
        t = {c: median(r[c], lambda x: x["seconds"]) for c in CONFIGS}
        err = {c: max(x["max_error"] for x in r[c]) for c in CONFIGS}
        out.append(
            f"| {n} | {length / 1e6:.0f}M | {len(r['pollinate-plain'])} | {t['pollinate-plain']:.2f} s "
            f"| {t['pollinate-secagg']:.2f} s | **{t['pollinate-secagg'] / t['pollinate-plain']:.2f}x** "
            f"| {t['flower-plain']:.2f} s | {t['flower-secagg']:.2f} s "
            f"| {t['flower-secagg'] / t['flower-plain']:.2f}x | **{t['pollinate-secagg'] / t['flower-secagg']:.2f}x** "
            f"| {mb(per_client(r['pollinate-plain'], 'up'))} / {mb(per_client(r['pollinate-secagg'], 'up'))} / "
            f"{mb(per_client(r['flower-secagg'], 'up'))} "
            f"| {mb(per_client(r['pollinate-plain'], 'down'))} / {mb(per_client(r['pollinate-secagg'], 'down'))} / "
            f"{mb(per_client(r['flower-secagg'], 'down'))} "
            f"| {err['pollinate-secagg']:.1e} / {err['flower-secagg']:.1e} |")
    return out


def stage_table(rows: dict[tuple[int, int, str], list[dict[str, Any]]], config: str) -> list[str]:
    """Where one configuration's round time goes: per exchange, wall time and the nodes' own compute."""
    header = ("| n | values | round | server compute | " +
              " | ".join(f"stage {i + 1}: wall / node compute (sum, max)" for i in range(4)) + " |")
    out = [header, "|" + "---|" * (header.count("|") - 1)]
    for (n, length, c), rs in sorted(rows.items()):
        if c != config:
            continue
        total = median(rs, lambda x: x["seconds"])
        server = median(rs, lambda x: x["seconds"] - sum(e["seconds"] for e in x["exchanges"]))
        cells = []
        for i in range(len(rs[0]["exchanges"])):
            wall = median(rs, lambda x: x["exchanges"][i]["seconds"])
            node_sum = median(rs, lambda x: sum(x["exchanges"][i]["node_seconds"]))
            node_max = median(rs, lambda x: max(x["exchanges"][i]["node_seconds"], default=0.0))
            cells.append(f"{wall:.2f} s / {node_sum:.2f} s, {node_max:.2f} s")
        out.append(f"| {n} | {length / 1e6:.0f}M | {total:.2f} s | {server:.2f} s | " + " | ".join(cells) + " |")
    return out


OPTIMISATIONS = [
    "## Two optimisations from this profile", "",
    "1. **Masks without fresh allocations** (`secagg/masks.py`). The first run's stage tables showed stage 3 "
    "(masking) as the nodes' main cost, far above what `bench/secagg_core.py` measures for the same work: each "
    "ChaCha20 mask was a fresh multi-megabyte buffer, plus a fresh buffer of zeros to encrypt, and on this "
    "loaded machine the page faults of those allocations cost about ten times the cipher (measured interleaved "
    "at 1M values: 23 ms vs 1.6 ms per mask). Masks are now the keystream of a shared buffer of zeros encrypted "
    "into one reused per-thread buffer (`update_into`) and added in place; the node's clip count no longer "
    "copies the upload to float64.",
    "2. **Reply polling with backoff** (`server.rounds.send_and_receive`). Flower's `Grid.send_and_receive` "
    "sleeps a fixed 0.1 s (Simulation Engine) or 3 s (deployment gRPC Grid) between polls for replies; "
    "pollinate now pushes and pulls itself, polling after 5 ms and backing off by 1.5x to at most 1 s. It "
    "helps every short exchange (plaintext too) and SecAgg+ four times per round; in a deployment it saves up "
    "to 3 s per exchange. The backoff reaches 1 s after about 4 s, so an exchange longer than that may wait "
    "up to 1 s more than Flower's simulation grid would (0.1 s); a lower cap trades that against SuperLink "
    "load. What remains per exchange in simulation is the Simulation Engine's own node-side "
    "dispatch loop, which checks for new messages every 0.1 s (`vce_api`), and Ray.",
    "",
    "Runs: `secagg-bench-before.jsonl` had neither change, `secagg-bench-after.jsonl` the masks only, this "
    "run both. Each column is a ratio to configurations that ran beside it in its own run, so the runs' "
    "different machine load largely cancels, but not entirely: load was not constant within a run. On the "
    "measured run behind this doc (load average 15-20 on 2 cores; for n = 5 and 10 the repository's own "
    "simulation tests ran beside it) the spread between repetitions is larger than either change's effect, "
    "so these tables do **not** resolve the end-to-end gain; the per-mask gain above is the measured one. "
    "Single rows with 2 repetitions swing widely, e.g. 10 x 4M pollinate / Flower SecAgg+ = 0.57x, 0.43x and "
    "1.45x in the three runs; across all 16 rows of the three runs ours was faster than Flower's in 15.",
    "",
]


def before_after(before: Path, after: Path) -> list[str]:
    """pollinate SecAgg+ before and after an optimisation, each as ratios to what ran beside it."""
    old, new = load(before), load(after)
    header = ("| n | values | SecAgg+ / plain, before | after | pollinate / Flower SecAgg+, before | after "
              "| stage 3 node compute (sum), before | after |")
    out = [header, "|" + "---|" * (header.count("|") - 1)]
    for (n, length) in sorted({(n, length) for n, length, _ in new}):
        cells = []
        for rows in (old, new):
            r = {c: rows.get((n, length, c), []) for c in CONFIGS}
            if not all(r.values()):
                cells.append(None)
                continue
            t = {c: median(r[c], lambda x: x["seconds"]) for c in CONFIGS}
            mask = median(r["pollinate-secagg"], lambda x: sum(x["exchanges"][2]["node_seconds"]))
            cells.append((t["pollinate-secagg"] / t["pollinate-plain"], t["pollinate-secagg"] / t["flower-secagg"],
                          mask))
        if None in cells:
            continue
        (a0, b0, m0), (a1, b1, m1) = cells
        out.append(f"| {n} | {length / 1e6:.0f}M | {a0:.2f}x | {a1:.2f}x | {b0:.2f}x | {b1:.2f}x "
                   f"| {m0:.2f} s | {m1:.2f} s |")
    return out


def render(results: Path, befores: list[Path] = ()) -> str:  # type: ignore[assignment]
    rows = load(results)
    load_avg = os.getloadavg()
    nodes = sorted({n for n, _, _ in rows})
    mapping = [f"n = {n}: num_shares = {flower_secaggplus(n).num_shares}, reconstruction_threshold = "
               f"{flower_secaggplus(n).reconstruction_threshold}" for n in nodes]
    text = [
        "# Secure aggregation: round time and bytes, pollinate vs plaintext vs Flower's SecAgg+",
        "",
        "`python bench/secagg.py` (raw rows of the runs in `docs/secagg-bench-data/`; re-render: `--render "
        "docs/secagg-bench-data/secagg-bench-final.jsonl --before docs/secagg-bench-data/secagg-bench-before.jsonl "
        "docs/secagg-bench-data/secagg-bench-after.jsonl`). One Flower simulation per n (Flower's Simulation "
        "Engine, the one `pollinate simulate` uses; 2 Ray workers of 1 CPU each on a 2-core machine **shared with "
        f"other jobs**: load average {load_avg[0]:.1f} when this table was rendered). No training: each node "
        "answers a train message with a fixed seeded vector of L float32 values in four named tensors and a fixed "
        "example count (50..100), so a round is aggregation + transport only. Per n and L, one untimed warm-up "
        "round of each configuration, then the repetitions, the four configurations interleaved in a rotating "
        "order so that load hits all alike; times are medians, measured in the ServerApp around the round "
        "itself (Ray and node start-up excluded).",
        "",
        "- **pollinate plain**: `RoundExchange.mean` without secagg (GridExchange, validation, `mean_of`); "
        "**pollinate SecAgg+**: the same with `secagg.enabled` (`server.secure.SecureAggregation`, the real "
        "`client.secure` stages). The node is `client.app`'s `_reply` path with training replaced by \"return "
        "this vector\".",
        "- **Flower plain / Flower SecAgg+**: Flower 1.42's legacy `DefaultWorkflow` + `FedAvg` with its default "
        "fit workflow, or with `SecAggPlusWorkflow` and the client mod `secaggplus_mod` (a `NumPyClient` whose "
        "`fit` returns the same vector); timed around the fit workflow only.",
        "- **ratio** = pollinate SecAgg+ / pollinate plain (target <= 1.5x at 10 nodes x 1M); **pollinate / "
        "Flower SecAgg+** < 1 means ours is faster (target).",
        "- **bytes** per client: `proto.message_size.record_bytes` (Flower's `count_bytes` rules) of every record "
        "of every message the server sent (down) or "
        "received (up), summed over the round's exchanges, divided by n; the same count for all configurations "
        "(protobuf framing not included). 'plain' is pollinate's plaintext round.",
        "- **max error**: largest |mean - numpy float64 weighted mean| over coordinates (ours: bound n x step "
        "with step = 2c / (2^24 - 1), stochastic rounding; pollinate plain and Flower plain are exact to float32).",
        "",
        "Parameters matched: pollinate secagg defaults (clip c = 1.0, 2^24 levels, ring 2^32, k = 2 ceil(log2 n) "
        "neighbours capped at n - 1, t = floor(k/2) + 1). Flower: clipping_range = 1.0, quantization_range = "
        "2^24, modulus_range = 2^32, max_weight = 100 (the largest example count), and num_shares = k + 1 "
        "(Flower's neighbourhood counts the node itself, which keeps one of its own shares), "
        "reconstruction_threshold = t: " + "; ".join(mapping) + ". Flower masks with numpy's Mersenne Twister "
        "seeded from 32 bits of the key (pollinate: ChaCha20 keyed by the full 256-bit seed) and uploads int64 "
        "(pollinate: uint32).",
        "",
        *main_table(rows),
        "",
        "## Where the time goes",
        "",
        "pollinate SecAgg+, per exchange (stage 1 = train + public keys, 2 = encrypted shares, 3 = masked "
        "upload, 4 = unmasking shares): wall time of the exchange at the server, and the nodes' own handler "
        "compute inside it (summed over nodes, and the slowest node). With 2 workers, an exchange's wall "
        "time is about node compute sum / 2 plus transport and scheduling. Server compute is the round "
        "time outside the exchanges (encoding requests, routing keys and shares, summing masked vectors, "
        "rebuilding seeds, removing masks, dequantising).",
        "",
        *stage_table(rows, "pollinate-secagg"),
        "",
        "Reading: transport dominates the small exchanges. An exchange whose node compute is a few ms (stage 2, "
        "stage 4) still takes 0.1-0.5 s of wall time: the Simulation Engine hands messages to nodes from a loop "
        "that checks every 0.1 s (`vce_api`), each message is a Ray task, and Flower's own `send_and_receive` "
        "(still used by Flower's workflows) polls for replies every 0.1 s. SecAgg+ needs four exchanges where "
        "plaintext needs one, so its round has a floor of several tenths of a second before any crypto, while "
        "the plaintext round of 10 nodes x 1M values took 0.4-1.7 s across runs: **<= 1.5x is out of reach for a "
        "round without training on this engine**, whatever the crypto costs. The target is meaningful for a "
        "round with local training in it, to which SecAgg+ adds the difference shown here (seconds, not a "
        "factor). Stage 3 (quantise + k + 1 ChaCha20 masks per node, uploading the masked vector) is the only "
        "stage whose compute grows with L, and the largest; stage 1 includes the node's copy of its upload into "
        "its state; the server's own compute (unmasking n self-masks, dequantising) is the rest. Node compute "
        "is wall time inside the handler, so on an overloaded machine it includes time-slicing.",
        "",
        "pollinate plain, for comparison (one exchange):",
        "",
        *stage_table(rows, "pollinate-plain"),
        "",
        "Flower SecAgg+ (its 4 exchanges: setup/keys, share keys, fit + masked vectors, unmask):",
        "",
        *stage_table(rows, "flower-secagg"),
        "",
    ]
    if befores:
        text += OPTIMISATIONS
    for earlier in befores:
        text += [f"Before: `{earlier.name}`; after: this run.", "", *before_after(earlier, results), ""]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per configuration (4M: at least 2)")
    parser.add_argument("--quick", action="store_true", help="5 nodes, 100k values, 1 rep; no doc")
    parser.add_argument("--results", type=Path, default=ROOT / "runs" / "secagg-bench.jsonl")
    parser.add_argument("--render", type=Path, help="only re-render docs/secagg-bench.md from a results file")
    parser.add_argument("--before", type=Path, nargs="*", default=[],
                        help="results of earlier runs to compare with (before/after tables)")
    parser.add_argument("--simulate", help=argparse.SUPPRESS)  # internal: one simulation, plan as JSON
    args = parser.parse_args()
    if args.simulate:
        simulate(Plan(**json.loads(args.simulate)))
        return
    if args.render:
        text = render(args.render, args.before)
        (DOCS / "secagg-bench.md").write_text(text)
        print(text)
        return
    if args.quick:
        args.nodes, args.lengths, args.reps = [5], [100_000], 1
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.unlink(missing_ok=True)
    reps = {str(length): args.reps if length <= 1_000_000 else max(2, args.reps - 1) for length in args.lengths}
    run_all(args.nodes, args.lengths, reps, args.results)
    text = render(args.results, args.before)
    print(text)
    if not args.quick:
        (DOCS / "secagg-bench.md").write_text(text)
        print(f"wrote {DOCS / 'secagg-bench.md'}")


if __name__ == "__main__":
    main()
