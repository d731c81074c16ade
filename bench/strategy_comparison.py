"""Compare aggregation strategies on the heterogeneous-rank scenario, plus a centralised LoRA baseline.

    python bench/strategy_comparison.py [--quick] [--strategies a,b,...]

Runs ``simulations/scenarios/heterogeneous.toml`` (8 nodes, ranks 4..64, Dirichlet 0.5) once per
strategy through the real ``pollinate simulate`` path, then trains one LoRA (rank 64) centrally
on the pooled training partitions for as many optimiser steps as one node takes in the whole
run. Writes ``docs/strategies-bench.md`` (final metric, bytes up/down per node per round, server
time per round) and ``docs/strategies-bench.png`` (accuracy per round).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from client.data import batches, endless_batches, read_examples, split  # noqa: E402
from client.train import evaluate, train  # noqa: E402
from models import build_peft_model  # noqa: E402
from proto.run_config import RunConfig  # noqa: E402
from server.store import RoundStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "simulations" / "scenarios" / "heterogeneous.toml"
DOCS = REPO / "docs"
HETEROGENEOUS = ["hetlora", "flexlora", "flora", "sketch"]


def run_strategy(name: str, workdir: Path, extra: list[str]) -> tuple[RoundStore, int, float]:
    db = f"sqlite:///{workdir / 'bench.db'}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pollinate.cli", "simulate", str(SCENARIO), "--strategy", name,
                           "--db", db, "--output", str(workdir / name), *extra], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    store = RoundStore(db)
    return store, store.runs()[-1].id, time.monotonic() - started


def centralised(cfg: RunConfig, steps: int) -> float:
    """Accuracy of one LoRA trained on the pooled partitions, evaluated on the pooled eval sets."""
    pooled_train, pooled_eval = [], []
    for path in sorted(Path(cfg.data.partition_dir).glob("partition-*.jsonl")):
        tr, ev = split(read_examples(path, cfg.data, cfg.model), cfg.data.eval_fraction, cfg.seed)
        pooled_train += tr
        pooled_eval += ev[: cfg.train.eval_max_examples]
    model, base = build_peft_model(cfg)
    cpu = torch.device("cpu")
    stream = endless_batches(pooled_train, base.tokenizer, cfg.model, cfg.train.batch_size, cfg.seed)
    train(model, stream, dataclasses.replace(cfg.train, local_steps=steps), cpu)
    return evaluate(model, batches(pooled_eval, base.tokenizer, cfg.model, 64, None), cpu).accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 rounds of 8 local steps (minutes, not tens)")
    parser.add_argument("--strategies", default=",".join(HETEROGENEOUS))
    args = parser.parse_args()
    extra = ["--rounds", "2", "--set", "train.local-steps=8"] if args.quick else []
    workdir = REPO / "runs" / f"bench-strategies-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True)
    rows, curves = [], {}
    cfg = None
    for name in args.strategies.split(","):
        store, run_id, wall = run_strategy(name, workdir, extra)
        rounds = store.rounds(run_id)
        run = store.run(run_id)
        cfg = RunConfig.from_flat(run.config)
        curves[name] = [run.initial_metrics.get("eval-accuracy")] + [r.eval_accuracy for r in rounds]
        rows.append((name, rounds[-1].eval_accuracy,
                     sum(r.bytes_up for r in rounds) / len(rounds) / max(1, rounds[0].participants) / 1024,
                     sum(r.bytes_down for r in rounds) / len(rounds) / max(1, rounds[0].participants) / 1024,
                     sum(r.duration_s for r in rounds) / len(rounds), wall))
        print(f"{name}: final accuracy {rows[-1][1]:.4f}, {rows[-1][4]:.1f} s per round", flush=True)
    assert cfg is not None
    steps = cfg.train.local_steps * cfg.federation.rounds
    central = centralised(cfg, steps)
    lines = ["| strategy | final accuracy | KiB up / node / round | KiB down / node / round | s / round | wall s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {a:.4f} | {u:.1f} | {d:.1f} | {s:.1f} | {w:.0f} |" for n, a, u, d, s, w in rows]
    lines.append(f"| centralised LoRA r={cfg.adapter.r} ({steps} steps, pooled data) | {central:.4f} | - | - | - | - |")
    DOCS.mkdir(exist_ok=True)
    header = (f"# Strategies on the heterogeneous-rank scenario\n\n`python bench/strategy_comparison.py"
              f"{' --quick' if args.quick else ''}`: {SCENARIO.name}, {cfg.federation.rounds} rounds of "
              f"{cfg.train.local_steps} local steps, node ranks 4..64, Dirichlet(0.5) split. Bytes include the "
              f"evaluation exchange's download; s/round is the server's wall time per round (training included).\n\n")
    (DOCS / "strategies-bench.md").write_text(header + "\n".join(lines) + "\n\n![accuracy per round](strategies-bench.png)\n")
    print("\n".join(lines))
    for name, curve in curves.items():
        plt.plot(range(len(curve)), curve, marker="o", label=name)
    plt.axhline(central, linestyle="--", color="grey", label="centralised LoRA")
    plt.xlabel("round")
    plt.ylabel("federated eval accuracy")
    plt.legend()
    plt.title("heterogeneous ranks (4..64), Dirichlet 0.5")
    plt.savefig(DOCS / "strategies-bench.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
