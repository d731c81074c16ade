"""A scenario: a TOML file whose tables are the run config plus ``[simulation]`` (how many nodes, with what).

Both commands read scenarios (``pollinate simulate`` all of it; ``pollinate server`` the run config, ignoring
``[simulation]``), so loading one lives here, below both, and imports nothing but the run config schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from pollinate.proto.run_config import ConfigError, RunConfig, Scalar, flatten, load_toml
from pollinate.runtime.app_dir import CLIENT_APP

SCENARIOS = Path(__file__).parent / "scenarios"
DEFAULT_SCENARIO = SCENARIOS / "default.toml"


def resolve_scenario(name: str) -> Path:
    """A path as given, or the bundled scenario of that name (``heterogeneous`` -> scenarios/heterogeneous.toml)."""
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
    client_app: str = CLIENT_APP  # researchers may simulate their own (e.g. adversarial) ClientApp
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
