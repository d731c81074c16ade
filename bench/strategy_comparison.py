"""Compare aggregation strategies on the heterogeneous-rank scenario, plus a centralised LoRA baseline.

    python bench/strategy_comparison.py [--quick] [--strategies a,b,...]

Runs ``simulations/scenarios/heterogeneous.toml`` (8 nodes, ranks 4..64, Dirichlet 0.5) once per
strategy through the real ``pollinate simulate`` path, then trains one LoRA (rank 64) centrally
on the pooled training partitions for as many optimiser steps as one node takes in the whole
run. Writes ``docs/strategies-bench.md`` (eval loss, final metric, bytes up/down per node per round,
server time per round) and ``docs/strategies-bench.png`` (loss and accuracy per round).
``--from-db runs/bench-strategies-*/bench.db`` re-renders an earlier run without simulating again.
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

from pollinate.client.data import batches, endless_batches, read_examples, split  # noqa: E402
from pollinate.client.train import evaluate, train  # noqa: E402
from pollinate.models import build_peft_model  # noqa: E402
from pollinate.proto.run_config import RunConfig  # noqa: E402
from pollinate.server.store import RoundStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "simulations" / "scenarios" / "heterogeneous.toml"
DOCS = REPO / "docs"
HETEROGENEOUS = ["hetlora", "flexlora", "flora", "sketch"]


def run_strategy(name: str, workdir: Path, extra: list[str]) -> tuple[RoundStore, int]:
    db = f"sqlite:///{workdir / 'bench.db'}"
    done = subprocess.run([sys.executable, "-m", "pollinate.cli", "simulate", str(SCENARIO), "--strategy", name,
                           "--db", db, "--output", str(workdir / name), *extra], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    store = RoundStore(db)
    return store, store.runs()[-1].id


def centralised(cfg: RunConfig, steps: int) -> tuple[float, float]:
    """(loss, accuracy) of one LoRA trained on the pooled partitions, evaluated on the pooled eval sets."""
    pooled_train, pooled_eval = [], []
    for path in sorted(Path(cfg.data.partition_dir).glob("partition-*.jsonl")):
        tr, ev = split(read_examples(path, cfg.data, cfg.model), cfg.data.eval_fraction, cfg.seed)
        pooled_train += tr
        pooled_eval += ev[: cfg.train.eval_max_examples]
    model, base = build_peft_model(cfg)
    cpu = torch.device("cpu")
    stream = endless_batches(pooled_train, base.tokenizer, cfg.model, cfg.train.batch_size, cfg.seed)
    train(model, stream, dataclasses.replace(cfg.train, local_steps=steps), cpu)
    result = evaluate(model, batches(pooled_eval, base.tokenizer, cfg.model, 64, None), cpu)
    return result.loss, result.accuracy


def summarise(store: RoundStore, run_id: int) -> dict[str, object]:
    """One strategy's row and curves, from the round store."""
    run, rounds = store.run(run_id), store.rounds(run_id)
    per_node_round = len(rounds) * max(1, rounds[0].participants) * 1024
    return {"name": run.strategy, "config": RunConfig.from_flat(run.config),
            "loss": [run.initial_metrics.get("eval-loss")] + [r.eval_loss for r in rounds],
            "accuracy": [run.initial_metrics.get("eval-accuracy")] + [r.eval_accuracy for r in rounds],
            "up": sum(r.bytes_up for r in rounds) / per_node_round,
            "down": sum(r.bytes_down for r in rounds) / per_node_round,
            "seconds": sum(r.duration_s for r in rounds) / len(rounds)}


def render(results: list[dict[str, object]], central: tuple[float, float], command: str) -> None:
    cfg = results[0]["config"]
    steps = cfg.train.local_steps * cfg.federation.rounds
    lines = ["| strategy | eval loss (round 0 -> last) | final accuracy | KiB up / node / round | "
             "KiB down / node / round | s / round |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['loss'][0]:.4f} -> {r['loss'][-1]:.4f} | {r['accuracy'][-1]:.4f} | {r['up']:.1f} | "
              f"{r['down']:.1f} | {r['seconds']:.1f} |" for r in results]
    lines.append(f"| centralised LoRA r={cfg.adapter.r} ({steps} steps, pooled data) | {central[0]:.4f} | "
                 f"{central[1]:.4f} | - | - | - |")
    DOCS.mkdir(exist_ok=True)
    header = (f"# Strategies on the heterogeneous-rank scenario\n\n`{command}`: {SCENARIO.name}, "
              f"{cfg.federation.rounds} rounds of {cfg.train.local_steps} local steps, node ranks 4..64, "
              f"Dirichlet(0.5) split. Bytes include the evaluation exchange's download; s/round is the server's "
              f"wall time per round (training included).\n\n")
    (DOCS / "strategies-bench.md").write_text(header + "\n".join(lines) + "\n\n![per round](strategies-bench.png)\n")
    print("\n".join(lines))
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        loss_ax.plot(r["loss"], marker="o", label=r["name"])
        acc_ax.plot(r["accuracy"], marker="o", label=r["name"])
    for ax, value, label in ((loss_ax, central[0], "federated eval loss"), (acc_ax, central[1], "federated eval accuracy")):
        ax.axhline(value, linestyle="--", color="grey", label="centralised LoRA")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("heterogeneous ranks (4..64), Dirichlet 0.5")
    fig.savefig(DOCS / "strategies-bench.png", dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 rounds of 8 local steps (minutes, not tens)")
    parser.add_argument("--strategies", default=",".join(HETEROGENEOUS))
    parser.add_argument("--from-db", help="re-render the tables of an earlier run's bench.db instead of running")
    args = parser.parse_args()
    if args.from_db:
        store = RoundStore(f"sqlite:///{Path(args.from_db).resolve()}")
        results = [summarise(store, run.id) for run in store.runs() if run.status == "completed"]
    else:
        extra = ["--rounds", "2", "--set", "train.local-steps=8"] if args.quick else []
        workdir = REPO / "runs" / f"bench-strategies-{time.strftime('%Y%m%d-%H%M%S')}"
        workdir.mkdir(parents=True)
        results = []
        for name in args.strategies.split(","):
            store, run_id = run_strategy(name, workdir, extra)
            results.append(summarise(store, run_id))
            print(f"{name}: eval loss {results[-1]['loss'][-1]:.4f}, {results[-1]['seconds']:.1f} s per round",
                  flush=True)
    cfg = results[0]["config"]
    central = centralised(cfg, cfg.train.local_steps * cfg.federation.rounds)
    render(results, central, "python bench/strategy_comparison.py" + (" --quick" if args.quick else ""))


if __name__ == "__main__":
    main()
