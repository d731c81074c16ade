"""What every pollinate strategy is: pure math over named arrays plus a round recipe.

A strategy never sees Flower, torch or the database. The server hands it the global
adapter, the sampled nodes and an ``exchange`` callable that sends one ``Request`` per
node and returns the validated ``ClientUpdate``s that came back (rejected or failed
replies are recorded by the server and simply absent). A round may call ``exchange``
more than once: that is how two-exchange strategies and secure aggregation fit
without changing the server's round loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

NamedArrays = dict[str, np.ndarray]
Scalar = bool | int | float | str


@dataclass(frozen=True)
class Request:
    """What the server sends one node in one exchange."""

    tensors: NamedArrays
    instructions: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """A validated reply: the node's tensors, its example count and its reported metrics."""

    node_id: int
    tensors: NamedArrays
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


Exchange = Callable[[Mapping[int, Request]], list[ClientUpdate]]


class AggregationError(ValueError):
    """The updates of a round cannot be aggregated (none accepted, or inconsistent); says why."""


class Strategy(ABC):
    """A named aggregation strategy. Subclasses set the class facts and implement ``aggregate``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool]  # aggregate equals the weighted mean of the clients' effective updates
    heterogeneous_ranks: ClassVar[bool]  # clients may train different LoRA ranks
    linear: ClassVar[bool]  # the server needs only a weighted sum of uploads (secure aggregation works)

    def run_round(self, global_adapter: NamedArrays, nodes: Sequence[int], exchange: Exchange) -> NamedArrays:
        """One federated round; the default is one training exchange, then ``aggregate``."""
        updates = exchange({node: Request(global_adapter) for node in nodes})
        return self.aggregate(global_adapter, updates)

    @abstractmethod
    def aggregate(self, global_adapter: NamedArrays, updates: Sequence[ClientUpdate]) -> NamedArrays:
        """The next global adapter from this round's accepted updates."""


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Each update's share of the round's examples (FedAvg's p_k = n_k / n)."""
    if not updates:
        raise AggregationError("no client update was accepted this round, so there is nothing to aggregate")
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise AggregationError("the accepted updates report 0 training examples in total")
    return [u.num_examples / total for u in updates]
