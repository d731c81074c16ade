"""The RoLoRA paper's 50-client setting, at our scale: FedIT (fedavg), FFA-LoRA and RoLoRA at rank 4, 50 nodes, a
fifth of them sampled per round.

    OMP_NUM_THREADS=1 nice -n 10 python bench/many_clients.py [--shard 0/2]   # sweep, then the grid
    python bench/many_clients.py --render                                     # re-render from the rows

RoLoRA (Chen et al. 2024, "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA") reports on GLUE
with RoBERTa and 50 clients: FedIT 70.72, FFA-LoRA 76.48, RoLoRA 85.81 (average accuracy). Here: tiny-bert on the
synthetic corpus (bench/federation_runs.py), every run pollinate's real ServerApp loop against its real ClientApp
in this process, scored on the pooled held-out splits of all 50 nodes. A learning-rate sweep per method on a tuning
seed, then 3 seeds at each method's best rate. Raw rows: docs/many-clients-bench-rows.jsonl; docs/many-clients-bench.md
and .json are rendered from them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation_runs import (DOCS, Setting, best_rate, grid_summary, majority_share, read_rows,  # noqa: E402
                             run, study_cli)

ROWS = DOCS / "many-clients-bench-rows.jsonl"
TAG = "fifty-v1"
NODES, RANK, FRACTION, ROUNDS, LOCAL_STEPS, BATCH, ALPHA = 50, 4, 0.2, 30, 5, 16, 1.0
# 200 texts per node: 160 to train on, 40 held out. The split is Dirichlet(1.0): Dirichlet(0.5) over 50 nodes fails
# flwr-datasets' 10-per-node floor for some seeds.
CORPUS = 10000
SEEDS, TUNING_SEED = (0, 1, 2), 100
LRS = (1e-2, 3e-2)  # 3e-3 did not learn in 20 rounds on the 8-node study (docs/strategies-bench.md)
METHODS = ("fedavg", "ffa-lora", "rolora")  # fedavg with LoRA is FedIT (Zhang et al. 2024)
PAPER = {"fedavg": 70.72, "ffa-lora": 76.48, "rolora": 85.81}  # RoLoRA paper, GLUE average, RoBERTa, 50 clients
SETTING = Setting.of(NODES, {"federation.rounds": ROUNDS, "train.local-steps": LOCAL_STEPS, "train.batch-size": BATCH,
                             "train.eval-max-examples": 16, "federation.min-nodes": 2,
                             "federation.fraction-train": FRACTION, "data.partitioning": "dirichlet",
                             "data.dirichlet-alpha": ALPHA, "adapter.r": RANK, "adapter.alpha": 2 * RANK,
                             "train.freeze-head": True, "train.precision": "fp32",  # as the first rows ran
                             "train.group-by-length": False}, corpus_size=CORPUS)


def one(phase: str, method: str, lr: float, seed: int) -> dict:
    row = run(SETTING, seed, {"federation.strategy": method, "train.lr": lr}, curve_every=10)
    return {"setting": TAG, "phase": phase, "strategy": method, "lr": lr, **row}


def plan(rows: list[dict]) -> list[tuple]:
    """The sweep; a method's grid (at its best rate) once its sweep's rows are in. What is not done yet."""
    done = {(r["phase"], r["strategy"], r["lr"], r["seed"]) for r in rows}
    todo = []
    for m in METHODS:
        sweep = [("sweep", m, lr, TUNING_SEED) for lr in LRS]
        if any(k not in done for k in sweep):
            todo += [k for k in sweep if k not in done]
        else:
            todo += [("grid", m, best_rate(rows, m, LRS[1]), s) for s in SEEDS]
    return [k for k in todo if k not in done]


def render(command: str) -> None:
    rows = read_rows(ROWS, TAG)
    summary = grid_summary(rows, ("strategy", "lr"))
    majority = majority_share(SETTING, SEEDS)
    payload = {"setting": {"tag": TAG, "nodes": NODES, "rank": RANK, "fraction_train": FRACTION, "rounds": ROUNDS,
                           "local_steps": LOCAL_STEPS, "batch_size": BATCH, "dirichlet_alpha": ALPHA,
                           "corpus_size": CORPUS, "seeds": SEEDS, "tuning_seed": TUNING_SEED, "lrs": LRS,
                           "model": "tiny-bert", "head": "frozen (train.freeze-head)"},
               "majority_accuracy": majority, "paper": PAPER, "rows": summary,
               "ordering": [r["strategy"] for r in sorted(summary, key=lambda r: r["accuracy_mean"])],
               "paper_ordering": sorted(PAPER, key=PAPER.get),
               "sweep": [{k: r.get(k) for k in ("strategy", "lr", "accuracy", "seed")} for r in rows
                         if r["phase"] == "sweep"]}
    payload["ordering_matches_paper"] = payload["ordering"] == payload["paper_ordering"]
    (DOCS / "many-clients-bench.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    lines = ["# 50 nodes at rank 4: FedIT, FFA-LoRA and RoLoRA\n",
             f"`{command}` (raw rows `docs/many-clients-bench-rows.jsonl`; `--render` re-renders this page and the "
             "JSON from them).\n",
             "## Setting\n",
             f"The RoLoRA paper's 50-client setting, approximated at our scale: {NODES} nodes, LoRA rank {RANK} "
             f"(alpha {2 * RANK}) on query/value of tiny-bert (random init, 2 layers, hidden 64), "
             f"{int(FRACTION * NODES)} nodes ({FRACTION:.0%}) sampled per round, {ROUNDS} rounds of {LOCAL_STEPS} local "
             f"steps (batch {BATCH}), the synthetic corpus ({CORPUS} texts, {CORPUS // NODES} per node) split by "
             f"Dirichlet({ALPHA:g}) over the labels, the classifier head frozen (`train.freeze-head`) for all three. "
             "FedIT is fedavg of both LoRA factors; FFA-LoRA trains B only, A stays at its shared random init; RoLoRA "
             "alternates, B on odd rounds and A on even ones. Score: the last round's global adapter on the pooled "
             f"held-out splits of all {NODES} nodes; **majority class {majority:.3f}**.\n",
             "## Learning-rate sweep (tuning seed 100)\n",
             "| strategy | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | chosen |", "|---|" + "---|" * (len(LRS) + 1)]
    for m in METHODS:
        cells = [next((f"{r['accuracy']:.3f}" for r in rows if r["phase"] == "sweep" and r["strategy"] == m
                       and r["lr"] == lr and "accuracy" in r), "-") for lr in LRS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {best_rate(rows, m, LRS[1]):g} |")
    lines += ["\n## Result (3 seeds)\n", "| strategy | lr | accuracy (mean ± std) | per seed | curve (round: accuracy) "
              "| paper (GLUE avg.) |", "|---|---|---|---|---|---|"]
    for r in sorted(summary, key=lambda r: METHODS.index(r["strategy"])):
        curve = ", ".join(f"{n}: {a:.3f}" for n, a in r["curve"].items())
        lines.append(f"| {r['strategy']} | {r['lr']:g} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                     + ", ".join(f"{a:.3f}" for a in r["accuracies"]) + f" | {curve} | {PAPER[r['strategy']]} |")
    lines += ["", f"Ordering here (lowest to highest mean): {' < '.join(payload['ordering'])}; the paper's: "
              f"{' < '.join(payload['paper_ordering'])}: "
              + ("**the same**." if payload["ordering_matches_paper"] else "**not the same**."), "", *READING]
    (DOCS / "many-clients-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


READING = [
    "## Reading it\n",
    "- **RoLoRA above FFA-LoRA reappears; FedIT last does not.** RoLoRA (0.635 ± 0.131) ends above FFA-LoRA (0.487, "
    "the majority class in all 3 seeds), the paper's central claim: a LoRA whose A is never trained cannot fit at "
    "rank 4, and alternating which factor trains gives A its turn. FedIT (fedavg of both factors) ends first here "
    "(0.749 ± 0.021, every seed above RoLoRA's mean), where the paper has it last (70.72).",
    "- **Why FedIT is not last here.** The paper's argument against FedIT is the inexact mean: mean(B_k) mean(A_k) "
    "is not mean(B_k A_k), and the cross terms grow with client drift over 50 heterogeneous clients. Here 10 sampled "
    "nodes of 200 examples take 5 local steps from the same global adapter, on a Dirichlet(1) split: the factors "
    "move little per round, so the cross terms are small, and training both factors (twice FFA-LoRA's trained values, "
    "every round unlike RoLoRA's alternation) is worth more than exactness. Both frozen-factor methods also pay for "
    "this study's random-init base: the paper fine-tunes a pretrained RoBERTa, whose features a rank-4 B over a random "
    "A can already re-weight; tiny-bert's random features leave FFA-LoRA nothing to re-weight.",
    "- **RoLoRA is seed-sensitive here**: seed 0 stays at the majority class after 30 rounds (0.491) while seeds 1 "
    "and 2 reach 0.746 and 0.668; its curve (0.49 at rounds 10 and 20) shows it learns late, so more rounds would "
    "likely close part of the gap to FedIT. The learning rate was chosen on a tuning seed (100), where RoLoRA scored "
    "best of the three (0.818): the order on one seed is not the order over three.",
    "- **Scale.** 50 nodes of 200 synthetic texts, tiny-bert and 30 rounds are ours, not GLUE with RoBERTa; what "
    "carries over is the mechanism (frozen-factor capacity against mean exactness), not the paper's numbers.",
]


def main() -> None:
    study_cli(plan, one, ROWS, TAG, render, "OMP_NUM_THREADS=1 nice -n 10 python bench/many_clients.py")


if __name__ == "__main__":
    main()
