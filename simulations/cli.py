"""``pollinate simulate``: run a scenario on Flower's Simulation Engine and summarise it from the store."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from rich.console import Console

from pollinate.proto.run_config import PRIVACY_MODES, ConfigError, RunConfig, Scalar, flatten, load_toml, parse_assignments
from pollinate.simulations import engine

SCENARIOS = Path(__file__).parent / "scenarios"
DP_DEFAULT_STRATEGY = "ffa-lora"  # FFA-LoRA under DP (Sun et al. 2024): noise on one factor, exact aggregation
DEFAULT_SCENARIO = SCENARIOS / "default.toml"
console = Console(highlight=False, width=max(100, Console().width))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", default=str(DEFAULT_SCENARIO),
                        help="scenario TOML (a path, or a name in simulations/scenarios/); default: the default scenario")
    parser.add_argument("--clients", type=int, help="number of simulated nodes (scenario [simulation] clients)")
    parser.add_argument("--rounds", type=int, help="federation.rounds")
    parser.add_argument("--strategy", help="federation.strategy (see `pollinate strategies`)")
    parser.add_argument("--rank", type=int, help="adapter.r")
    parser.add_argument("--db", help="round store URL (store.db), e.g. sqlite:///pollinate.db")
    parser.add_argument("--output", help="where the adapter and partitions go (store.output-dir)")
    parser.add_argument("--data", help="your own CSV/JSONL corpus instead of the scenario's (data.dataset)")
    dp = parser.add_argument_group("differential privacy (privacy.*; docs/privacy-bench.md)")
    dp.add_argument("--dp", choices=[m for m in PRIVACY_MODES if m != "off"],
                    help="sample: DP-SGD on each client; central: client-level DP on the server; local: each client "
                         "noises its own upload (privacy.mode). Without --strategy the strategy becomes ffa-lora")
    dp.add_argument("--epsilon", type=float, help="the privacy budget (privacy.target-epsilon)")
    dp.add_argument("--delta", type=float, help="privacy.delta, below 1/n")
    dp.add_argument("--noise-multiplier", type=float, help="z (privacy.noise-multiplier; 0: calibrated from --epsilon)")
    dp.add_argument("--clip-norm", type=float, help="C: per-example gradient (sample) or adapter-delta (central, "
                                                    "local) bound (privacy.clip-norm)")
    dp.add_argument("--adaptive-clipping", action="store_true",
                    help="central: adapt C to the median delta norm (privacy.adaptive-clipping)")
    parser.add_argument("--secagg", action="store_true",
                        help="secure aggregation: the server learns only the sum of the uploads (secagg.enabled)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any run config key, e.g. --set train.lr=5e-4 (repeatable)")


def resolve_scenario(name: str) -> Path:
    path = Path(name)
    if not path.is_file() and (SCENARIOS / f"{name}.toml").is_file():
        return SCENARIOS / f"{name}.toml"
    return path


@dataclass(frozen=True)
class SimulationSettings:
    """The scenario's [simulation] table: how many nodes to simulate and with what."""

    clients: int = 4
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    client_app: str = engine.CLIENT_APP  # researchers may simulate their own (e.g. adversarial) ClientApp
    max_ranks: tuple[int, ...] = ()  # per simulated node, its max-rank (capacity); empty: no limit


def load_scenario(path: str | Path, overrides: Mapping[str, Scalar] | None = None,
                  clients: int | None = None) -> tuple[RunConfig, SimulationSettings]:
    """The run config and simulation settings of a scenario file, with flat-key overrides applied."""
    tree = load_toml(resolve_scenario(str(path)))
    sim = tree.pop("simulation", {})
    cfg = RunConfig.from_flat({**flatten(tree), **(overrides or {})})
    known = {f.name.replace("_", "-") for f in fields(SimulationSettings)}
    if set(sim) - known:
        raise ConfigError(f"unknown [simulation] key(s) {sorted(set(sim) - known)}; known: {sorted(known)}")
    settings = SimulationSettings(**{k.replace("-", "_"): tuple(v) if isinstance(v, list) else v
                                     for k, v in sim.items()})
    if clients is not None:
        settings = replace(settings, clients=clients)
    if settings.max_ranks and len(settings.max_ranks) != settings.clients:
        raise ConfigError(f"[simulation] max-ranks lists {len(settings.max_ranks)} ranks for {settings.clients} "
                          f"clients; give one per client")
    if settings.clients < cfg.federation.min_nodes:
        raise ConfigError(f"{settings.clients} clients cannot satisfy federation.min-nodes = "
                          f"{cfg.federation.min_nodes}; use --clients {cfg.federation.min_nodes} or more")
    return cfg, settings


