"""The laws every registered strategy claims by its class facts, against a dense reference.

Each strategy runs two whole rounds (``run_round``) through an in-memory exchange whose nodes apply the
strategy's own node half (prepare_received -> train -> transform_upload, or answer; the reply guard), as
the ClientApp does. A strategy installed later, through the registry or its entry point, is covered here
without a change. The laws read the class facts, never a strategy's name:

- every strategy: each reply holds only the names its reply guard allows, in the shapes the server
  expects, and passes the strategy's own ``check_update``;
- ``exact``: the next global model (``export``, at PEFT's scaling for its rank) equals the sent base deltas
  plus sum_k p_k s(r_k) B_k A_k of what the nodes trained, to 1e-5, under both of PEFT's scaling rules;
- ``linear``: a round runs on means alone (the exchange refuses individual replies, as under SecAgg), and
  a strategy that aggregates one exchange gives the same state from ``aggregate_mean(mean_of(u))`` as
  from ``aggregate(u)``;
- ``heterogeneous_ranks``: every node trains at min(its capacity, R); otherwise every node at R, and a
  smaller capacity is refused.

The global rank R is min(d_out, d_in) = 10 of the test module. ``sketch`` is exact at any R too (the part of the
summed update past rank R is merged into the base): ``tests/strategies/test_strategy_math.py`` draws R below
sum_k r_k for it; flexlora, at such an R, keeps the best rank-R approximation and is not declared exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.proto.instructions import frozen_factor_tag
from pollinate.proto.run_config import ConfigError
from pollinate.strategies import ClientUpdate, MeanUpdate, NamedArrays, Request, Strategy, StrategyContext, registry
from pollinate.strategies.base import lora_rank, mean_of
from pollinate.strategies.merged import Deltas, split_deltas
from tests.support.adapters import HEAD, P, adapter, close, dense

R, ALPHA = 10, 8.0  # the test adapter's module is 12 x 10
SETTINGS = settings(max_examples=15, deadline=None)


def peft_scaling(rank: int, use_rslora: bool) -> float:
    """PEFT's LoraLayer.update_layer, written out: lora_alpha / sqrt(r) with use_rslora, else lora_alpha / r."""
    return ALPHA / math.sqrt(rank) if use_rslora else ALPHA / rank


class Node:
    """One node: the strategy's node half around a 'training' that moves every factor it may train at random."""

    def __init__(self, strategy: Strategy, node_id: int, num_examples: int, seed: int) -> None:
        self.strategy, self.node_id, self.num_examples = strategy, node_id, num_examples
        self.rng = np.random.default_rng([seed, node_id])
        self.state: dict[str, NamedArrays] = {}  # the node state the ClientApp keeps in Flower's context.state
        self.trained: NamedArrays = {}  # this round's trained adapter
        self.sent_deltas: Deltas = {}  # base deltas the server sent with this round's adapter
        self.trained_ranks: list[int] = []  # the rank of every adapter this node trained, in order

    def reply(self, request: Request) -> ClientUpdate:
        ins, metrics = request.instructions, {}
        if self.strategy.trains(ins):
            adapter_part, deltas = split_deltas(request.tensors)
            received = self.strategy.prepare_received(adapter_part, ins, self.state)
            frozen = frozen_factor_tag(ins.train_factors)
            self.trained = {k: v if frozen and frozen in k else v + 0.5 * self.rng.standard_normal(v.shape)
                            .astype(np.float32) for k, v in received.items()}
            self.sent_deltas, self.trained_ranks = deltas, [*self.trained_ranks, lora_rank(self.trained) or 0]
            tensors, metrics = self.strategy.transform_upload(self.trained, received, ins, self.state)
        else:
            tensors = self.strategy.answer(request.tensors, ins, self.state)
        assert set(tensors) <= self.strategy.upload_names(request.tensors, ins), "the reply guard would refuse it"
        expected = request.reply_shapes or {k: v.shape for k, v in request.tensors.items()}
        assert {k: v.shape for k, v in tensors.items()} == dict(expected), "the server would reject the reply"
        assert self.strategy.check_update(request, tensors) is None
        return ClientUpdate(self.node_id, tensors, self.num_examples, ins.rank, metrics)


class InMemoryExchange:
    """The server's exchange without a network; ``mean_only``: individual replies are refused, as under SecAgg."""

    def __init__(self, nodes: Mapping[int, Node], mean_only: bool = False) -> None:
        self.nodes, self.mean_only = nodes, mean_only

    def __call__(self, requests: Mapping[int, Request]) -> list[ClientUpdate]:
        assert not self.mean_only, "a linear strategy asked for the nodes' individual replies"
        return [self.nodes[node].reply(request) for node, request in requests.items()]

    def mean(self, requests: Mapping[int, Request]) -> MeanUpdate:
        return mean_of([self.nodes[node].reply(request) for node, request in requests.items()])


