"""Aggregation strategies by name: ``build(cfg)``, ``get("fedavg")``, ``names()``.

A third-party strategy is a ``strategies.base.Strategy`` subclass exposed under the
entry-point group ``pollinate.strategies`` (entry-point name = its CLI name).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.strategies.base import (AggregationError, ClientUpdate, Exchange, MeanUpdate, NamedArrays, NodeState,
                                       Request, Strategy, StrategyContext)
from pollinate.strategies.fedavg import FedAvg, FedProx
from pollinate.strategies.fedavgm import FedAvgM
from pollinate.strategies.fedex_lora import FedExLora
from pollinate.strategies.fedopt import FedAdam, FedYogi
from pollinate.strategies.fedsa_lora import FedSaLora
from pollinate.strategies.flexlora import FlexLora
from pollinate.strategies.flora import FLora
from pollinate.strategies.frozen_factor import FfaLora, RoLora
from pollinate.strategies.hetlora import HetLora
from pollinate.strategies.robust_clip import RobustClip
from pollinate.strategies.robust_coordinatewise import Median, TrimmedMean
from pollinate.strategies.robust_krum import MultiKrum
from pollinate.strategies.sketch import Sketch

ENTRY_POINT_GROUP = "pollinate.strategies"

_BUILTIN: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    FedAvg, FedProx, FedAdam, FedYogi, FfaLora, RoLora, FedSaLora, FedExLora, HetLora, FlexLora, FLora, Sketch,
    FedAvgM, RobustClip, TrimmedMean, Median, MultiKrum)}


def registry() -> dict[str, type[Strategy]]:
    """Built-in strategies plus those installed through the ``pollinate.strategies`` entry point."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = ep.load()
    return found


def builtin() -> dict[str, type[Strategy]]:
    """The strategies that ship with pollinate: their options make up the pyproject mirror."""
    return dict(_BUILTIN)


def names() -> list[str]:
    return sorted(registry())


def get(name: str) -> type[Strategy]:
    try:
        return registry()[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {names()} "
                          f"(`pollinate strategies` lists them with their properties)") from None


def context(cfg: RunConfig) -> StrategyContext:
    """The run's ``StrategyContext``; the server and every node build the same one from the run config."""
    # PEFT's scaling rule is part of the adapter config: read it once, here, for every strategy and the node.
    use_rslora = bool(cfg.adapter.option_dict.get("use_rslora", False))
    return StrategyContext(rank=cfg.adapter.r, alpha=cfg.adapter.alpha, seed=cfg.seed, options=cfg.strategy,
                           use_rslora=use_rslora, central_dp=cfg.privacy.mode == "central")


def build(cfg: RunConfig) -> Strategy:
    """The strategy ``cfg.federation.strategy``, checked against the adapter it must aggregate."""
    cls = get(cfg.federation.strategy)
    if cls.lora_factors and cfg.adapter.method.lower() not in ("lora", "dora"):
        raise ConfigError(f"strategy {cls.name!r} works on LoRA factors (A, B), but adapter.method = "
                          f"{cfg.adapter.method!r}; use adapter.method = 'lora' or a strategy such as fedavg")
    strategy = cls(context(cfg))
    if cfg.secagg.enabled and not strategy.linear:
        linear = sorted(n for n, c in registry().items() if c.linear)
        hint = " (or hetlora with strategy.hetlora.norm-weighting = false)" if cls.name == "hetlora" else ""
        raise ConfigError(f"strategy {cls.name!r} needs every node's own update, but with secagg.enabled the server "
                          f"learns only their sum; use a linear strategy: {linear}{hint}, or turn secure "
                          f"aggregation off")
    return strategy


__all__ = ["AggregationError", "ClientUpdate", "Exchange", "MeanUpdate", "NamedArrays", "NodeState", "Request",
           "Strategy", "StrategyContext", "build", "builtin", "context", "get", "names", "registry"]
