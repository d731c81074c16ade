"""What every pollinate strategy is: pure math over named arrays plus a round recipe.

A strategy never sees Flower, torch or the database. The server hands it its state (the
global adapter, PEFT-named arrays at the run's rank ``adapter.r``), each sampled node's
assigned LoRA rank, and an ``exchange`` callable that sends one ``Request`` per node and
returns the validated ``ClientUpdate``s that came back (rejected or failed replies are
recorded by the server and simply absent). A round may call ``exchange`` more than once:
that is how two-exchange strategies fit without changing the server's round loop.

A *linear* strategy needs only the example-weighted mean of the replies. It asks for it with
``exchange.mean(requests)`` and never sees one node's reply: that is the seam where secure
aggregation (the server learns only the sum) and central DP (clip, then noise the mean) plug in.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np

from pollinate.proto.instructions import Instructions
from pollinate.proto.run_config import ConfigError
from pollinate.strategies.lowrank import lora_scaling

NamedArrays = dict[str, np.ndarray]
# What a strategy's node half keeps on one node between messages, by name (e.g. fedsa-lora's own B). The
# ClientApp persists it in Flower's context.state, which never leaves the node.
NodeState = MutableMapping[str, NamedArrays]


@dataclass(frozen=True)
class Request:
    """What the server sends one node in one exchange; ``reply_shapes`` when the reply differs from ``tensors``."""

    tensors: NamedArrays
    instructions: Instructions = field(default_factory=Instructions)
    reply_shapes: Mapping[str, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """A validated reply: the node's tensors, its example count, its rank and its reported metrics."""

    node_id: int
    tensors: NamedArrays
    num_examples: int
    rank: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    weight: float | None = None  # the server's weight basis (federation.weighting); None: num_examples


@dataclass(frozen=True)
class MeanUpdate:
    """The example-weighted mean of one exchange's replies: all a linear strategy needs, all SecAgg reveals.

    ``node_metrics`` are what each node reported beside its upload (num-examples, train-loss, ...):
    plain numbers that travel in the clear even under secure aggregation.
    """

    tensors: NamedArrays  # sum_k n_k y_k / sum_k n_k over ``node_ids``
    node_ids: tuple[int, ...]
    num_examples: int
    node_metrics: Mapping[int, Mapping[str, float]] = field(default_factory=dict)


class Exchange(Protocol):
    """How a strategy talks to the sampled nodes in one round (implemented by the server)."""

    def __call__(self, requests: Mapping[int, Request]) -> list[ClientUpdate]:
        """Each node's validated reply (the server sees every reply: not under secure aggregation)."""

    def mean(self, requests: Mapping[int, Request]) -> MeanUpdate:
        """Only the example-weighted mean of the replies (plain, or securely aggregated)."""