def _setting(name: str, seed: int, counts: list[int], capacities: list[int],
             use_rslora: bool) -> tuple[Strategy, dict[int, Node], dict[int, int]]:
    strategy = registry()[name](StrategyContext(rank=R, alpha=ALPHA, seed=seed, use_rslora=use_rslora))
    nodes = {i: Node(strategy, i, n, seed) for i, n in enumerate(counts, start=1)}
    caps = capacities if strategy.heterogeneous_ranks else [0] * len(counts)
    return strategy, nodes, {i: strategy.assign_rank(i, cap) for i, cap in zip(nodes, caps, strict=False)}


def _effective(strategy: Strategy, state: NamedArrays, use_rslora: bool) -> np.ndarray:
    """The module's whole update in the exported model: PEFT's scaling at the exported adapter's rank."""
    exported = strategy.export(state)
    return dense(exported, peft_scaling(lora_rank(exported) or R, use_rslora))


names = sorted(registry())
draws = dict(seed=st.integers(0, 2**31), counts=st.lists(st.integers(1, 60), min_size=1, max_size=4),
             capacities=st.lists(st.integers(1, R), min_size=4, max_size=4), use_rslora=st.booleans())


@pytest.mark.parametrize("name", names)
@SETTINGS
@given(**draws)
def test_every_strategy_keeps_its_declared_laws_over_two_rounds(name: str, seed: int, counts: list[int],
                                                                capacities: list[int], use_rslora: bool) -> None:
    strategy, nodes, ranks = _setting(name, seed, counts, capacities, use_rslora)
    if strategy.heterogeneous_ranks:
        assert ranks == {i: min(cap, R) for i, cap in zip(nodes, capacities, strict=False)}
    else:
        assert set(ranks.values()) == {R}
        with pytest.raises(ConfigError, match="max-rank"):
            strategy.assign_rank(1, R - 1)
    state = adapter(np.random.default_rng(seed), R)
    p = np.array(counts) / sum(counts)
    for number in (1, 2):
        # Linear strategies run on an exchange that offers only means: the server never sees one reply.
        state = strategy.run_round(state, ranks, InMemoryExchange(nodes, mean_only=strategy.linear), number)
        assert all(node.trained_ranks[-1] == ranks[i] and len(node.trained_ranks) == number
                   for i, node in nodes.items()), "every node trains once a round, at its assigned rank"
        if not strategy.exact:
            continue
        sent = next(iter(nodes.values())).sent_deltas.get(P)  # every node is sent the same base
        merged = 0.0 if sent is None else sent[1].astype(np.float64) @ sent[0].astype(np.float64)
        reference = merged + sum(w * dense(n.trained, peft_scaling(ranks[i], use_rslora))
                                      for w, (i, n) in zip(p, nodes.items(), strict=True))
        assert close(_effective(strategy, state, use_rslora), reference, tol=1e-5)
        head = sum(w * n.trained[HEAD].astype(np.float64) for w, n in zip(p, nodes.values(), strict=True))
        assert close(strategy.export(state)[HEAD], head, tol=1e-5)


def _is_linear(name: str) -> bool:
    return registry()[name](StrategyContext(rank=R, alpha=ALPHA)).linear


# Strategies that aggregate one exchange; those that run their own round are linear if the round above ran on means.
ONE_EXCHANGE = [n for n in names if _is_linear(n) and registry()[n].run_round is Strategy.run_round]


@pytest.mark.parametrize("name", ONE_EXCHANGE)
@SETTINGS
@given(**draws)
def test_a_linear_strategy_gives_the_same_state_from_the_mean_as_from_the_replies(
        name: str, seed: int, counts: list[int], capacities: list[int], use_rslora: bool) -> None:
    strategy, nodes, ranks = _setting(name, seed, counts, capacities, use_rslora)
    twin = registry()[name](strategy.ctx)  # a fresh instance: strategies with server state start equal
    state = adapter(np.random.default_rng(seed), R)
    updates = [nodes[i].reply(strategy.request(state, rank, 1)) for i, rank in ranks.items()]
    from_replies, from_mean = strategy.aggregate(state, updates, 1), twin.aggregate_mean(state, mean_of(updates), 1)
    assert from_replies.keys() == from_mean.keys()
    for k, v in from_replies.items():
        np.testing.assert_allclose(from_mean[k], v, rtol=1e-5, atol=1e-6)


def test_the_laws_cover_every_registered_strategy_and_each_class_fact() -> None:
    classes = registry().values()
    assert "fedavgm" in names and any(c.exact for c in classes) and any(c.heterogeneous_ranks for c in classes)
    assert ONE_EXCHANGE and any(_is_linear(n) and n not in ONE_EXCHANGE for n in names)
