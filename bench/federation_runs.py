"""Short federations run in this process and scored on one pooled held-out set: what the studies in bench/ share.

The robustness, strategy, many-client and privacy studies each run tens to hundreds of federations of tiny-bert on
the synthetic corpus (bench/synthetic_corpus.py). Every run is pollinate's real ServerApp loop
(``server.app.run_federation``) against its real ClientApp through ``simulations/inprocess.py`` (Flower's serde both
ways, no Ray: a run costs its compute, not 20 s of start-up). The nodes' data and settings (max-ranks) are written by
the code ``pollinate simulate`` uses, once per (setting, seed), and copied into each run's directory (a node keeps
its privacy budget beside its data, so runs must not share it).

A run is scored here, not by the nodes: the global adapter of the last round (and of the rounds asked for) is
evaluated on the pooled held-out splits of all nodes, so the score is the same number for every strategy, with or
without DP (under DP the nodes report no metrics). Raw rows are JSON lines; ``read_rows`` keeps one setting's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

torch.set_num_threads(1)  # 2 threads on 2 shared cores spin and wait more than they compute

from flwr.clientapp import ClientApp  # noqa: E402

from pollinate.client.app import app as pollinate_client  # noqa: E402
from pollinate.client.data import Example, batches, endless_batches, read_examples, split  # noqa: E402
from pollinate.client.train import evaluate, train  # noqa: E402
from pollinate.models import build_peft_model, load_adapter_state  # noqa: E402
from pollinate.proto.run_config import RunConfig  # noqa: E402
from pollinate.server.app import run_federation  # noqa: E402
from pollinate.server.store import RoundStore  # noqa: E402
from pollinate.strategies.base import lora_rank  # noqa: E402
from pollinate.simulations.cli import write_node_data  # noqa: E402
from pollinate.simulations.inprocess import InProcessGrid, NodeConfigOf, serverapp_identity  # noqa: E402
from pollinate.simulations.scenario import load_scenario  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_corpus import SIZE, write_corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
TINY = REPO / "tests" / "support" / "scenarios" / "tiny.toml"  # tiny-bert (random init, 2 layers, hidden 64)

@dataclasses.dataclass(frozen=True)
class Setting:
    """One study's federation: nodes, run config overrides (over ``scenario``), the corpus size, node ranks."""

    nodes: int
    overrides: tuple[tuple[str, object], ...]  # (run config key, value) pairs: hashable, so partitions are cached
    corpus_size: int = SIZE
    max_ranks: tuple[int, ...] = ()  # one per node: its capacity (heterogeneous-rank studies); empty: no limit
    scenario: Path = TINY

    @classmethod
    def of(cls, nodes: int, overrides: Mapping[str, object], **kwargs: object) -> Setting:
        return cls(nodes, tuple(sorted(overrides.items())), **kwargs)  # type: ignore[arg-type]

    def config(self, seed: int, more: Mapping[str, object] = (), work: Path | None = None) -> RunConfig:
        """The run config of one run: the setting, ``more`` on top, the corpus, the seed, a store in ``work``."""
        overrides = {**dict(self.overrides), **dict(more), "data.dataset": str(corpus(self.corpus_size)), "seed": seed}
        if work is not None:
            overrides |= {"store.db": f"sqlite:///{work / 'store.db'}", "store.output-dir": str(work / "out")}
        cfg, _ = load_scenario(self.scenario, overrides, self.nodes)
        return cfg


@functools.lru_cache(maxsize=None)
def corpus(size: int) -> Path:
    """The synthetic corpus of ``size`` rows (the same rows in every process), as a file ``data.dataset`` names."""
    return write_corpus(Path(tempfile.mkdtemp(prefix="study-corpus-")) / "synthetic.jsonl", size)


@functools.lru_cache(maxsize=None)
def partitions(setting: Setting, seed: int) -> tuple[Path, RunConfig]:
    """The nodes' data and settings for ``seed``, written once per process by the code ``pollinate simulate`` uses;
    the directory, and the config whose labels and partition dir the corpus set."""
    overrides = {**dict(setting.overrides), "data.dataset": str(corpus(setting.corpus_size)), "seed": seed}
    cfg, sim = load_scenario(setting.scenario, overrides, setting.nodes)
    if setting.max_ranks:
        sim = dataclasses.replace(sim, max_ranks=setting.max_ranks)
    directory = Path(tempfile.mkdtemp(prefix=f"study-seed{seed}-"))
    cfg, _ = write_node_data(cfg, sim, directory)
    return directory, cfg


