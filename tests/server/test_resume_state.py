"""A run interrupted after round 1 and resumed from the round store ends bit-identical to one never interrupted:
the round loop's state (merged base deltas included) and each strategy's own state survive the store."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from pollinate import strategies
from pollinate.proto.run_config import RunConfig
from pollinate.server.resume import round_state, start_or_resume
from pollinate.server.store import RoundRecord, RoundStore
from pollinate.strategies import ClientUpdate, NamedArrays, Request
from pollinate.strategies.base import mean_of
from tests.support.adapters import adapter

NODES = {0: 30, 1: 10, 2: 20}  # node -> examples


class Nodes:
    """Deterministic nodes: round r's update of node k depends only on (k, r) and what it was sent."""

    def __init__(self, round_number: int) -> None:
        self.round_number = round_number

    def __call__(self, requests: Mapping[int, Request]) -> list[ClientUpdate]:
        out = []
        for node, request in requests.items():
            rng = np.random.default_rng([node, self.round_number])
            shapes = request.reply_shapes or {k: v.shape for k, v in request.tensors.items()}
            tensors = {k: request.tensors[k] + 0.1 * rng.standard_normal(shape).astype(np.float32)
                       for k, shape in sorted(shapes.items())}  # draws in name order, not dict order
            metrics = {"pruned-rank": 2.0} if node == 0 and self.round_number == 1 else {}  # hetlora self-pruning
            out.append(ClientUpdate(node, tensors, NODES[node], request.instructions.rank, metrics))
        return out

    def mean(self, requests: Mapping[int, Request]):
        return mean_of(self(requests))


def _round(strategy: strategies.Strategy, state: NamedArrays, number: int) -> NamedArrays:
    ranks = {node: strategy.assign_rank(node, 4) for node in NODES}
    return strategy.run_round(state, ranks, Nodes(number), number)


def _record(number: int) -> RoundRecord:
    return RoundRecord(number=number, participants=3, accepted=3, train_loss=None, eval_loss=None,
                       eval_accuracy=None, bytes_up=0, bytes_down=0, duration_s=0.0, clients=[])


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi", "hetlora", "flora", "fedex-lora", "flexlora"])
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(name: str, tmp_path: Path) -> None:
    cfg = RunConfig().replace(**{"federation.strategy": name, "adapter.r": 4, "adapter.alpha": 8.0,
                                 "store.db": f"sqlite:///{tmp_path / 'store.db'}"})
    initial = adapter(np.random.default_rng(0), 4)

    uninterrupted = strategies.build(cfg)
    expected = initial
    for number in (1, 2, 3):
        expected = _round(uninterrupted, expected, number)

    store = RoundStore(cfg.store.db)
    first = strategies.build(cfg)
    # The first coordinator's lease lasts 0 s: it has expired by the time the second one asks for it.
    start = start_or_resume(store, cfg, first, initial, flower_run_id=11, holder="first", lease_ttl_s=0.0)
    state = _round(first, start.state, 1)
    store.record_round(start.run_id, _record(1), first.export(state), round_state(state, first))
    # The coordinator dies here; a new one starts from the store with a fresh strategy and the initial adapter.
    resumed_cfg = cfg.replace(**{"store.resume-run": start.run_id})
    second = strategies.build(resumed_cfg)
    resumed = start_or_resume(store, resumed_cfg, second, initial, flower_run_id=22, holder="second",
                              lease_ttl_s=60.0)
    assert (resumed.run_id, resumed.first_round, resumed.resumed) == (start.run_id, 2, True)
    state = resumed.state
    for number in (2, 3):
        state = _round(second, state, number)

    assert state.keys() == expected.keys()
    assert all(np.array_equal(state[k], expected[k]) for k in expected), name
    assert [a.flower_run_id for a in store.attempts(start.run_id)] == [11, 22]


def test_without_the_stored_strategy_state_fedadam_would_diverge(tmp_path: Path) -> None:
    """The moments matter: the check above would catch a resume that restarted them from zero."""
    cfg = RunConfig().replace(**{"federation.strategy": "fedadam", "adapter.r": 4})
    initial = adapter(np.random.default_rng(0), 4)
    kept = strategies.build(cfg)
    state = _round(kept, initial, 1)
    forgetful = strategies.build(cfg)
    assert not np.array_equal(_round(kept, state, 2)[next(iter(state))], _round(forgetful, state, 2)[next(iter(state))])


def test_a_run_stored_before_per_strategy_options_resumes_with_its_own_strategy_options() -> None:
    from pollinate.proto.run_config import ConfigError
    from pollinate.server.resume import resumed_config

    today = RunConfig().replace(**{"federation.strategy": "fedprox"}).to_flat()
    # What an earlier pollinate stored: one shared bag of every strategy's options, no per-strategy keys.
    stored = {k: v for k, v in today.items() if not k.startswith("strategy.")}
    stored |= {"strategy.proximal-mu": 0.25, "strategy.server-lr": 0.5, "strategy.hetlora-prune": 0.1}
    with pytest.raises(ConfigError, match="strategy.fedprox.proximal-mu"):
        RunConfig.from_flat(stored)  # a new run with the old key is told the new one
    cfg = resumed_config(stored, {"federation.rounds": 5, "store.resume-run": 1})
    assert cfg.federation.strategy == "fedprox" and cfg.strategy.proximal_mu == 0.25
    assert cfg.federation.rounds == 5
    with pytest.raises(ConfigError, match="refused change"):  # the old value is the stored one: a change is refused
        resumed_config(stored, {"strategy.fedprox.proximal-mu": 0.5})
