"""Heterogeneous-rank aggregation that learns: fedavg at the smallest rank, hetlora, flexlora, flora and sketch on
8 nodes of ranks 4..64, Dirichlet alpha 0.5 and 100, 20 rounds, 3 seeds; centralised LoRA as the upper bound.

    OMP_NUM_THREADS=1 nice -n 10 python bench/strategy_comparison.py [--shard 0/2]   # sweep, then the grid
    python bench/strategy_comparison.py --render                                     # re-render from the rows

Every run is pollinate's real ServerApp loop against its real ClientApp in this process (bench/federation_runs.py),
on tiny-bert and the synthetic corpus, scored on the pooled held-out splits of all 8 nodes. First a learning-rate
sweep per method on a tuning seed (100, not one of the reported seeds) at alpha 0.5, then the grid at each method's
best rate. The classifier head is held at its initial value (``train.freeze-head``, FedBABU): the recipe choice
against the head drift the previous bench diagnosed; an ablation with the head trained is part of the grid.
Raw rows: docs/strategies-bench-rows.jsonl (a rerun skips the rows it has); docs/strategies-bench.json, .md and .png
are rendered from them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation_runs import (DOCS, Setting, best_rate, centralised, grid_summary, majority_share,  # noqa: E402
                             read_rows, run, study_cli)

ROWS = DOCS / "strategies-bench-rows.jsonl"
TAG = "hetero-v1"  # in every row: rows of another setting are never averaged with these
NODES, MAX_RANKS, GLOBAL_RANK = 8, (4, 4, 8, 8, 16, 16, 32, 64), 64
ROUNDS, LOCAL_STEPS, BATCH = 20, 10, 16
ALPHAS = (0.5, 100.0)
SEEDS, TUNING_SEED = (0, 1, 2), 100
LRS = (3e-3, 1e-2, 3e-2)
METHODS = ("fedavg-r4", "hetlora", "flexlora", "flora", "sketch")  # fedavg-r4: every node at the smallest rank
ABLATION = ("flexlora",)  # also run with the classifier head trained (train.freeze-head = false), at alpha 0.5
CENTRAL = "centralised"
BASE = {"federation.rounds": ROUNDS, "train.local-steps": LOCAL_STEPS, "train.batch-size": BATCH,
        "train.eval-max-examples": 16, "federation.min-nodes": 2, "data.partitioning": "dirichlet",
        "train.freeze-head": True, "adapter.alpha": GLOBAL_RANK, "adapter.r": GLOBAL_RANK,
        # as when the first rows ran (before bf16 autocast and length grouping became defaults): one setting throughout
        "train.precision": "fp32", "train.group-by-length": False}


def setting(method: str, alpha: float) -> Setting:
    """The federation of one method: the heterogeneous ranks, or (fedavg-r4) every node at rank 4."""
    if method == "fedavg-r4":
        return Setting.of(NODES, {**BASE, "data.dirichlet-alpha": alpha, "adapter.r": MAX_RANKS[0],
                                  "adapter.alpha": MAX_RANKS[0], "federation.strategy": "fedavg"})
    return Setting.of(NODES, {**BASE, "data.dirichlet-alpha": alpha, "federation.strategy": method},
                      max_ranks=MAX_RANKS)


def key(row: dict) -> tuple:
    return row["phase"], row["strategy"], row["alpha"], row["lr"], row["head"], row["seed"]


def one(phase: str, method: str, alpha: float, lr: float, head: str, seed: int) -> dict:
    """One row: a federation, or (centralised) one adapter on the pooled data for the federation's total steps."""
    more = {"train.lr": lr, "train.freeze-head": head == "frozen"}
    if method == CENTRAL:
        row = centralised(setting("flexlora", alpha), seed, NODES * LOCAL_STEPS * ROUNDS, more)
    else:
        row = run(setting(method, alpha), seed, more, curve_every=5)
    return {"setting": TAG, "phase": phase, "strategy": method, "alpha": alpha, "lr": lr, "head": head, **row}


def best_lr(rows: list[dict], method: str) -> float:
    """The method's rate with the best final accuracy on the tuning seed (alpha 0.5); the middle one before."""
    return best_rate(rows, method, LRS[1])


def plan(rows: list[dict]) -> list[tuple]:
    """The sweep; a method's grid (at its best rate) once its sweep's rows are in. What is not done yet."""
    done = {key(r) for r in rows}
    todo = []
    for m in (*METHODS, CENTRAL):
        sweep = [("sweep", m, 0.5, lr, "frozen", TUNING_SEED) for lr in LRS]
        if any(k not in done for k in sweep):
            todo += [k for k in sweep if k not in done]
            continue
        todo += [("grid", m, a, best_lr(rows, m), "frozen", s) for a in ALPHAS for s in SEEDS]
        if m in ABLATION:
            todo += [("grid", m, 0.5, best_lr(rows, m), "trained", s) for s in SEEDS]
    return [k for k in todo if k not in done]


