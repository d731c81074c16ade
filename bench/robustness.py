"""Attacks against defences: final accuracy of 8-node federations with 1 or 2 adversarial nodes, 3 seeds.

    nice -n 10 python bench/robustness.py [--seeds 0,1,2] [--adversaries 0,1,2] [--shard 0/2]
    python bench/robustness.py --render          # re-render docs/ from the raw rows only

Every run is pollinate's real ServerApp loop (``server.app.run_federation``) against its real ClientApp, in this
process (``simulations/inprocess.py``, no Ray), on tiny-bert and a synthetic, seeded sentiment-like corpus
(bench/synthetic_corpus.py: tiny-bert learns it, which it does not the real reviews in a few rounds). The adversaries
(bench/robustness_attacks.py) edit their train replies, or, for label flipping, their own data. Each run's final
global adapter is then evaluated here on the pooled held-out splits of all 8 nodes with their TRUE labels, so no
node's own (possibly flipped) evaluation enters the score. One raw row per run is appended to
docs/robustness-bench-rows-synthetic.jsonl as soon as it finishes (a partial run is kept, and a rerun skips the
rows it has; ``--shard i/n`` runs every n-th row of the plan, so n processes share one rows file);
docs/robustness-bench.json and .md are rendered from those rows. The first pass's rows (the real corpus, a setting
that did not learn) stay in docs/robustness-bench-rows.jsonl and are not rendered.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation_runs import TINY, Setting, majority_share as pooled_majority, run, shard  # noqa: E402
from robustness_attacks import ATTACKS, attacker_app, flip_labels  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ROWS = DOCS / "robustness-bench-rows-synthetic.jsonl"
SETTING_TAG = "synthetic-v2"  # in every row: rows of another setting are never averaged with these
NODES = 8
# The setting: small enough for ~200 runs on a shared 2-core machine in ~35 minutes, long enough to learn.
SETTING = {"model.name": "tiny-bert", "federation.rounds": 6, "train.local-steps": 20, "train.lr": 1e-2,
           "train.batch-size": 16, "train.eval-max-examples": 16, "federation.min-nodes": 2}
# Each column is one defence alone; "default" is the shipped config (capped weights + update-bound 3, median mode).
DEFENCES: dict[str, dict[str, object]] = {
    "none": {"federation.weighting": "examples", "federation.update-bound": 0.0},  # plain FedAvg: n_k / n
    "capped only": {"federation.update-bound": 0.0},  # the old default: capped weights, no update bound
    "default": {},  # the new default: capped weights and update-bound = 3 x the round's median norm
    "trimmed mean": {"federation.strategy": "trimmed-mean", "federation.update-bound": 0.0},  # trim 0.2: 2 of 8
    "multi-krum": {"federation.strategy": "multi-krum", "strategy.multi-krum.f": 2, "federation.update-bound": 0.0},
}
DEFAULT = "default"
SETTING_RUNS = Setting.of(NODES, SETTING, scenario=TINY)  # tiny-bert, LoRA r=4 on query/value


def run_one(attack: str, adversaries: int, defence: str, seed: int) -> dict[str, object]:
    """One federation; its raw row (accuracy on the honest pooled eval set, whether it crashed, rejections)."""
    hostile = set(range(adversaries))
    flip = (lambda partitions: flip_labels(partitions, hostile)) if attack == "label-flip" else None
    row = run(SETTING_RUNS, seed, DEFENCES[defence], app=attacker_app(attack, hostile, seed), prepare=flip)
    return {"setting": SETTING_TAG, "attack": attack, "adversaries": adversaries, "defence": defence, **row}


def done_keys() -> set[tuple]:
    if not ROWS.exists():
        return set()
    return {(r["attack"], r["adversaries"], r["defence"], r["seed"]) for r in map(json.loads, ROWS.read_text().splitlines())
            if r.get("setting") == SETTING_TAG}


def plan(seeds: list[int], adversary_counts: list[int]) -> list[tuple[str, int, str, int]]:
    """The target's rows first (the default config, clean and attacked), then the other defences; 1 adversary
    before 2. A partial run (a busy machine) so holds the rows that decide the target."""
    order = [DEFAULT, "none", *[d for d in DEFENCES if d not in (DEFAULT, "none")]]
    runs = []
    for defence in order:
        runs += [("clean", 0, defence, s) for s in seeds] if 0 in adversary_counts else []
        runs += [(a, n, defence, s) for n in adversary_counts if n for s in seeds for a in ATTACKS]
    return sorted(runs, key=lambda r: (r[1] > 1, order.index(r[2])))  # stable: 1 adversary before 2


def summarise(raw: list[dict], majority: float) -> list[dict]:
    """One row per (attack, adversaries, defence): mean and std over seeds, beside the same defence's clean mean."""
    def stats(values: list[float]) -> tuple[float, float]:
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    clean = {d: stats([r["accuracy"] for r in raw if r["attack"] == "clean" and r["defence"] == d and "accuracy" in r])
             for d in DEFENCES}
    setting = {"tag": SETTING_TAG, "data.dataset": "synthetic (bench/synthetic_corpus.py)", **SETTING}
    out = []
    keys = dict.fromkeys((r["attack"], r["adversaries"], r["defence"]) for r in raw)
    for attack, n, defence in keys:
        group = [r for r in raw if (r["attack"], r["adversaries"], r["defence"]) == (attack, n, defence)]
        mean, std = stats([r["accuracy"] for r in group if "accuracy" in r])
        loss_mean, loss_std = stats([r["loss"] for r in group if "loss" in r])
        out.append({"attack": attack, "adversaries": n, "nodes": NODES, "defence": defence,
                    "accuracy_mean": mean, "accuracy_std": std, "clean_accuracy_mean": clean[defence][0],
                    "clean_accuracy_std": clean[defence][1], "drop_points": 100 * (clean[defence][0] - mean),
                    "majority_accuracy": majority, "crashed": any(r["crashed"] for r in group),
                    "seeds": sorted(r["seed"] for r in group), "accuracies": [r.get("accuracy") for r in
                                                                              sorted(group, key=lambda r: r["seed"])],
                    "loss_mean": loss_mean, "loss_std": loss_std,
                    "rejected_updates": sum(r.get("rejected", 0) for r in group), "setting": setting})
    return out


