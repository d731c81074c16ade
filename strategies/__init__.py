"""Aggregation strategies by name: ``get("fedavg")``, ``names()``; third parties register an entry point.

A third-party strategy is a ``strategies.base.Strategy`` subclass exposed under the
entry-point group ``pollinate.strategies`` (name = the CLI name).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from proto.run_config import ConfigError
from strategies.base import AggregationError, ClientUpdate, Exchange, NamedArrays, Request, Strategy
from strategies.fedavg import FedAvg

ENTRY_POINT_GROUP = "pollinate.strategies"

_BUILTIN: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg,)}


def registry() -> dict[str, type[Strategy]]:
    """Built-in strategies plus those installed through the ``pollinate.strategies`` entry point."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = ep.load()
    return found


def names() -> list[str]:
    return sorted(registry())


def get(name: str) -> type[Strategy]:
    try:
        return registry()[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {names()} "
                       f"(`pollinate strategies` lists them with their properties)") from None


__all__ = ["AggregationError", "ClientUpdate", "Exchange", "NamedArrays", "Request", "Strategy", "get", "names",
           "registry"]
