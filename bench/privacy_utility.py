"""Utility under client-level central DP (DP-FedAvg) over 200 simulated nodes: the epsilon curve, fedavg vs ffa-lora.

    nice -n 10 python bench/privacy_utility.py [--seeds 0,1,2] [--epsilons 1,3,8,inf] [--strategies fedavg,ffa-lora]
                                               [--variant chosen] [--shard 0/2]
    python bench/privacy_utility.py --render     # re-render docs/ from the raw rows only

Every run is pollinate's real ServerApp loop against its real ClientApp in this process (bench/federation_runs.py):
tiny-bert on the synthetic corpus (bench/synthetic_corpus.py), NODES nodes of PER_NODE examples each, every node
Poisson-sampled per round at rate q = federation.fraction-train, ``privacy.mode = "central"`` (the server clips each
node's adapter delta to C, divides the sum by q N and adds N(0, (z C / q N)^2), server/privacy_rounds.py), z
calibrated by the repo's accountant so that the planned rounds spend exactly epsilon at delta = 1e-5 (< 1/N).
epsilon = inf is the same setting without DP: the same q (q N nodes sampled per round), rounds, steps and lr.
Nodes report no metrics under DP, so every run is scored here: the last global adapter on the pooled held-out set.

The previous study (DP-SGD on 4 MiniLM nodes, 3 rounds) ended at the majority class at every epsilon; it and its
DP-SGD-vs-plain cost part are replaced (the cost part measured x1.06 time, x1.28 memory; see git history).

One raw row per run is appended to docs/privacy-bench-rows.jsonl as it ends; a rerun skips rows it has, ``--shard
i/n`` runs every n-th row of the plan. ``--variant`` picks one of VARIANTS (the tuning runs are rows too, rendered
in their own table); ``--strategies`` takes any strategy central DP accepts (e.g. sketch, once it works under DP).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation_runs import DOCS, REPO, Setting, append_row, majority_share, mean_std, read_rows, run, shard  # noqa: E402

from flwr.app import Context, Error, Message  # noqa: E402

from pollinate.client.app import app as pollinate_client  # noqa: E402
from pollinate.server.store import RoundStore  # noqa: E402

ROWS = DOCS / "privacy-bench-rows.jsonl"
TAG = "central-500"  # in every row: rows of another setting are never averaged with these
NODES = 500  # delta = 1e-5 < 1 / 500, as privacy_rounds requires (delta < 1/N)
PER_NODE = 70  # examples per node: 56 to train on, 14 held out
DELTA = 1e-5
SETTING = {"model.name": "tiny-bert", "federation.rounds": 20, "federation.fraction-train": 0.04,
           "train.local-steps": 10, "train.batch-size": 16, "train.lr": 1e-2, "train.eval-max-examples": 8,
           "federation.min-nodes": 2,
           # as when the first rows ran (before bf16 autocast and length grouping became defaults): one setting
           "train.precision": "fp32", "train.group-by-length": False}
# sketch releases two means per round, and adaptive clipping adapts one norm from one noisy count per round (refused
# for it), so its DP runs clip at a fixed C near where fedavg's adaptive C ended (1.4-1.75 in the rows below).
FIXED_CLIP = {"sketch": 1.5}
# A variant: run config overrides on SETTING for every run; the central DP clip norm C (privacy.clip-norm, the start
# value under adaptive clipping) and whether C adapts to the median delta norm (Andrew et al. 2021) in the DP runs.
VARIANTS: dict[str, tuple[dict[str, object], float, bool]] = {
    "chosen": ({"train.freeze-head": True}, 1.0, True),
    "head-trained": ({}, 1.0, True),  # the ablation: the nodes train (and the server noises) the classifier head
}
STRATEGIES = ("fedavg", "ffa-lora")
EPSILONS = (8.0, math.inf, 3.0, 1.0)  # the target's pair first: a partial study holds the rows that decide it
TARGET_EPSILON, TARGET_SHARE = 8.0, 0.90
CURVE_EVERY = 5  # rounds between scored points of the learning curve


def scored_here(msg: Message, context: Context) -> Message:
    """pollinate's ClientApp, except that it declines the per-round federated evaluation: this bench scores the
    global adapter itself on the pooled held-out set, and 500 node evaluations a round would cost more than the
    round's training. Under DP the nodes decline it anyway (they release no metrics), so both arms train alike."""
    if msg.metadata.message_type.startswith("evaluate"):
        return Message(Error(code=1, reason="bench: the global adapter is scored centrally"), reply_to=msg)
    return pollinate_client(msg, context)