def overrides_from_args(args: argparse.Namespace) -> dict[str, Scalar]:
    """Flat run-config keys from --set KEY=VALUE and the named flags (named flags win)."""
    flat = parse_assignments(args.set, "train.lr=5e-4")
    for key, value in (("federation.rounds", args.rounds), ("federation.strategy", args.strategy),
                       ("adapter.r", args.rank), ("store.db", args.db), ("store.output-dir", args.output),
                       ("data.dataset", args.data)):
        if value is not None:
            flat[key] = value
    if getattr(args, "secagg", False):
        flat["secagg.enabled"] = True
    for key, value in (("privacy.mode", args.dp), ("privacy.target-epsilon", args.epsilon),
                       ("privacy.delta", args.delta), ("privacy.noise-multiplier", args.noise_multiplier),
                       ("privacy.clip-norm", args.clip_norm)):
        if value is not None:
            flat[key] = value
    if args.adaptive_clipping:
        flat["privacy.adaptive-clipping"] = True
    if args.dp and "federation.strategy" not in flat:
        flat["federation.strategy"] = DP_DEFAULT_STRATEGY
        console.print(f"--dp {args.dp}: strategy {DP_DEFAULT_STRATEGY} (the default under DP: A frozen, so only B "
                      f"is trained and noised, and its mean is exact; --strategy NAME to change)")
    return flat


def write_node_data(cfg: RunConfig, sim: SimulationSettings, directory: Path) -> tuple[RunConfig, list[int]]:
    """Each simulated node's examples and settings (its max-rank) in ``directory``; the config that points the
    nodes at them (``data.partition-dir``), and each node's number of examples."""
    from pollinate.proto.node_config import write_node_settings
    from pollinate.simulations.datasets import load_corpus
    from pollinate.simulations.partition import write_partitions

    sizes = write_partitions(load_corpus(cfg.data.dataset), cfg.data, sim.clients, cfg.seed, directory)
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
    from pollinate.server.report import rounds_table
    from pollinate.server.store import RoundStore, withhold_password

    cfg, sim = load_scenario(args.scenario, overrides_from_args(args), args.clients)
    cfg = cfg.replace(**{"store.db": withhold_password(cfg.store.db)})  # the run config goes to every node
    check_privacy_config(cfg, strategies.build(cfg))  # fail fast on an unknown or incompatible strategy, or model
    check_model_config(cfg.model)
    store = RoundStore(cfg.store.db)  # fail fast on an unreachable database
    work = Path(cfg.store.output_dir) / f"simulation-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    cfg, sizes = write_node_data(cfg, sim, work / "partitions")
    console.print(f"simulating {sim.clients} clients ({cfg.data.partitioning} split of {cfg.data.dataset}: "
                  f"{sizes} examples), {cfg.federation.rounds} rounds of {cfg.federation.strategy}")
    engine.run(cfg, sim.clients, work / "app", cpus_per_client=sim.cpus_per_client,
               gpus_per_client=sim.gpus_per_client, client_app=sim.client_app)
    # Ours is the run that reads our partitions (a directory per invocation): other runs may share this store.
    new = [r for r in store.runs() if r.config.get("data.partition-dir") == cfg.data.partition_dir]
    if not new:
        console.print("[red]the simulation ended without recording a run; see the log above[/]")
        return 1
    run = new[-1]
    console.print(rounds_table(store, run.id))
    console.print(f"round store: {store.url} (run {run.id}, status {run.status})")
    if run.status != "completed":
        console.print(f"[red]run {run.id} failed: {run.error}[/]")
        return 1
    console.print(f"PEFT adapter: {run.adapter_dir}  (PeftModel.from_pretrained(base, that directory))")
    return 0
