"""The default ``pollinate simulate`` of an earlier commit and of this checkout, timed side by side in one run.

    nice -n 10 python bench/simulation_speed.py [--pairs N] [--before-venv PATH]   # measure, write docs
    python bench/simulation_speed.py --render                                      # re-render from the JSONL

The BEFORE code is commit 73a9514 (before the resident node state, ``client/resident.py``). Unless
``--before-venv`` names a venv whose ``pollinate`` is already an editable install of that commit, the bench adds
a temporary ``git worktree`` at it, copies this checkout's ``.venv`` beside it (shebangs rewritten) and installs
the worktree into it editable, without dependencies; both are removed at the end.

Each pair runs (before, current) one after the other, the same default scenario (4 nodes, 3 rounds, seed 0),
each into its own fresh SQLite store, so drift on a shared machine falls on both variants of a pair. Per
variant the store gives each round's ``duration_s`` (what the ServerApp timed: train and evaluate messages,
aggregation, the store write) and the last round's node-side ``eval_accuracy``; ``total_s`` is the whole
command's wall time (Python start, partitioning, Ray start, actors, rounds). Raw rows are appended to
``docs/simulation-speed.jsonl`` as each run ends, so an interrupted bench keeps what it measured.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ROWS = DOCS / "simulation-speed.jsonl"
BREAKDOWN = DOCS / "simulation-speed-breakdown.json"  # written by bench/round_breakdown.py
# "<UTC time> <1-min load average>" lines sampled every 20 s beside a bench run (a shell loop over /proc/loadavg),
# optional: the load at a run's start says little when other jobs start mid-run, the mean over its run says more.
LOAD_LOG = DOCS / "simulation-speed-load.log"
BEFORE = "73a9514"
# The rows of one change measured against BEFORE share a series; rows written before series existed are the
# resident node state's. The page's result is the latest series'; earlier ones keep a line each.
SERIES = "bf16-autocast"
EARLIER_SERIES = "resident-state"
EARLIER = ("length-grouping", EARLIER_SERIES)  # the earlier series, newest first: each keeps a line on the page
ABLATION = "current, precision=fp32"  # this checkout without mixed precision: bf16 autocast's own effect
ABLATION_FLAGS = ["--set", "train.precision=fp32"]
UNGROUPED = "current, group-by-length=false"  # the length-grouping series' ablation
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_before_venv(commit: str, where: Path) -> Path:
    """A worktree at ``commit`` with a copy of this checkout's venv, the worktree installed into it editable."""
    tree = where / "tree"
    git("worktree", "add", "--detach", str(tree), commit)
    venv = tree / ".venv"
    shutil.copytree(REPO / ".venv", venv, symlinks=True)
    old, new = f"#!{REPO / '.venv' / 'bin' / 'python'}", f"#!{venv / 'bin' / 'python'}"
    for script in (venv / "bin").iterdir():  # console scripts name the interpreter of the venv they were made in
        if script.is_file() and not script.is_symlink():
            head = script.read_bytes()[:len(old) + 1]
            if head.startswith(old.encode()):
                script.write_text(script.read_text().replace(old, new, 1))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "-e", str(tree)], check=True, capture_output=True)
    return venv


def checkout_of(venv: Path) -> Path:
    """The source tree a venv's ``pollinate`` is installed from (to name its commit)."""
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import pollinate.server.app as a; print(a.__file__)"], capture_output=True, text=True,
                         check=True, env={**os.environ, **ENV})
    return Path(out.stdout.strip().splitlines()[-1]).parent.parent