def setting() -> Setting:
    return Setting.of(NODES, SETTING, corpus_size=NODES * PER_NODE)


def privacy_overrides(epsilon: float, clip: float, adaptive: bool) -> dict[str, object]:
    if math.isinf(epsilon):
        return {"privacy.mode": "off"}
    return {"privacy.mode": "central", "privacy.target-epsilon": epsilon, "privacy.delta": DELTA,
            "privacy.clip-norm": clip, "privacy.adaptive-clipping": adaptive}


def ledger_summary(store: RoundStore, run_id: int) -> dict[str, object]:
    """What the run's privacy ledger says: epsilon spent, z, the clip norm, nodes and noise per round."""
    own = [e for _, e in store.privacy_ledger(run_id) if e.node_id is None and e.status == "spent"]
    if not own:
        return {}
    return {"epsilon_spent": own[-1].epsilon, "noise_multiplier": own[-1].noise_multiplier,
            "clip_norm": own[-1].clip_norm, "sample_rate": own[-1].sample_rate,
            "clients_mean": sum(e.metrics.get("clients", 0.0) for e in own) / len(own),
            "expected_clients": own[-1].metrics.get("expected-clients"),
            "noise_std": own[-1].metrics.get("noise-std")}


def run_one(variant: str, strategy: str, epsilon: float, seed: int) -> dict[str, object]:
    overrides, clip, adaptive = VARIANTS[variant]
    if strategy in FIXED_CLIP:
        clip, adaptive = FIXED_CLIP[strategy], False
    more = {**overrides, "federation.strategy": strategy, **privacy_overrides(epsilon, clip, adaptive)}
    row = run(setting(), seed, more, app=scored_here, inspect=ledger_summary, curve_every=CURVE_EVERY)
    return {"setting": TAG, "variant": variant, "strategy": strategy, "epsilon": eps_key(epsilon), **row}


def eps_key(epsilon: float) -> str | float:
    return "inf" if math.isinf(epsilon) else epsilon


def plan(variant: str, strategies: list[str], epsilons: list[float], seeds: list[int]) -> list[tuple]:
    """Seeds outermost, the target's epsilons first: each pass over a seed completes the table once more."""
    return [(variant, s, e, seed) for seed in seeds for e in epsilons for s in strategies]


def summarise(raw: list[dict], variant: str) -> list[dict]:
    """One row per (strategy, epsilon) of ``variant``: accuracy mean/std over seeds, the ledger's numbers."""
    out = []
    for strategy, eps in dict.fromkeys((r["strategy"], r["epsilon"]) for r in raw if r["variant"] == variant):
        group = sorted((r for r in raw if (r["variant"], r["strategy"], r["epsilon"]) == (variant, strategy, eps)
                        and "accuracy" in r), key=lambda r: r["seed"])
        if not group:
            continue
        mean, std = mean_std([r["accuracy"] for r in group])
        overrides, clip, adaptive = VARIANTS.get(variant, ({}, math.nan, False))
        out.append({"strategy": strategy, "epsilon": eps, "accuracy_mean": mean, "accuracy_std": std,
                    "seeds": [r["seed"] for r in group], "accuracies": [r["accuracy"] for r in group],
                    "epsilon_spent": group[0].get("epsilon_spent", "inf"),
                    "noise_multiplier": group[0].get("noise_multiplier", 0.0),
                    "noise_std": group[0].get("noise_std", 0.0),
                    "clients_per_round": statistics_mean([r.get("clients_mean") for r in group]),
                    "final_clip_norm": statistics_mean([r.get("clip_norm") for r in group]),
                    "crashed": any(r.get("crashed") for r in group), "variant": variant,
                    "setting": {"tag": TAG, "nodes": NODES, "examples_per_node": PER_NODE, "delta": DELTA,
                                **SETTING, **overrides, **({} if eps == "inf" else {"privacy.clip-norm": clip, "privacy.adaptive-clipping": adaptive})}})
    for r in out:  # the share of the same strategy's non-private accuracy, on the same seeds
        base = next((b for b in out if b["strategy"] == r["strategy"] and b["epsilon"] == "inf"), None)
        paired = [a for seed, a in zip(base["seeds"], base["accuracies"]) if seed in r["seeds"]] if base else []
        r["share_of_non_private"] = (statistics_mean([a for a, seed in zip(r["accuracies"], r["seeds"])
                                                      if seed in base["seeds"]]) / statistics_mean(paired)
                                     if paired else None)
    order = {e: i for i, e in enumerate(["inf", 8.0, 3.0, 1.0])}
    return sorted(out, key=lambda r: (r["strategy"], order.get(r["epsilon"], 9)))