def render(command: str) -> None:
    rows = read_rows(ROWS, TAG)
    summary = grid_summary(rows, ("strategy", "alpha", "head", "lr"))
    majority = {a: majority_share(setting("flexlora", a), SEEDS) for a in ALPHAS}
    payload = {"setting": {"tag": TAG, "nodes": NODES, "max_ranks": MAX_RANKS, "global_rank": GLOBAL_RANK,
                           "rounds": ROUNDS, "local_steps": LOCAL_STEPS, "batch_size": BATCH, "alphas": ALPHAS,
                           "seeds": SEEDS, "tuning_seed": TUNING_SEED, "lrs": LRS, "model": "tiny-bert",
                           "data": "synthetic (bench/synthetic_corpus.py), 3200 rows"},
               "majority_accuracy": sum(majority.values()) / len(majority), "majority_accuracy_by_alpha": majority,
               "rows": summary,
               "sweep": [{k: r.get(k) for k in ("strategy", "lr", "accuracy", "seed")} for r in rows
                         if r["phase"] == "sweep"]}
    (DOCS / "strategies-bench.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    lines = ["# Heterogeneous-rank aggregation that learns\n",
             f"`{command}` (raw rows `docs/strategies-bench-rows.jsonl`; `--render` re-renders this page, the JSON and "
             "the plot from them).\n",
             *SETTING_TEXT, "## Learning-rate sweep (tuning seed 100, alpha 0.5, head frozen)\n",
             "| strategy | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | chosen |", "|---|" + "---|" * (len(LRS) + 1)]
    for m in (*METHODS, CENTRAL):
        cells = []
        for lr in LRS:
            found = [r for r in rows if r["phase"] == "sweep" and r["strategy"] == m and r["lr"] == lr and "accuracy" in r]
            cells.append(f"{found[0]['accuracy']:.3f}" if found else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {best_lr(rows, m):g} |")
    for alpha in ALPHAS:
        lines += [f"\n## Dirichlet alpha = {alpha:g} (majority class {majority[alpha]:.3f})\n",
                  "| strategy | head | lr | accuracy (mean ± std, 3 seeds) | per seed | over majority (points) |",
                  "|---|---|---|---|---|---|"]
        for r in sorted((r for r in summary if r["alpha"] == alpha),
                        key=lambda r: ((*METHODS, CENTRAL).index(r["strategy"]), r["head"])):
            seeds = ", ".join(f"{a:.3f}" for a in r["accuracies"])
            lines.append(f"| {r['strategy']} | {r['head']} | {r['lr']:g} | {r['accuracy_mean']:.3f} ± "
                         f"{r['accuracy_std']:.3f} | {seeds} | {100 * (r['accuracy_mean'] - majority[alpha]):+.1f} |"
                         + (" crashed" if r["crashed"] else ""))
    lines += ["\n![accuracy per round, mean over seeds](strategies-bench.png)\n", *target_lines(summary, majority),
              *READING]
    (DOCS / "strategies-bench.md").write_text("\n".join(lines) + "\n")
    plot(summary)
    print("\n".join(lines))


def target_lines(summary: list[dict], majority: dict[float, float]) -> list[str]:
    """The issue's target, read from the numbers: every heterogeneous method clearly above the majority class."""
    lines = ["## Target: every heterogeneous-rank method clearly above the majority class, over 3 seeds\n"]
    for r in summary:
        if r["strategy"] in METHODS[1:] and r["head"] == "frozen":
            margin = r["accuracy_mean"] - majority[r["alpha"]]
            clear = margin > 0.05 and min(r["accuracies"], default=0) > majority[r["alpha"]] and len(r["seeds"]) >= 3
            lines.append(f"- {r['strategy']}, alpha {r['alpha']:g}: {r['accuracy_mean']:.3f} vs majority "
                         f"{majority[r['alpha']]:.3f} ({100 * margin:+.1f} points, lowest seed "
                         f"{min(r['accuracies'], default=math.nan):.3f}, {len(r['seeds'])} seeds): "
                         + ("met" if clear else "**not met**"))
    return lines + [""]


def plot(summary: list[dict]) -> None:
    colour = {m: f"C{i}" for i, m in enumerate(METHODS)}  # one colour per method in both panels
    fig, axes = plt.subplots(1, len(ALPHAS), figsize=(11, 4), sharey=True)
    for ax, alpha in zip(axes, ALPHAS, strict=True):
        for r in summary:
            if r["alpha"] == alpha and r["curve"]:
                rounds = sorted(r["curve"])
                style = "--" if r["head"] == "trained" else "-"
                ax.plot(rounds, [r["curve"][n] for n in rounds], style, marker="o", color=colour[r["strategy"]],
                        label=f"{r['strategy']}" + (" (head trained)" if r["head"] == "trained" else ""))
            if r["alpha"] == alpha and r["strategy"] == CENTRAL:
                ax.axhline(r["accuracy_mean"], color="grey", linestyle=":", label="centralised LoRA")
        ax.set_title(f"Dirichlet alpha = {alpha:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("pooled held-out accuracy")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.savefig(DOCS / "strategies-bench.png", dpi=110, bbox_inches="tight")


SETTING_TEXT = [
    "## Setting\n",
    f"{NODES} nodes of LoRA capacity {', '.join(map(str, MAX_RANKS))} (global rank {GLOBAL_RANK}, alpha = rank), "
    f"tiny-bert (random init, 2 layers, hidden 64; LoRA on query/value), the synthetic sentiment-like corpus "
    "(bench/synthetic_corpus.py: 3200 texts, 10% label noise, so ~0.9 is the ceiling) split by Dirichlet(alpha) over "
    f"the labels, {ROUNDS} rounds of {LOCAL_STEPS} local AdamW steps (batch {BATCH}). **fedavg-r4** is what a "
    "federation can do without heterogeneous-rank aggregation: every node at the smallest rank (4). **centralised** "
    f"trains one rank-{GLOBAL_RANK} adapter on the pooled training splits for the federation's total steps "
    f"({NODES} x {LOCAL_STEPS} x {ROUNDS}). Score: the last round's global adapter on the pooled held-out splits of all "
    "nodes (the same set for every method). Every run is pollinate's ServerApp loop against its ClientApp, in-process.\n",
    "**The head.** The classifier head is held at the global adapter's initial head (`train.freeze-head = true`, "
    "FedBABU, Oh et al. 2022); only the LoRA layers train and aggregate. The last bench showed why: under label skew "
    "each node's head moves toward its own classes, the averaged head flips between them from round to round, and "
    "every heterogeneous-rank method ended at the majority class. The rows with head `trained` are that ablation.\n",
]

READING = [  # written by hand from the rows above; kept beside the code that renders them
    "## Reading it\n",
    "- **Near-IID (alpha 100): every heterogeneous-rank method learns**, 27-32 points above the majority class on "
    "every seed, and the papers' ordering reappears: the exact aggregations, sketch (0.843 ± 0.007) and flora "
    "(stacking, 0.841 ± 0.007), are above flexlora (SVD redistribution, 0.814 ± 0.017), which is above hetlora "
    "(zero-padding, 0.793 ± 0.023). The gaps between the exact pair and hetlora (5 points) are more than twice the "
    "seeds' std; flexlora against hetlora (2 points) is about one std. sketch and flora compute the same exact sum "
    "(sketch from two summed uploads, so it also works under secure aggregation and central DP); they tie, as they "
    "should. The exact methods end 2.5 points under centralised LoRA on the pooled data (0.866).",
    "- **Why the ordering.** Zero-padding averages each rank slot across nodes as if the slots meant the same "
    "direction, so B_k A_k products of different nodes interfere (the HetLoRA/FlexLoRA argument); SVD "
    "redistribution first sums the products exactly, then truncates the sum to each node's rank, losing what is "
    "past it; stacking keeps all of it (merged into the base). fedavg at the smallest rank (every node at r = 4, "
    "0.837 ± 0.020) is as good as the exact methods here: the synthetic task needs little rank, so what this bench "
    "shows is that heterogeneous-rank aggregation costs nothing when exact, and costs 2-4 points when not.",
    "- **Strong label skew (alpha 0.5): the target is not met.** With 2 classes and 8 nodes, Dirichlet(0.5) gives "
    "splits in which most nodes hold one class (seed 1: nodes of 90%, 100%, 0%, 2% and 3% class 1 hold 76% of the "
    "data). Every federated method, fedavg included, stays at the majority class for most of the 20 rounds on "
    "such a split; some seeds break out late (sketch's seed 0: 0.732; flora's seed 2: 0.709), seed 1 never does, "
    "for any method. The means keep the same order (sketch 0.611 > flora 0.592 > flexlora 0.549 > hetlora 0.511) "
    "but the seeds' std (~0.11) is larger than the gaps, so at alpha 0.5 this bench ranks nothing. Centralised LoRA "
    "on the same pooled data reaches 0.879: the gap is client drift under label skew, not the rank aggregation.",
    "- **The head.** Holding the classifier head at its initial value (`train.freeze-head`, FedBABU) is the choice "
    "against the head drift the previous bench diagnosed: flexlora at alpha 0.5 ends at 0.549 ± 0.106 with the head "
    "frozen and 0.494 ± 0.017 with it trained (every seed at or below the majority class). It does not fix the "
    "alpha 0.5 collapse: with the head fixed, the drift moves into the LoRA layers (each node's features move "
    "towards its own class). Logit adjustment (each node training on logits + log of its label prior, FedLC) was "
    "tried on seed 1 and did not lift it (flexlora and fedavg-r4 both 0.498), so it was not kept. What would: more "
    "rounds with a decaying rate, a server optimiser, or a drift correction such as SCAFFOLD's control variates; "
    "none is a strategy option for heterogeneous ranks yet.",
    "- **Learning rates** were chosen on a tuning seed (100) at alpha 0.5 and used at both alphas; the scale "
    "alpha / r = 64 / r makes a rank-4 node's factors 16x as strong as a rank-64 node's, which is why the "
    "heterogeneous methods (except hetlora) prefer 3e-3-1e-2 while fedavg-r4 (alpha = r) needs 1e-2.",
]


def main() -> None:
    study_cli(plan, one, ROWS, TAG, render, "OMP_NUM_THREADS=1 nice -n 10 python bench/strategy_comparison.py")


if __name__ == "__main__":
    main()