def run_variant(variant: str, venv: Path, pair: int, rounds: int | None, extra: list[str]) -> dict[str, object]:
    """One default ``pollinate simulate`` with ``venv``'s pollinate (``extra`` flags), into a fresh store; its row."""
    tree = checkout_of(venv)
    with tempfile.TemporaryDirectory(prefix=f"speed-{variant}-") as tmp:
        db = Path(tmp) / "store.db"
        cmd = [str(venv / "bin" / "pollinate"), "simulate", "--db", f"sqlite:///{db}", "--output", str(Path(tmp) / "out")]
        if rounds:
            cmd += ["--rounds", str(rounds)]
        cmd += extra
        load = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={**os.environ, **ENV})
        total = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{variant}: `{' '.join(cmd)}` failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
        with sqlite3.connect(db) as con:
            found = con.execute("select number, duration_s, eval_accuracy from rounds order by number").fetchall()
    durations = [r[1] for r in found]
    return {"series": SERIES, "variant": variant, "flags": " ".join(extra), "commit": git("rev-parse", "--short", "HEAD", cwd=tree), "pair": pair,
            "rounds": len(found), "s_per_round": statistics.fmean(durations), "round_s": durations,
            "total_s": total, "final_accuracy": found[-1][2], "round_accuracy": [r[2] for r in found],
            "load_average_at_start": load, "cpus": os.cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def measure(pairs: int, before_venv: Path | None, rounds: int | None, ablation: bool) -> None:
    first = 1 + max((r["pair"] for r in read_rows()), default=-1)  # pair numbers stay unique across series
    with tempfile.TemporaryDirectory(prefix="speed-before-") as tmp:
        venv = before_venv or make_before_venv(BEFORE, Path(tmp))
        variants = [("before", venv, []), ("current", REPO / ".venv", [])]
        if ablation:
            variants.append((ABLATION, REPO / ".venv", ABLATION_FLAGS))
        try:
            for pair in range(first, first + pairs):
                for variant, v, extra in variants:
                    row = run_variant(variant, v, pair, rounds, extra)
                    print(json.dumps(row), flush=True)
                    with ROWS.open("a") as f:
                        f.write(json.dumps(row) + "\n")
        finally:
            if before_venv is None:
                git("worktree", "remove", "--force", str(Path(tmp) / "tree"))


def read_rows() -> list[dict[str, object]]:
    """The raw rows so far; a row from before series existed belongs to ``EARLIER_SERIES``."""
    if not ROWS.exists():
        return []
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    for r in rows:
        r.setdefault("series", EARLIER_SERIES)
    return rows


def mean_load(row: dict[str, object], samples: list[tuple[float, float]]) -> float | None:
    """The mean load average sampled while ``row`` ran (it ended at ``at``, ``total_s`` long), if sampled."""
    end = calendar.timegm(time.strptime(str(row["at"]), "%Y-%m-%dT%H:%M:%SZ"))
    during = [load for t, load in samples if end - float(row["total_s"]) <= t <= end]
    return statistics.fmean(during) if during else None


def load_samples() -> list[tuple[float, float]]:
    if not LOAD_LOG.exists():
        return []
    return [(calendar.timegm(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")), float(load))
            for t, load in (line.split() for line in LOAD_LOG.read_text().splitlines() if line.strip())]


def compare(rows: list[dict[str, object]], base: str, variant: str) -> dict[str, object] | None:
    """``base`` against ``variant`` over the pairs that ran both: per pair and over their means (speed-up is base /
    variant); a pair cut short is left out, so the means stay paired."""
    pairs, used = [], {base: [], variant: []}
    for p in sorted({r["pair"] for r in rows}):
        b = next((r for r in rows if r["pair"] == p and r["variant"] == base), None)
        c = next((r for r in rows if r["pair"] == p and r["variant"] == variant), None)
        if b and c:
            used[base].append(b)
            used[variant].append(c)
            pairs.append({"pair": p, "speedup_per_round": b["s_per_round"] / c["s_per_round"],
                          "speedup_total": b["total_s"] / c["total_s"],
                          "accuracy_difference": c["final_accuracy"] - b["final_accuracy"],
                          "load_average_at_start": [b["load_average_at_start"], c["load_average_at_start"]]})
    if not pairs:
        return None
    mean = {v: {k: statistics.fmean(r[k] for r in rs) for k in ("s_per_round", "total_s", "final_accuracy")}
            for v, rs in used.items()}
    return {"of": f"{base} / {variant}", "pairs": pairs,
            "speedup_per_round": mean[base]["s_per_round"] / mean[variant]["s_per_round"],
            "speedup_total": mean[base]["total_s"] / mean[variant]["total_s"],
            "accuracy_difference": mean[variant]["final_accuracy"] - mean[base]["final_accuracy"]}


def summary(rows: list[dict[str, object]]) -> dict[str, object]:
    """The latest series: before vs current (the headline), before vs current without bf16, and bf16's own effect
    (fp32 vs current); the earlier series' before vs current beside it."""
    latest = [r for r in rows if r["series"] == SERIES]
    variants = sorted({r["variant"] for r in latest})
    out: dict[str, object] = {
        "series": SERIES,
        "variants": {v: {k: statistics.fmean(r[k] for r in latest if r["variant"] == v)
                         for k in ("s_per_round", "total_s", "final_accuracy")} for v in variants},
        "before_vs_current": compare(latest, "before", "current"),
        "before_vs_fp32": compare(latest, "before", ABLATION),
        "bf16_alone": compare(latest, ABLATION, "current"),
        "earlier_series": {e: compare([r for r in rows if r["series"] == e], "before", "current") for e in EARLIER},
        "grouping_alone": compare([r for r in rows if r["series"] == EARLIER[0]], UNGROUPED, "current"),
    }
    # `before` is one commit and one scenario in every series, but its accuracy moves run to run (fresh node ids):
    # the spread of all its runs is the yardstick an accuracy difference is read against.
    before_runs = [r["final_accuracy"] for r in rows if r["variant"] == "before"]
    if len(before_runs) >= 2:
        out["before_accuracy_all_runs"] = {"n": len(before_runs), "mean": statistics.fmean(before_runs),
                                           "std": statistics.stdev(before_runs)}
    head = out["before_vs_current"]
    if head:
        out["speedup_per_round"] = head["speedup_per_round"]
        out["speedup_total"] = head["speedup_total"]
        out["accuracy_difference"] = head["accuracy_difference"]
        # `before` does not repeat its accuracy (fresh node ids per run), so the paired runs are single draws of it;
        # the target's accuracy is read against the mean of all its runs, the paired difference shown beside it.
        accuracy_vs = head["accuracy_difference"]
        if "before_accuracy_all_runs" in out and out["variants"].get("current"):
            accuracy_vs = out["variants"]["current"]["final_accuracy"] - out["before_accuracy_all_runs"]["mean"]
            out["accuracy_difference_all_before_runs"] = accuracy_vs
        out["target_met"] = head["speedup_per_round"] >= 2 and abs(accuracy_vs) <= 0.01
    return out


def _line(name: str, c: dict[str, object] | None) -> str:
    if not c:
        return f"- {name}: no complete pair"
    per_pair = "; ".join(f"pair {p['pair']} {p['speedup_per_round']:.2f}x, accuracy {p['accuracy_difference']:+.4f}"
                         for p in c["pairs"])
    return (f"- {name} ({c['of']}): **{c['speedup_per_round']:.2f}x per round**, {c['speedup_total']:.2f}x whole "
            f"command, final accuracy {c['accuracy_difference']:+.4f} (per pair: {per_pair})")


def render(rows: list[dict[str, object]]) -> None:
    s = summary(rows)
    table = ["| series | pair | variant | commit | s per round | rounds (s) | total s | outside rounds s "
             "| final accuracy | load avg at start | mean load during |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    samples = load_samples()
    for r in rows:
        during = mean_load(r, samples)
        table.append(f"| {r['series']} | {r['pair']} | {r['variant']} | `{r['commit']}` | {r['s_per_round']:.1f} | "
                     f"{', '.join(f'{d:.0f}' for d in r['round_s'])} | {r['total_s']:.0f} | "
                     f"{r['total_s'] - sum(r['round_s']):.0f} | {r['final_accuracy']:.4f} | "
                     f"{r['load_average_at_start']:.1f} | {'' if during is None else f'{during:.1f}'} |")
    verdict = ""
    if "speedup_per_round" in s:
        against_all = s.get("accuracy_difference_all_before_runs")
        verdict = (f"**Result: speed-up (before / current) {s['speedup_per_round']:.2f}x per round and "
                   f"{s['speedup_total']:.2f}x for the whole command; final accuracy "
                   + (f"{against_all:+.4f} against the mean of all {s['before_accuracy_all_runs']['n']} `before` runs "
                      f"({s['accuracy_difference']:+.4f} against the paired ones)" if against_all is not None else
                      f"{s['accuracy_difference']:+.4f}")
                   + f"; the issue's target (>= 2x per round at ±0.01) is {'met' if s['target_met'] else 'NOT met'}.**\n\n")
    lines = [_line("this code", s["before_vs_current"]),
             _line("this code without bf16 (train.precision = fp32)", s["before_vs_fp32"]),
             _line("bf16 autocast alone", s["bf16_alone"]),
             _line("earlier series (length-grouping: resident state + grouping by length)",
                   s["earlier_series"]["length-grouping"]),
             _line("grouping by length alone (length-grouping series)", s["grouping_alone"]),
             _line(f"earlier series ({EARLIER_SERIES}, the resident node state alone)",
                   s["earlier_series"][EARLIER_SERIES])]
    spread = s.get("before_accuracy_all_runs")
    if spread and s["variants"].get("current"):
        current = s["variants"]["current"]["final_accuracy"]
        lines.append(f"- accuracy against all {spread['n']} `before` runs (both series): before "
                     f"{spread['mean']:.4f} ± {spread['std']:.4f} (mean ± std), this code {current:.4f} "
                     f"({current - spread['mean']:+.4f})")
    breakdown = BREAKDOWN.read_text() if BREAKDOWN.exists() else ""
    text = (
        "# Simulation speed: the default `pollinate simulate` against commit 73a9514\n\n"
        f"`nice -n 10 python bench/simulation_speed.py --pairs N` on {platform.machine()}, {rows[0]['cpus']} cores "
        "shared with other jobs (the load average at each start is in the table). Default scenario: MiniLM-L6 + "
        "LoRA r = 8, 4 nodes (1 CPU each), 3 rounds of 40 local steps, batch 16, seed 0. `before` is commit "
        "73a9514 (each message rebuilt the base model and re-read the node's data). `current` is this checkout: "
        "the model, tokenizer, examples and their token lengths stay resident in each Ray actor "
        "(`client/resident.py`), training batches group examples of similar token length "
        "(`train.group-by-length`, `client/data.py:batch_order`) and evaluation runs in length order, and "
        "training and evaluation run under bf16 autocast on this CPU, which has AVX512-BF16 (`train.precision = "
        f"auto`; weights and AdamW stay fp32). `{ABLATION}` is the same checkout without mixed precision "
        "(`--set train.precision=fp32`), so bf16's own effect on time and accuracy shows; the length-grouping "
        f"series' `{UNGROUPED}` did the same for grouping. The commit column is the checkout's HEAD when the "
        "row ran. A series is one change measured against `before`: `bf16-autocast` is the latest, "
        "`length-grouping` and `resident-state` the earlier ones. Runs alternate within a pair so drift on the "
        "shared machine falls on every variant.\n\n"
        + verdict + "\n".join(lines) + "\n\n" + "\n".join(table) + "\n\n"
        "- **s per round** is the mean of the store's `duration_s` (the ServerApp's own timing of a round: "
        "train messages, aggregation, evaluate messages, the store write). **total s** is the wall time of the "
        "whole command (interpreter, partitioning, Ray start, the rounds, the summary); **outside rounds** is total "
        "minus the rounds: start-up, the round-0 evaluation (each actor's first message, which builds its model), "
        "the end.\n"
        "- **final accuracy** is the last round's node-side evaluation accuracy from the store (the weighted mean "
        "over the 4 nodes' held-out examples, at most 256 each); every commit splits the same corpus with the same "
        "seed.\n"
        "- **Noise.** The machine's load (other helpers' jobs) moves a round's time by tens of percent: a pair's "
        "ratio is only as good as the load was equal across it (compare the load columns; the mean load during a "
        "run is from `docs/simulation-speed-load.log`, sampled every 20 s, for the runs it covers). `before` does not repeat "
        "its accuracy: its nodes' batch order is seeded by crc32(seed/node-id/round), and Flower draws simulated "
        "node ids afresh per run, so two of its runs differ like two seeds (0.7939, 0.8047, ... in the table). "
        "This checkout seeds a simulated node by its partition id (and seeds torch's dropout per round), so its "
        "runs of one seed repeat their accuracy: the current rows of a series agree to the last digit, and an "
        "accuracy difference against `before` is within the spread of `before`'s own runs unless it exceeds it.\n\n"
        + (breakdown_text(json.loads(breakdown), None) if breakdown else "")
        + "Raw rows: `docs/simulation-speed.jsonl`; `python bench/simulation_speed.py --render` re-renders this "
        "page and `docs/simulation-speed.json` from them.\n")
    (DOCS / "simulation-speed.md").write_text(text)
    (DOCS / "simulation-speed.json").write_text(json.dumps({**s, "rows": rows}, indent=1) + "\n")
    print(text)


WHAT_WOULD_CUT = (
    "**What was cut, and what would cut more.** The breakdown above was measured on the resident-state code, "
    "before length grouping: the forward/backward of 40 steps was the round, and 44% of the positions it computed "
    "were padding. Grouping batches by length (`train.group-by-length`, now the default) cuts a training batch "
    "from 47.6 to 27.3 tokens wide for examples of 26.8 tokens on average (node 0's partition, 120 batches, "
    "`client/data.py:batch_order`), and evaluation in length order does the same for the 256 held-out examples. "
    "Then the arithmetic itself: this CPU has AVX512-BF16, on which bf16 autocast runs MiniLM's forward/backward "
    "2.1x as fast as fp32 (weights and AdamW stay fp32), so `train.precision = auto` uses it wherever the device "
    "has native bf16 (`bf16 autocast alone` above). What is left is compute on real tokens at bf16 and the fixed "
    "cost outside the rounds (Ray start-up, actors importing torch, the round-0 evaluation), which the whole-command "
    "ratio shows. Further cuts would change what is computed (fewer local steps, a smaller "
    "`train.eval-max-examples`) or trade start-up for steps (`torch.compile`, unmeasured). Pairs measured while other "
    "jobs loaded the machine (the length-grouping series, mean load 13-21) understate the ratios: the same code's "
    "`current, precision=fp32` is the length-grouping series' `current`, 1.80x there under load and 2.31x on the "
    "quiet machine of the bf16 series.\n")


def breakdown_text(b: dict[str, object], measured: float | None) -> str:
    """The section on where one round's time goes, from ``docs/simulation-speed-breakdown.json``; what the node
    parts leave of the measured current round (``measured`` s) is Flower/Ray's and the server's."""
    lines = ["## Where a round's time went (the resident-state code, before length grouping)\n", str(b.get("method", "")), "",
             "| part | seconds | share |", "|---|---|---|"]
    parts = dict(b["parts_s"])
    rest = None if measured is None else measured - sum(parts.values())
    if rest is not None and rest >= 0:
        parts["the rest of the measured current round: Flower/Ray messaging and scheduling, aggregation, "
              "store (the measured s per round minus the parts above)"] = rest
    total = sum(parts.values())
    for name, sec in parts.items():
        lines.append(f"| {name} | {sec:.2f} | {sec / total:.0%} |")
    if rest is not None and rest < 0:
        lines += ["", f"The two nodes' parts ({sum(parts.values()):.1f} s) exceed the measured current round "
                  f"({measured:.1f} s): they were timed on a loaded machine (beside another simulation), so the rest "
                  "(Flower/Ray messaging and scheduling, aggregation, the store) is below what these timings "
                  "resolve. Their shares are the finding: the forward/backward is the round."]
    lines += ["", *[f"- {n}" for n in b.get("notes", [])], "", WHAT_WOULD_CUT, ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1, help="(before, current) pairs to run, alternating")
    parser.add_argument("--before-venv", type=Path, help="a venv whose pollinate is an editable install of "
                        f"commit {BEFORE} (default: make one in a temporary git worktree)")
    parser.add_argument("--rounds", type=int, help="federation.rounds (default: the scenario's 3)")
    parser.add_argument("--no-ablation", action="store_true", help=f"skip the '{ABLATION}' variant")
    parser.add_argument("--render", action="store_true", help="only re-render from docs/simulation-speed.jsonl")
    args = parser.parse_args()
    if not args.render:
        if args.before_venv and not (args.before_venv / "bin" / "pollinate").exists():
            raise SystemExit(f"--before-venv {args.before_venv}: no bin/pollinate there; give a venv with "
                             f"pollinate at commit {BEFORE} installed, or leave the flag out to build one")
        measure(args.pairs, args.before_venv, args.rounds, not args.no_ablation)
    if not ROWS.exists():
        raise SystemExit(f"{ROWS} does not exist: run the bench without --render first")
    render(read_rows())


if __name__ == "__main__":
    main()