def render(command: str) -> None:
    raw = [r for r in map(json.loads, ROWS.read_text().splitlines()) if r.get("setting") == SETTING_TAG]
    majority = majority_share()
    rows = summarise(raw, majority)
    (DOCS / "robustness-bench.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    clean_default = next((r for r in rows if r["attack"] == "clean" and r["defence"] == DEFAULT), None)
    lines = [f"# Robustness bench: one or two hostile nodes of {NODES}\n",
             f"`{command}` (about 35 minutes on 2 cores; one process without `--shard` runs every row and renders; "
             f"raw rows: `{ROWS.relative_to(REPO)}`, `--render` re-renders from them; a rerun skips the rows it has)."
             "\n",
             "## Setting (synthetic data, on purpose)\n",
             f"{NODES} nodes, each an IID share of a **synthetic** sentiment-like corpus generated, seeded, inside the "
             "bench (`bench/synthetic_corpus.py`): 3200 texts of 8-12 words, each with 3-5 words of its class' "
             "vocabulary (20 positive words, 20 negative), with probability 0.3 one word of the other class, the rest "
             "neutral filler words, shuffled; then 10% of the labels flipped (label noise, so ~0.9 is the ceiling). "
             "Why synthetic: this bench measures the aggregation rule, not the model. The first pass used the real "
             "Rotten Tomatoes reviews, on which tiny-bert (random init, 2 layers, hidden 64) with LoRA does not learn "
             "in a few rounds (clean 0.577 against a majority class of 0.571), so no attack could lower the accuracy "
             "and \"within 2 points of clean\" meant nothing. Those rows are kept, not rendered, in "
             "`docs/robustness-bench-rows.jsonl`.\n",
             f"Model: tiny-bert with LoRA r=4 (alpha 8) on query/value and the classifier head; "
             f"{SETTING['federation.rounds']} rounds of {SETTING['train.local-steps']} local steps (batch "
             f"{SETTING['train.batch-size']}, lr {SETTING['train.lr']}). Every run is pollinate's real ServerApp loop "
             "against its real ClientApp in one process (`simulations/inprocess.py`). Accuracy is the final global "
             f"adapter's on the pooled held-out splits of all {NODES} nodes with their true labels (a label-flipping "
             f"node's own evaluation never enters it); **majority class: {majority:.3f}**"
             + (f"; **clean (default config): {clean_default['accuracy_mean']:.3f}**" if clean_default else "")
             + ". Cells: mean ± std over seeds (change against the same defence's clean run, in points).\n",
             "Attacks (`bench/robustness_attacks.py`): scaled-x100 (the node's factor update ×100), sign-flip (its "
             "update reversed), gaussian-noise (N(0, 1) added to every uploaded entry), weight-inflation (2^31 - 1 "
             "examples, the most the reply schema accepts, declared at the query exchange and reported in training, "
             "and every lora_B entry = 5: the issue's dominating node), nan (every entry NaN), label-flip (the node's "
             "own labels inverted; it trains honestly on them).\n",
             "Defences, each column one defence alone: **none** (`federation.weighting = \"examples\"`, "
             "`federation.update-bound = 0`, fedavg), **capped only** (`weighting = \"capped\"`, `update-bound = 0`: "
             "the old default), **default** (the shipped config: capped weights + `update-bound = 3`, median mode), "
             "**trimmed mean** (`federation.strategy = \"trimmed-mean\"`, trim 0.2, no update bound), **multi-krum** "
             "(`strategy.multi-krum.f = 2`, no update bound).\n"]
    crashed = [r for r in raw if r["crashed"]]
    lines.append(f"Runs: {len(raw)}; crashed: {len(crashed)}"
                 + ("" if not crashed else " (" + "; ".join(f"{r['attack']}/{r['defence']}/seed {r['seed']}: "
                                                           f"{r['status']}" for r in crashed[:5]) + ")") + ".\n")
    missing = [f"{a} x{n} / {d}" for a, n, d in dict.fromkeys(k[:3] for k in plan([0, 1, 2], [0, 1, 2]))
               if len(next((r["seeds"] for r in rows if (r["attack"], r["adversaries"], r["defence"]) == (a, n, d)),
                           [])) < 3]
    if missing:
        lines.append(f"**Cells with fewer than 3 seeds** (not reached in the time given): {', '.join(missing)}.\n")
    for n in sorted({r["adversaries"] for r in rows}):
        title = "Clean runs (no adversary)" if n == 0 else f"{n} adversarial node{'s' if n > 1 else ''} of {NODES}"
        lines += [f"\n## {title}\n", "| attack | " + " | ".join(DEFENCES) + " |", "|---|" + "---|" * len(DEFENCES)]
        for attack in [a for a in ("clean", *ATTACKS) if any(r["attack"] == a for r in rows if r["adversaries"] == n)]:
            cells = []
            for defence in DEFENCES:
                found = [r for r in rows if (r["attack"], r["adversaries"], r["defence"]) == (attack, n, defence)]
                if not found:
                    cells.append("-")
                    continue
                r = found[0]
                cell = f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}"
                if n:
                    cell += f" ({-r['drop_points']:+.1f})"
                if len(r["seeds"]) < 3:
                    cell += f" [{len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''}]"
                cells.append(cell + (" **crashed**" if r["crashed"] else ""))
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines += [f"\n## The target: 1 of {NODES} adversarial, default config, within 2 points of clean, no crash\n"]
    for r in sorted(rows, key=lambda r: ATTACKS.index(r["attack"]) if r["attack"] in ATTACKS else -1):
        if r["adversaries"] == 1 and r["defence"] == DEFAULT:
            met = r["drop_points"] <= 2 and not r["crashed"]
            per_seed = ", ".join(f"{a:.3f}" for a in r["accuracies"] if a is not None)
            lines.append(f"- {r['attack']}: {r['accuracy_mean']:.3f} vs clean {r['clean_accuracy_mean']:.3f} "
                         f"({-r['drop_points']:+.1f} points; seeds {per_seed}; {r['rejected_updates']} updates "
                         f"rejected over the seeds): {'met' if met else '**missed**'}")
    lines += ["", *NOTES]
    (DOCS / "robustness-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# Read after the numbers: what they show and why (written by hand from the rows, kept beside the code that renders).
NOTES = ["## Reading it\n",
         "- A crash is a run that did not complete (`crashed` in the JSON; the count is above). A rejected update "
         "(NaN, anything outside the reply schema, an update above the bound) is not a crash: it is in the run's "
         "ledger with its reason, and the round goes on with the others. `rejected` counts those over all rounds "
         "and seeds of a cell (18 = the adversary rejected in all 6 rounds of all 3 seeds).",
         "- Capped weights alone (the old default) do not stop a large update: scaled-x100 and weight-inflation "
         "push the model to the majority class (~0.50, -31 to -33 points) as they do with no defence. The cap only "
         "bounds a node's weight (at most its declared count, at most half a round); ×100 on 1/8 of the weight "
         "is still ×12 an honest update. The update bound (default) rejects those updates in every round "
         "(18 of 18), and the default ends within 0.4 points of clean on them.",
         "- Sign-flip is the closest to the target (-1.9 points on the means; per seed against the same seed's "
         "clean run: -1.7, -2.2, -1.7). It is invisible to any norm bound: a reversed update has exactly the honest "
         "norm, so the default accepts it (0 rejected) at weight ~1/8, and the mean moves by 6/8 - 1/8 = 5/8 of an "
         "honest step instead of 7/8 in that node's direction. With 2 of 8 it costs the default 6.4 points. "
         "Trimmed mean (+0.7 at 1 of 8, -0.8 at 2) and multi-Krum (-0.8, -1.2) hold against it; a federation that "
         "fears coordinated sign flips should use one of them.",
         "- Label flipping is also accepted by every norm-based defence (its norm is honest) and costs ~1 point "
         "at 1 of 8, ~3-4 at 2 of 8: a flipped node trains honestly on wrong data, which is data poisoning, not "
         "an aggregation attack.",
         "- Std over 3 seeds of the clean run is ~2 points, so a 1-2 point difference between two cells is within "
         "noise; the target is read on the means, as the issue states it. Trimmed mean and multi-Krum cost ~1 "
         "point of clean accuracy (0.815, 0.822 vs 0.830) by discarding honest updates."]


def majority_share() -> float:
    """The majority class' share of the pooled held-out set, averaged over seeds 0-2 (every seed splits anew)."""
    return pooled_majority(SETTING_RUNS, (0, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--adversaries", default="0,1,2", help="0: the clean runs")
    parser.add_argument("--defences", default=",".join(DEFENCES), help="a comma list of: " + ", ".join(DEFENCES))
    parser.add_argument("--render", action="store_true", help="only re-render docs/ from the raw rows")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th row of the plan from the i-th, render none")
    args = parser.parse_args()
    command = ("OMP_NUM_THREADS=1 nice -n 10 python bench/robustness.py --shard 0/2 & "
               "OMP_NUM_THREADS=1 nice -n 10 python bench/robustness.py --shard 1/2; python bench/robustness.py --render")
    if not args.render:
        done = done_keys()
        todo = [k for k in plan([int(s) for s in args.seeds.split(",")], [int(n) for n in args.adversaries.split(",")])
                if k not in done and k[2] in args.defences.split(",")]
        todo = shard(todo, args.shard)
        for i, (attack, n, defence, seed) in enumerate(todo, 1):
            row = run_one(attack, n, defence, seed)
            with ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{i}/{len(todo)}] {attack} x{n} / {defence} / seed {seed}: {row.get('accuracy', 'n/a')} "
                  f"({row['status']}, {row['seconds']} s)", flush=True)
    if args.shard == "0/1":
        render(command)


if __name__ == "__main__":
    main()