def mean_of(updates: Sequence[ClientUpdate]) -> MeanUpdate:
    """The ``MeanUpdate`` of individually received updates (what ``Exchange.mean`` computes in the clear)."""
    tensors = weighted_mean([u.tensors for u in updates], example_weights(updates))
    return MeanUpdate(tensors, tuple(u.node_id for u in updates), sum(u.num_examples for u in updates),
                      {u.node_id: dict(u.metrics) for u in updates})


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may know about the run: the global rank, LoRA alpha and scaling rule, the seed and its
    own options. The node builds the same context from the run config, so the node half agrees with the server."""

    rank: int
    alpha: float
    seed: int = 0
    options: Any = None  # an instance of the strategy's ``Options`` (None: its defaults)
    use_rslora: bool = False  # adapter.options use_rslora: PEFT scales by alpha / sqrt(r) instead of alpha / r
    central_dp: bool = False  # privacy.mode = 'central': every mean the strategy asks for is clipped and noised

    def scaling(self, rank: int) -> float:
        """LoRA's s at ``rank`` (the update is s * B @ A), by PEFT's rule for this run (``lowrank.lora_scaling``)."""
        return lora_scaling(self.alpha, rank, self.use_rslora)


class AggregationError(ValueError):
    """The updates of a round cannot be aggregated (none accepted, or inconsistent); says why."""


class Strategy(ABC):
    """A named aggregation strategy. Subclasses set the class facts and implement ``aggregate``.

    A strategy owns both halves: the server's math (``request``, ``run_round``, ``aggregate``...) and the
    node's steps around training (``prepare_received``, ``trains``, ``transform_upload``, ``answer``,
    ``upload_names``). The ClientApp calls the node hooks in a fixed order, on an instance built from the
    run config (``strategies.build``): they read only ``self.ctx``, their arguments and the node's state,
    never what the server instance carries from round to round.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool]  # aggregate equals the weighted mean of the clients' effective updates
    heterogeneous_ranks: ClassVar[bool]  # clients may train different LoRA ranks
    linear: ClassVar[bool]  # the server needs only a weighted sum of uploads (secure aggregation works)
    lora_factors: ClassVar[bool] = False  # works on LoRA's A and B (adapter.method lora or dora only)
    # Central DP (privacy.mode = 'central') clips and noises each ``exchange.mean`` as a mean of deltas of what the
    # nodes were sent. A rank-heterogeneous strategy is sent different tensors per node, so it qualifies only when
    # its nodes upload deltas of their own work themselves under ``ctx.central_dp`` (sketch).
    uploads_own_deltas: ClassVar[bool] = False
    private_means: ClassVar[int] = 1  # exchange.mean calls per round: each one is a release of the same sample

    @dataclass(frozen=True)
    class Options:
        """The strategy's options, run config keys ``strategy.<name>.<option>`` (``run_config.option``); none here."""

    def __init__(self, ctx: StrategyContext) -> None:
        if ctx.options is None:
            ctx = replace(ctx, options=self.Options())
        elif not isinstance(ctx.options, self.Options):
            raise ConfigError(f"strategy {self.name!r} takes its options as {self.Options.__qualname__}, "
                              f"got {type(ctx.options).__qualname__}")
        self.ctx = ctx
        self.options = ctx.options

    def assign_rank(self, node_id: int, capacity: int) -> int:
        """The rank a node trains, from the largest rank it announced (0: no limit)."""
        if capacity and capacity < self.ctx.rank:
            raise ConfigError(f"node {node_id} announced max-rank {capacity}, but {self.name} trains every node "
                              f"at adapter.r = {self.ctx.rank}; use a heterogeneous-rank strategy "
                              f"(`pollinate strategies`) or start the node with a larger --max-rank")
        return self.ctx.rank

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        """What one node at ``rank`` is sent to train this round."""
        return Request(state, Instructions(round=round_number, rank=rank))

    def run_round(self, state: NamedArrays, ranks: Mapping[int, int], exchange: Exchange,
                  round_number: int) -> NamedArrays:
        """One federated round: one training exchange, then ``aggregate_mean`` (linear) or ``aggregate``."""
        requests = {node: self.request(state, rank, round_number) for node, rank in ranks.items()}
        if self.linear:
            return self.aggregate_mean(state, exchange.mean(requests), round_number)
        return self.aggregate(state, exchange(requests), round_number)

    def check_update(self, request: Request, tensors: NamedArrays) -> str | None:
        """Why one node's reply to ``request`` must be rejected, or None. Default: frozen factors unchanged."""
        if request.instructions.train_factors == "all":
            return None
        frozen = 0 if request.instructions.train_factors == "B" else 1  # index into (A key, B key)
        for pair in lora_pairs(request.tensors).values():
            key = pair[frozen]
            if key in tensors and not np.array_equal(tensors[key], request.tensors[key]):
                return (f"{key} was sent frozen (instructions.train-factors = "
                        f"{request.instructions.train_factors!r}) but came back changed")
        return None

    # The node half. Order in the ClientApp: prepare_received -> train -> DP post-processing ->
    # transform_upload -> reply guard (upload_names); or, when the exchange does not train, answer.

    def prepare_received(self, tensors: NamedArrays, instructions: Instructions, node_state: NodeState) -> NamedArrays:
        """The adapter the node loads, from the one it received (training and evaluation). Default: as received."""
        return tensors

    def trains(self, instructions: Instructions) -> bool:
        """Whether this exchange trains; if not, the node replies with ``answer``. Default: every exchange trains."""
        return True

    def transform_upload(self, trained: NamedArrays, received: NamedArrays, instructions: Instructions,
                         node_state: NodeState) -> tuple[NamedArrays, dict[str, float]]:
        """What the node uploads from its trained adapter, and metrics to report beside it. Default: the adapter."""
        return trained, {}

    def answer(self, received: NamedArrays, instructions: Instructions, node_state: NodeState) -> NamedArrays:
        """The upload for an exchange that does not train (``trains`` is False)."""
        raise NotImplementedError(f"{self.name} trains in every exchange; it has no answer without training")

    def upload_names(self, sent: Iterable[str], instructions: Instructions) -> set[str]:
        """The only tensor names a node's reply to an exchange that sent ``sent`` may hold (the reply guard):
        by default the names it was sent, so no base-model tensor can leave the node."""
        return set(sent)

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        """The next state from this round's accepted updates; a linear strategy needs only their mean."""
        if not self.linear:
            raise NotImplementedError(f"{self.name} is not linear: it must implement aggregate()")
        return self.aggregate_mean(state, mean_of(updates), round_number)

    def aggregate_mean(self, state: NamedArrays, mean: MeanUpdate, round_number: int) -> NamedArrays:
        """The next state from the example-weighted mean of the replies (linear strategies implement this)."""
        raise NotImplementedError(f"{self.name} is not linear: it aggregates individual updates (aggregate())")

    def evaluation_request(self, state: NamedArrays) -> Request:
        """What every node evaluates after a round: the exported global adapter at its own rank."""
        adapter = self.export(state)
        return Request(adapter, Instructions(rank=lora_rank(adapter) or self.ctx.rank))

    def export(self, state: NamedArrays) -> NamedArrays:
        """The global adapter, PEFT-named at rank ``ctx.rank``: what is evaluated, stored and exported."""
        return state

    def state_arrays(self) -> NamedArrays:
        """What the strategy itself carries from round to round (e.g. server moments), stored with every round.

        The round loop's ``state`` is stored beside it; together they let a coordinator that died resume
        exactly. Default: nothing.
        """
        return {}

    def load_state_arrays(self, arrays: NamedArrays) -> None:
        """Take back what ``state_arrays`` returned after the last completed round (when a run resumes)."""
        if arrays:
            raise AggregationError(f"{self.name} keeps no state of its own, but the store holds {sorted(arrays)[:3]} "
                                   f"for it; the run was started by another version of this strategy")


