"""``pollinate simulate``: run a scenario on Flower's Simulation Engine and summarise it from the store."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rich.console import Console

from pollinate.flags import (RENAMED_SIMULATE, absolute_locations, add_run_config_arguments, add_scenario_arguments,
                             overrides_from_args, refuse_renamed, scenario_of, store_url)
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.simulations import engine
from pollinate.simulations.scenario import DEFAULT_SCENARIO, SimulationSettings, load_scenario

console = Console(highlight=False, width=max(100, Console().width))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scenario_arguments(parser, "default: the default scenario")
    parser.add_argument("--clients", type=int, help="number of simulated nodes (scenario [simulation] clients)")
    parser.add_argument("--corpus", metavar="PATH", help="the corpus partitioned across the simulated nodes: your own "
                        "CSV/JSONL file, or a bundled corpus name, instead of the scenario's (data.dataset)")
    add_run_config_arguments(parser, "train.lr=5e-4")
    refuse_renamed(parser, RENAMED_SIMULATE)


def write_node_data(cfg: RunConfig, sim: SimulationSettings, directory: Path) -> tuple[RunConfig, list[int]]:
    """Each simulated node's examples and settings (its max-rank) in ``directory``; the config that points the
    nodes at them (``data.partition-dir``), and each node's number of examples."""
    from pollinate.client.data import examples_of
    from pollinate.proto.node_config import write_node_settings
    from pollinate.simulations.datasets import load_corpus
    from pollinate.simulations.partition import write_partitions

    rows = load_corpus(cfg.data.dataset)
    examples_of(rows, cfg.data.dataset, cfg.data, cfg.model)  # a bad row is refused here, not by a node in round 1
    sizes = write_partitions(rows, cfg.data, sim.clients, cfg.seed, directory)
    for i, max_rank in enumerate(sim.max_ranks):
        write_node_settings(directory, i, max_rank)
    cfg = cfg.replace(**{"data.partition-dir": str(directory.resolve())})
    check_sample_delta(cfg, sizes)
    return cfg, sizes


def check_sample_delta(cfg: RunConfig, partition_sizes: list[int]) -> None:
    """Under DP-SGD every node needs delta < 1/n for its n training examples; nodes check it too, but here the
    partitions are known, so a bad delta is refused before any round rather than by every node in round 1."""
    if cfg.privacy.mode != "sample":
        return
    from pollinate.client.data import train_size

    n = min(train_size(size, cfg.data.eval_fraction) for size in partition_sizes)
    if cfg.privacy.delta >= 1 / n:
        raise ConfigError(f"privacy.delta = {cfg.privacy.delta:g} is not below 1/n = 1/{n} for the smallest node's "
                          f"{n} training examples: the guarantee would allow leaking an example outright; "
                          f"use --delta below {1 / n:.2g} (or fewer clients, so each holds more examples)")


def simulate(args: argparse.Namespace) -> int:
    # Imported here, not at the top: they pull in torch, so `pollinate --help` would take seconds.
    from pollinate import strategies
    from pollinate.models import check_model_config
    from pollinate.server.privacy_rounds import check_privacy_config
    from pollinate.server.progress_view import ProgressView
    from pollinate.server.round_events import listen
    from pollinate.server.report import rounds_table
    from pollinate.server.store import RoundStore, keep_password, withhold_password

    cfg, sim = load_scenario(scenario_of(args) or DEFAULT_SCENARIO, overrides_from_args(args), args.clients)
    cfg = absolute_locations(cfg)
    url, password = withhold_password(cfg.store.db)  # the run config goes to every node
    keep_password(url, password)  # the ServerApp runs in this process and opens the store with it
    cfg = cfg.replace(**{"store.db": url})
    check_privacy_config(cfg, strategies.build(cfg))  # fail fast on an unknown or incompatible strategy, or model
    check_model_config(cfg.model)
    store = RoundStore(cfg.store.db)  # fail fast on an unreachable database
    work = Path(cfg.store.output_dir) / f"simulation-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    cfg, sizes = write_node_data(cfg, sim, work / "partitions")
    console.print(f"simulating {sim.clients} clients ({cfg.data.partitioning} split of {cfg.data.dataset}: "
                  f"{sizes} examples), {cfg.federation.rounds} rounds of {cfg.federation.strategy}", soft_wrap=True)
    # The ServerApp runs in a thread of this process: its round events reach the view directly.
    with ProgressView(console) as view, listen(view):
        engine.run(cfg, sim.clients, work / "app", cpus_per_client=sim.cpus_per_client,
                   gpus_per_client=sim.gpus_per_client, client_app=sim.client_app)
    # Ours is the run that reads our partitions (a directory per invocation): other runs may share this store.
    new = [r for r in store.runs() if r.config.get("data.partition-dir") == cfg.data.partition_dir]
    if not new:
        console.print("[red]the simulation ended without recording a run; see the log above[/]")
        return 1
    run = new[-1]
    console.print(rounds_table(store, run.id))
    console.print(f"round store: {store.url} (run {run.id}, status {run.status})", soft_wrap=True)
    if run.status != "completed":
        console.print(f"[red]run {run.id} failed: {run.error}[/]", soft_wrap=True)
        return 1
    console.print(f"PEFT adapter: {run.adapter_dir}  (PeftModel.from_pretrained(base, that directory))")
    db = "" if store_url(None) == store.url else f" --db {store.url}"  # the command as short as it can be
    console.print(f"plots and a report page: pollinate report {run.id}{db}", soft_wrap=True)
    return 0