def statistics_mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def target_check(rows: list[dict]) -> list[str]:
    lines = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        at = {r["epsilon"]: r for r in rows if r["strategy"] == strategy}
        if TARGET_EPSILON in at and "inf" in at:
            share = at[TARGET_EPSILON]["accuracy_mean"] / at["inf"]["accuracy_mean"]
            met = share >= TARGET_SHARE
            lines.append(f"- **{strategy}**: epsilon 8 {at[TARGET_EPSILON]['accuracy_mean']:.3f} / non-private "
                         f"{at['inf']['accuracy_mean']:.3f} = **{share:.1%}** of non-private: "
                         f"{'met' if met else 'NOT met'} (target >= {TARGET_SHARE:.0%}).")
    return lines


def fmt_eps(e: object) -> str:
    return "inf (no DP)" if e == "inf" else f"{e:g}"


def render(command: str, variant: str = "chosen") -> None:
    raw = [r for r in read_rows(ROWS, TAG)]
    rows = summarise(raw, variant)
    seeds = sorted({r["seed"] for r in raw})
    majority = majority_share(setting(), seeds or [0])
    (DOCS / "privacy-bench.json").write_text(json.dumps(
        {"majority_accuracy": majority, "target": {"epsilon": TARGET_EPSILON, "share_of_non_private": TARGET_SHARE},
         "rows": rows, "ablation_rows": {v: summarise(raw, v) for v in VARIANTS if v != variant}},
        indent=1, default=str) + "\n")
    overrides, clip, adaptive = VARIANTS[variant]
    q, rounds = SETTING["federation.fraction-train"], SETTING["federation.rounds"]
    lines = [f"# Privacy bench: client-level central DP over {NODES} nodes, the epsilon curve\n",
             f"`{command}` (raw rows: `{ROWS.relative_to(REPO)}`; `python bench/privacy_utility.py --render` "
             "re-renders from them; a rerun skips the rows it has).\n",
             "## Setting\n",
             f"{NODES} simulated nodes, each an IID share of {PER_NODE} examples of the synthetic corpus "
             f"(`bench/synthetic_corpus.py`: balanced, 10% label noise, so ~0.9 is the ceiling); tiny-bert with LoRA "
             f"r=4 on query/value; every round each node is Poisson-sampled at q = {q} (q N = {q * NODES:g} nodes "
             f"expected), {rounds} rounds of {SETTING['train.local-steps']} local steps (batch "
             f"{SETTING['train.batch-size']}, lr {SETTING['train.lr']}); overrides of this variant: "
             f"`{overrides}`. DP: `privacy.mode = \"central\"` (DP-FedAvg, server/privacy_rounds.py), clip norm "
             f"C = {clip} on each node's adapter delta, delta = {DELTA:g} (< 1/N = 1/{NODES}), z calibrated so the "
             f"{rounds} planned rounds spend exactly epsilon. epsilon = inf: the same setting with "
             "`privacy.mode = \"off\"` (the same q N nodes per round). Score: the last global adapter on the pooled "
             f"held-out splits of all {NODES} nodes (nodes report no metrics under DP); **majority class: "
             f"{majority:.3f}**. Cells: mean ± std over seeds.\n",
             "| strategy | epsilon | accuracy | of non-private (same seeds) | seeds | epsilon spent | z | final C (adaptive) | "
             "noise std on the mean, last round (z_update C / q N) | nodes / round (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spent = r["epsilon_spent"]
        lines.append(f"| {r['strategy']} | {fmt_eps(r['epsilon'])} | {r['accuracy_mean']:.3f} ± "
                     f"{r['accuracy_std']:.3f} | "
                     f"{'-' if r['share_of_non_private'] is None else format(r['share_of_non_private'], '.1%')} | "
                     f"{len(r['seeds'])} | "
                     f"{spent if isinstance(spent, str) else f'{spent:.3f}'} | {r['noise_multiplier']:.3f} | "
                     f"{'-' if r['final_clip_norm'] is None else format(r['final_clip_norm'], '.2f')} | "
                     f"{r['noise_std'] or 0:.5f} | "
                     f"{'-' if r['clients_per_round'] is None else format(r['clients_per_round'], '.1f')} |")
    lines += [f"\n## Target: epsilon = 8 (delta {DELTA:g}) at >= 90% of non-private\n", *target_check(rows)]
    for other in [v for v in VARIANTS if v != variant]:
        ablation = summarise(raw, other)
        if ablation:
            lines += [f"\n## Variant `{other}`: overrides `{VARIANTS[other][0]}` instead of `{overrides}`\n",
                      "| strategy | epsilon | accuracy | of non-private (same seeds) | seeds | final C (adaptive) |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['strategy']} | {fmt_eps(r['epsilon'])} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                      f"{'-' if r['share_of_non_private'] is None else format(r['share_of_non_private'], '.1%')} | "
                      f"{', '.join(map(str, r['seeds']))} | "
                      f"{'-' if r['final_clip_norm'] is None else format(r['final_clip_norm'], '.2f')} |" for r in ablation]
    curves = [r for r in raw if r["seed"] == 0 and "accuracy" in r]
    if curves:
        lines += [f"\n## Learning curves and the ablation (seed 0; every {CURVE_EVERY} rounds, pooled held-out "
                  "accuracy)\n",
                  "Variant `head-trained` is the ablation of `train.freeze-head`: the nodes train the classifier "
                  "head too, and central DP noises it.\n",
                  "| variant | overrides, C | strategy | epsilon | accuracy | curve (round: accuracy) |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(curves, key=lambda r: (r["variant"], r["strategy"], str(r["epsilon"]))):
            ov, c, _ = VARIANTS.get(r["variant"], ({}, math.nan, False))
            curve = ", ".join(f"{k}: {v:.2f}" for k, v in r.get("curve", {}).items())
            lines.append(f"| {r['variant']} | `{ov}`, C={c} | {r['strategy']} | {fmt_eps(r['epsilon'])} | "
                         f"{r['accuracy']:.3f} | {curve} |")
    reading = DOCS / "privacy-bench-reading.md"
    if reading.exists():
        lines += ["", reading.read_text()]
    (DOCS / "privacy-bench.md").write_text("\n".join(lines) + "\n")


def claim(key: tuple) -> bool:
    """Take one row of the plan for this process: several processes share one plan without --shard (the first to
    claim a row runs it). Claims live beside the rows file's name in the temp dir, for the machine's lifetime."""
    path = Path(tempfile.gettempdir()) / f"{ROWS.name}.{TAG}.claims"
    line = json.dumps(list(key)) + "\n"
    with path.open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if line in f.readlines():
            return False
        f.write(line)
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epsilons", default=",".join(map(str, EPSILONS)), help="budgets (inf: no DP)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="strategies central DP accepts (check_privacy_config), e.g. fedavg,ffa-lora,sketch")
    parser.add_argument("--variant", default="chosen", choices=sorted(VARIANTS))
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th row of the plan from the i-th")
    parser.add_argument("--render", action="store_true", help="re-render docs/ from the raw rows, run nothing")
    args = parser.parse_args()
    command = "python bench/privacy_utility.py " + " ".join(sys.argv[1:])
    if not args.render:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
            epsilons = [float(e) for e in args.epsilons.split(",")]
        except ValueError:
            parser.error(f"--seeds {args.seeds!r} / --epsilons {args.epsilons!r}: use comma-separated numbers, "
                         "e.g. --seeds 0,1 --epsilons 8,inf")
        if any(not (e > 0) for e in epsilons):
            parser.error(f"--epsilons {args.epsilons!r}: every budget must be > 0 (inf: no DP)")
        done = {(r["variant"], r["strategy"], r["epsilon"], r["seed"]) for r in read_rows(ROWS, TAG)}
        todo = [p for p in plan(args.variant, args.strategies.split(","), epsilons, seeds)
                if (p[0], p[1], eps_key(p[2]), p[3]) not in done]
        for variant, strategy, epsilon, seed in shard(todo, args.shard):
            if not claim((variant, strategy, eps_key(epsilon), seed)):
                continue  # another process of this study took it
            row = run_one(variant, strategy, epsilon, seed)
            append_row(ROWS, row)
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}, default=str), flush=True)
    render("nice -n 10 python bench/privacy_utility.py --seeds 0,1,2` (two processes share the plan), then "
           "for the ablation `python bench/privacy_utility.py --variant head-trained --epsilons 8,inf" if args.render
           else command)


if __name__ == "__main__":
    main()