def pooled_split(cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    """Every node's (train, held-out) split, as each node splits its data, pooled over the nodes."""
    pooled_train, held_out = [], []
    for path in sorted(Path(cfg.data.partition_dir).glob("partition-*.jsonl")):
        train_part, eval_part = split(read_examples(path, cfg.data, cfg.model), cfg.data.eval_fraction, cfg.seed)
        pooled_train += train_part
        held_out += eval_part
    return pooled_train, held_out


def score(cfg: RunConfig, tensors: Mapping[str, object], held_out: Sequence[Example]) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the adapter ``tensors`` on ``held_out``, built at their LoRA rank: flora
    and sketch store a larger rank that carries what they merged into the base (as the global test set does)."""
    model, base = build_peft_model(cfg.replace(**{"adapter.r": lora_rank(tensors) or cfg.adapter.r}))
    load_adapter_state(model, dict(tensors))
    result = evaluate(model, batches(list(held_out), base.tokenizer, cfg.model, 64, None), torch.device("cpu"))
    return result.accuracy, result.loss


def majority_share(setting: Setting, seeds: Sequence[int]) -> float:
    """The majority class' share of the pooled held-out set, averaged over ``seeds`` (every seed splits anew)."""
    shares = []
    for seed in seeds:
        directory, cfg = partitions(setting, seed)
        labels = [e.label for e in pooled_split(cfg)[1]]
        shares.append(max(labels.count(v) for v in set(labels)) / len(labels))
    return statistics.fmean(shares)


def run(setting: Setting, seed: int, more: Mapping[str, object] = (), app: ClientApp = pollinate_client,
        node_config: NodeConfigOf | None = None, curve_every: int = 0,
        prepare: Callable[[Path], None] | None = None,
        inspect: Callable[[RoundStore, int], Mapping[str, object]] | None = None) -> dict[str, object]:
    """One federation; its raw row: status, crashed, accuracy/loss of the last global adapter on the pooled held-out
    set (read before ``prepare`` may edit the nodes' data), optionally the curve every ``curve_every`` rounds, and
    what ``inspect(store, run_id)`` adds. A run that raises is a row (``crashed``), not the end of the study."""
    row: dict[str, object] = {"seed": seed}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="study-run-") as tmp:
        work = Path(tmp)
        shared, _ = partitions(setting, seed)
        shutil.copytree(shared, work / "partitions")
        cfg = setting.config(seed, {**dict(more), "data.partition-dir": str(work / "partitions")}, work)
        held_out = pooled_split(cfg)[1]
        if prepare is not None:
            prepare(work / "partitions")
        grid = InProcessGrid.of_scenario(cfg, setting.nodes, app, seed=seed, node_config=node_config)
        try:
            with serverapp_identity():
                run_id = run_federation(grid, cfg)  # type: ignore[arg-type]
            store = RoundStore(cfg.store.db)
            run_summary, rounds = store.run(run_id), store.rounds(run_id)
            row.update(status=run_summary.status, crashed=run_summary.status != "completed", rounds=len(rounds),
                       rejected=sum(1 for u in store.client_updates(run_id) if u.status == "rejected"))
            if rounds:
                row["accuracy"], row["loss"] = score(cfg, store.adapter(run_id, rounds[-1].number).tensors(), held_out)
            if curve_every:
                row["curve"] = {r.number: score(cfg, store.adapter(run_id, r.number).tensors(), held_out)[0]
                                for r in rounds if r.number % curve_every == 0 or r.number == rounds[-1].number}
            if inspect is not None:
                row.update(inspect(store, run_id))
            store.engine.dispose()
        except Exception as e:  # a crash is a result of the study, not the end of it
            row.update(status=f"raised {type(e).__name__}: {e}", crashed=True)
            traceback.print_exc()
    row["seconds"] = round(time.time() - started, 1)
    return row


def centralised(setting: Setting, seed: int, steps: int, more: Mapping[str, object] = ()) -> dict[str, object]:
    """The upper bound: one adapter trained on the pooled training splits of all nodes for ``steps`` optimiser
    steps, scored on the same pooled held-out set as the federations."""
    started = time.time()
    _, base_cfg = partitions(setting, seed)
    cfg = base_cfg.replace(**dict(more)) if more else base_cfg
    pooled_train, held_out = pooled_split(cfg)
    model, base = build_peft_model(cfg)
    stream = endless_batches(pooled_train, base.tokenizer, cfg.model, cfg.train.batch_size, seed)
    train(model, stream, dataclasses.replace(cfg.train, local_steps=steps), torch.device("cpu"))
    result = evaluate(model, batches(held_out, base.tokenizer, cfg.model, 64, None), torch.device("cpu"))
    return {"seed": seed, "status": "completed", "crashed": False, "accuracy": result.accuracy, "loss": result.loss,
            "steps": steps, "seconds": round(time.time() - started, 1)}


