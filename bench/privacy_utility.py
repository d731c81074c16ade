"""Utility under differential privacy, fedavg vs ffa-lora, and the cost of DP-SGD against plain training.

    python bench/privacy_utility.py [--batch-size B] [--local-steps N] [--rounds R] [--from-db runs/.../bench.db]

Part 1 runs the default scenario (MiniLM-L6 + LoRA r=8, 4 nodes, IID) through the real
``pollinate simulate`` path for each strategy in {fedavg, ffa-lora} and each per-node budget
epsilon in {1, 3, 8, inf} (inf: no DP), with DP-SGD on the nodes (``--dp sample``, clip norm 1,
delta 1e-5, the noise multiplier calibrated from epsilon for the whole run). Part 2 trains the
same adapter for the same steps with plain AdamW and with DP-SGD, each in a fresh process, and
reports the wall time and peak RSS side by side. Writes ``docs/privacy-bench.md``.

The defaults train on as many examples per round as the default scenario (16 x 40), as 10 steps of an
expected batch of 64: at batch 16, DP-SGD's noise per coordinate (z C / batch) drowns the signal at every
epsilon here and no DP run beats the majority class (docs/privacy-bench.md keeps that grid too).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SCENARIO = REPO / "simulations" / "scenarios" / "default.toml"
DOCS = REPO / "docs"
STRATEGIES = ("fedavg", "ffa-lora")
EPSILONS = (1.0, 3.0, 8.0, math.inf)
CLIP_NORM = 1.0


def simulate(strategy: str, epsilon: float, workdir: Path, rounds: int, local_steps: int, eval_examples: int,
             batch_size: int) -> None:
    dp = [] if math.isinf(epsilon) else ["--dp", "sample", "--epsilon", str(epsilon), "--clip-norm", str(CLIP_NORM)]
    cmd = [sys.executable, "-m", "pollinate.cli", "simulate", str(SCENARIO), "--strategy", strategy,
           "--rounds", str(rounds), "--set", f"train.local-steps={local_steps}",
           "--set", f"train.batch-size={batch_size}",
           "--set", f"train.eval-max-examples={eval_examples}", *dp,
           "--db", f"sqlite:///{workdir / 'bench.db'}", "--output", str(workdir / f"{strategy}-{epsilon}")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{strategy} at epsilon {epsilon} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def utility_rows(db: Path) -> list[dict[str, object]]:
    """One row per completed run: strategy, epsilon (budget and spent), z, final eval loss and accuracy."""
    from pollinate.server.report import privacy_json
    from pollinate.server.store import RoundStore

    store = RoundStore(f"sqlite:///{db.resolve()}")
    rows = []
    for run in store.runs():
        if run.status != "completed":
            continue
        rounds = [r for r in store.rounds(run.id) if r.eval_accuracy is not None]
        final = (rounds[-1].eval_loss, rounds[-1].eval_accuracy) if rounds else None
        if final is None:  # a DP run: nodes release no eval metrics (docs/privacy.md), so the bench evaluates
            completed = [r for r in store.rounds(run.id) if r.adapter_sha256 is not None]
            if not completed:
                continue
            rounds = completed
            final = held_out_evaluation(run.config, store.adapter(run.id, completed[-1].number).tensors())
        report = privacy_json(store, run.id)
        dp = report["mode"] != "off"
        z = [e["noise_multiplier"] for e in report["ledger"] if e["status"] == "spent"]
        rows.append({"strategy": run.strategy, "budget": run.config["privacy.target-epsilon"] if dp else math.inf,
                     "spent": report["epsilon"] if dp else math.inf, "z": z[0] if z else 0.0,
                     "rounds": len(rounds), "steps": run.config["train.local-steps"],
                     "batch": run.config["train.batch-size"],
                     "eval_examples": run.config["train.eval-max-examples"],
                     "loss": final[0], "accuracy": final[1],
                     "initial": run.initial_metrics.get("eval-accuracy"),
                     "seconds": sum(r.duration_s for r in store.rounds(run.id)) / max(1, len(rounds))})
    return rows


def held_out_evaluation(config: dict, adapter: dict) -> tuple[float, float]:
    """Eval loss and accuracy of ``adapter`` on every simulated node's eval split, example-weighted.

    What the nodes' federated evaluation computed before DP runs stopped releasing it: the bench holds every
    simulated node's data (a deployment's coordinator does not), so it evaluates the stored adapter itself.
    """
    import torch

    from pollinate.client.data import batches, read_examples, split
    from pollinate.client.train import evaluate
    from pollinate.models import build_peft_model, load_adapter_state
    from pollinate.proto.run_config import RunConfig

    cfg = RunConfig.from_flat(config)
    model, base = build_peft_model(cfg)
    load_adapter_state(model, adapter)
    loss = correct = count = 0.0
    for path in sorted(Path(cfg.data.partition_dir).glob("partition-*.jsonl")):
        _, eval_set = split(read_examples(path, cfg.data, cfg.model), cfg.data.eval_fraction, cfg.seed)
        eval_set = eval_set[: cfg.train.eval_max_examples]
        result = evaluate(model, batches(eval_set, base.tokenizer, cfg.model, 64, seed=None), torch.device("cpu"))
        loss += result.loss * result.num_examples
        correct += result.accuracy * result.num_examples
        count += result.num_examples
    return loss / max(count, 1), correct / max(count, 1)


def overhead_probe(mode: str, steps: int, batch_size: int) -> dict[str, float]:
    """Train the default adapter for ``steps`` steps, plainly or with DP-SGD; time and peak RSS of this process."""
    import torch

    from pollinate.proto.node_config import partition_file
    from pollinate.client.data import endless_batches, poisson_batches, read_examples, split
    from pollinate.client.dp_sgd import train_dp
    from pollinate.client.train import train
    from pollinate.models import build_peft_model
    from pollinate.simulations.cli import write_node_data
    from pollinate.simulations.scenario import load_scenario

    cfg, sim = load_scenario(SCENARIO, {"train.local-steps": steps, "train.batch-size": batch_size})
    cfg, _ = write_node_data(cfg, sim, REPO / "runs" / "bench-privacy-probe")  # node 0's data, as simulated
    train_set, _ = split(read_examples(partition_file(cfg.data.partition_dir, 0), cfg.data, cfg.model),
                         cfg.data.eval_fraction, cfg.seed)
    model, base = build_peft_model(cfg)
    cpu = torch.device("cpu")
    torch.set_num_threads(1)  # both probes on one core: the ratio, not the absolute time, is the result
    started = time.perf_counter()
    if mode == "plain":
        train(model, endless_batches(train_set, base.tokenizer, cfg.model, cfg.train.batch_size, 0), cfg.train, cpu)
    else:
        rate = cfg.train.batch_size / len(train_set)
        train_dp(model, poisson_batches(train_set, base.tokenizer, cfg.model, rate, seed=0), cfg.train, cpu,
                 noise_multiplier=1.0, clip_norm=CLIP_NORM, expected_batch_size=cfg.train.batch_size)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def overhead(steps: int, batch_size: int, repeats: int = 2) -> dict[str, list[dict[str, float]]]:
    """Plain and DP-SGD probes alternated in fresh processes, so both see the same machine load."""
    results: dict[str, list[dict[str, float]]] = {"plain": [], "dp-sgd": []}
    for _ in range(repeats):
        for mode in results:
            done = subprocess.run([sys.executable, __file__, "--probe", mode, "--probe-steps", str(steps),
                                   "--batch-size", str(batch_size)],
                                  capture_output=True, text=True, cwd=REPO, check=True)
            results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def noised_parameters() -> dict[str, int]:
    """How many adapter values DP-SGD clips and noises at each step, per strategy (the trained ones)."""
    from pollinate.models import adapter_state, build_peft_model
    from pollinate.proto.instructions import trained_names
    from pollinate.simulations.scenario import load_scenario

    cfg, _ = load_scenario(SCENARIO)
    state = adapter_state(build_peft_model(cfg)[0])
    return {name: sum(state[k].size for k in trained_names(state, factors))
            for name, factors in (("fedavg", "all"), ("ffa-lora", "B"))}


def _eps(value: float) -> str:
    return "inf (no DP)" if math.isinf(value) else f"{value:g}"


def render(rows: list[dict[str, object]], cost: dict[str, list[dict[str, float]]] | None, command: str) -> None:
    rows = sorted(rows, key=lambda r: (STRATEGIES.index(r["strategy"]) if r["strategy"] in STRATEGIES else 9,
                                       -r["budget"]))
    lines = ["| strategy | epsilon budget (per node) | epsilon spent | noise multiplier z | rounds | final eval loss | "
             "final accuracy | s / round |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {_eps(r['budget'])} | {_eps(r['spent'])} | {r['z']:.3f} | {r['rounds']} | "
              f"{r['loss']:.4f} | {r['accuracy']:.4f} | {r['seconds']:.1f} |" for r in rows]
    text = [f"# Privacy bench: utility under DP-SGD, and its cost\n\n`{command}`\n",
            f"Default scenario (MiniLM-L6 + LoRA r=8 on query/value, 4 nodes, IID Rotten Tomatoes), "
            f"{rows[0]['rounds'] if rows else '?'} rounds of {rows[0]['steps'] if rows else '?'} local steps "
            f"(expected batch {rows[0]['batch'] if rows else '?'}), evaluation on up to {rows[0]['eval_examples'] if rows else '?'} held-out examples per node, "
            f"`--dp sample` (DP-SGD on every node, Poisson sampling q = batch / n, per-example clip norm {CLIP_NORM}, "
            f"delta 1e-5, z calibrated so the whole run spends the budget). Accuracy is the federated evaluation "
            f"after the last round.\n", "\n".join(lines), "",
            "Values DP-SGD clips and noises per step (LoRA factors + classifier head): " + ", ".join(
                f"{name} {count:,}" for name, count in noised_parameters().items()) + ".\n"]
    if cost:
        # The least disturbed run of each (the minimum) estimates the cost best on a shared machine.
        best = {m: {k: min(p[k] for p in ps) for k in ps[0]} for m, ps in cost.items()}
        raw = "; ".join(f"{m}: " + ", ".join(f"{p['seconds']:.1f} s" for p in ps) for m, ps in cost.items())
        text += ["## Cost of DP-SGD against plain training (same adapter, batch and steps, one thread, fresh process "
                 "each)\n",
                 "| training | s (fastest of runs) | peak RSS MiB (lowest) |", "|---|---|---|",
                 *(f"| {m} | {v['seconds']:.2f} | {v['peak_rss_mib']:.0f} |" for m, v in best.items()),
                 f"\nDP-SGD / plain: time x{best['dp-sgd']['seconds'] / best['plain']['seconds']:.2f}, "
                 f"peak memory x{best['dp-sgd']['peak_rss_mib'] / best['plain']['peak_rss_mib']:.2f} "
                 f"(alternated runs: {raw}).\n"]
    DOCS.mkdir(exist_ok=True)
    old = (DOCS / "privacy-bench.md").read_text() if (DOCS / "privacy-bench.md").exists() else ""
    reading = old[old.index("## Reading"):] if "## Reading" in old else ""
    (DOCS / "privacy-bench.md").write_text("\n".join(text) + ("\n" + reading if reading else ""))
    print("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="train.batch-size (DP-SGD's expected batch)")
    parser.add_argument("--eval-examples", type=int, default=256, help="train.eval-max-examples")
    parser.add_argument("--overhead-steps", type=int, default=20)
    parser.add_argument("--from-db", help="re-render from an earlier run's bench.db instead of simulating")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--overhead-only", action="store_true", help="measure the DP-SGD cost, run no simulation")
    parser.add_argument("--epsilons", default="1,3,8,inf", help="per-node budgets to run (inf: no DP)")
    parser.add_argument("--workdir", help="add runs to this earlier bench directory (its bench.db)")
    parser.add_argument("--probe", choices=["plain", "dp-sgd"], help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(overhead_probe(args.probe, args.probe_steps, args.batch_size)))
        return
    command = (f"python bench/privacy_utility.py --rounds {args.rounds} --local-steps {args.local_steps} "
               f"--batch-size {args.batch_size} "
               f"--eval-examples {args.eval_examples} --overhead-steps {args.overhead_steps}")
    if args.from_db:
        saved = Path(args.from_db).parent / "overhead.json"
        render(utility_rows(Path(args.from_db)), json.loads(saved.read_text()) if saved.exists() else None, command)
        return
    workdir = Path(args.workdir) if args.workdir else REPO / "runs" / f"bench-privacy-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    saved = workdir / "overhead.json"
    cost = json.loads(saved.read_text()) if saved.exists() else None
    if cost is None and not args.skip_overhead:
        cost = overhead(args.overhead_steps, args.batch_size)
        saved.write_text(json.dumps(cost))
    if args.overhead_only:
        render(utility_rows(workdir / "bench.db"), cost, command)
        return
    for epsilon in (float(e) for e in args.epsilons.split(",")):  # in the order given: the most telling first
        for strategy in STRATEGIES:
            simulate(strategy, epsilon, workdir, args.rounds, args.local_steps, args.eval_examples, args.batch_size)
            render(utility_rows(workdir / "bench.db"), cost, command)
            print(f"done: {strategy} at epsilon {epsilon} ({workdir})", flush=True)


if __name__ == "__main__":
    main()