def with_instructions(request: Request, **changes: object) -> Request:
    return replace(request, instructions=replace(request.instructions, **changes))


def weighted_mean(tensors: Sequence[NamedArrays], weights: Sequence[float]) -> NamedArrays:
    """sum_k w_k x_k per name, for weights that sum to 1; every input must hold the same names and shapes."""
    names = tensors[0].keys()
    out: NamedArrays = {}
    for name in names:
        acc = np.multiply(tensors[0][name], np.float32(weights[0]), dtype=np.float32)
        scratch = np.empty_like(acc)  # one buffer reused for every w_k x_k: no allocation per client
        for arrays, w in zip(tensors[1:], weights[1:], strict=True):
            np.multiply(arrays[name], np.float32(w), out=scratch)
            acc += scratch
        out[name] = acc
    return out


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Each update's share of the round (FedAvg's p_k = n_k / n; the server's ``weight`` when it set one)."""
    if not updates:
        raise AggregationError("no client update was accepted this round, so there is nothing to aggregate")
    basis = [u.num_examples if u.weight is None else u.weight for u in updates]
    total = sum(basis)
    if total <= 0:
        raise AggregationError("the accepted updates report 0 training examples in total")
    return [b / total for b in basis]


def lora_pairs(names: Sequence[str] | Mapping[str, object]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (lora_A key, lora_B key), from PEFT's state-dict names."""
    pairs: dict[str, tuple[str, str]] = {}
    for name in names:
        if name.endswith(".lora_A.weight"):
            prefix = name.removesuffix(".lora_A.weight")
            b = f"{prefix}.lora_B.weight"
            if b not in names:
                raise AggregationError(f"adapter has {name} but no {b}")
            pairs[prefix] = (name, b)
    return pairs


def lora_rank(tensors: Mapping[str, np.ndarray]) -> int | None:
    """The LoRA rank of an adapter (every module padded to one rank), or None when it has no LoRA factors."""
    ranks = {tensors[a].shape[0] for a, _ in lora_pairs(tensors).values()}
    if len(ranks) > 1:
        raise AggregationError(f"adapter mixes LoRA ranks {sorted(ranks)} across modules")
    return ranks.pop() if ranks else None