def append_row(path: Path, row: Mapping[str, object]) -> None:
    """One raw row, appended as soon as its run ends (a partial study is kept; a rerun skips what it has)."""
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def read_rows(path: Path, tag: str | tuple[str, ...]) -> list[dict[str, object]]:
    """The raw rows of one setting (``tag``, or of each of several): rows of another setting are never averaged with
    these (a study of several settings keeps the tag in each row and groups by it)."""
    if not path.exists():
        return []
    tags = (tag,) if isinstance(tag, str) else tag
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("setting") in tags]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def shard(todo: list, spec: str) -> list:
    """``i/n``: this process' share of a plan that n processes share (and one rows file): an item belongs to one
    shard by a stable hash of itself, so a plan recomputed as rows come in still splits the same way."""
    index, count = (int(x) for x in spec.split("/"))
    return [k for k in todo if zlib.crc32(repr(k).encode()) % count == index]


def run_plan(plan: Callable[[list[dict]], list[tuple]], one: Callable[..., dict], rows_path: Path,
             tag: str | tuple[str, ...], spec: str, from_end: bool = False) -> None:
    """Run this shard's items of ``plan(rows)`` one at a time, appending each row, re-planning after each: a plan
    can grow as rows come in (a grid at the learning rate its sweep chose). ``from_end``: take the last item first,
    so a second process on the same shard works from the other end (they meet at most once: ``grid_summary`` keeps
    the first row of a seed)."""
    count = 0
    while todo := shard(plan(read_rows(rows_path, tag)), spec):
        item = todo[-1] if from_end else todo[0]
        row = one(*item)
        append_row(rows_path, row)
        count += 1
        print(f"[{count}, {len(todo) - 1} left] {item}: {row.get('accuracy', 'n/a')} ({row['status']}, "
              f"{row['seconds']} s)", flush=True)


def best_rate(rows: Sequence[dict], strategy: str, default: float) -> float:
    """The learning rate with the best final accuracy among ``strategy``'s sweep rows (``default`` before any)."""
    tried = [r for r in rows if r["phase"] == "sweep" and r["strategy"] == strategy and "accuracy" in r]
    return max(tried, key=lambda r: r["accuracy"])["lr"] if tried else default


def grid_summary(rows: Sequence[dict], group_by: Sequence[str]) -> list[dict]:
    """One row per ``group_by`` values among the grid rows: accuracy mean and std over seeds, the per-seed values,
    and the mean accuracy curve (rounds where every seed's curve has a value)."""
    out = []
    grid = [r for r in rows if r["phase"] == "grid"]
    for values in dict.fromkeys(tuple(r[k] for k in group_by) for r in grid):
        firsts: dict[int, dict] = {}
        for r in grid:
            if tuple(r[k] for k in group_by) == values:
                firsts.setdefault(r["seed"], r)  # a row run twice (two processes met) counts once
        group = sorted(firsts.values(), key=lambda r: r["seed"])
        accuracies = [r["accuracy"] for r in group if "accuracy" in r]
        mean, std = mean_std(accuracies)
        curves = [r["curve"] for r in group if r.get("curve")]
        rounds = sorted({int(n) for c in curves for n in c}, key=int)
        curve = {n: mean_std([c[str(n)] for c in curves if str(n) in c])[0] for n in rounds}
        out.append({**dict(zip(group_by, values, strict=True)), "accuracy_mean": mean, "accuracy_std": std,
                    "seeds": [r["seed"] for r in group], "accuracies": accuracies,
                    "crashed": any(r.get("crashed") for r in group), "curve": curve,
                    "seconds_mean": mean_std([r["seconds"] for r in group])[0]})
    return out


def study_cli(plan: Callable[[list[dict]], list[tuple]], one: Callable[..., dict], rows_path: Path,
              tag: str | tuple[str, ...], render: Callable[[str], None], command: str) -> None:
    """A study's command line: run this process' share of the plan (``--shard i/n``, ``--from-end``), then render
    docs/ from the rows when it is the only process (``--render``: render only)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--render", action="store_true", help="only re-render docs/ from the raw rows")
    parser.add_argument("--shard", default="0/1", help="i/n: this process' share of the plan (a stable hash)")
    parser.add_argument("--from-end", action="store_true", help="take the shard's items from the end of the plan")
    args = parser.parse_args()
    if not args.render:
        run_plan(plan, one, rows_path, tag, args.shard, args.from_end)
    if args.shard == "0/1":
        render(command)
