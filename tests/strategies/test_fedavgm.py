"""FedAvgM (server momentum) against a dense float64 reference of Hsu et al. 2019's recursion."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.strategies import AggregationError, ClientUpdate, StrategyContext
from pollinate.strategies.base import mean_of
from pollinate.strategies.fedavgm import FedAvgM

CTX = StrategyContext(rank=4, alpha=8.0)
SHAPES = {"t0": (3, 5), "t1": (7,)}


def _round(rng: np.random.Generator, k: int) -> list[ClientUpdate]:
    return [ClientUpdate(node_id=i, num_examples=int(rng.integers(1, 100)),
                         tensors={n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()})
            for i in range(k)]


def _weighted_mean(updates: list[ClientUpdate], name: str) -> np.ndarray:
    return np.average(np.stack([u.tensors[name].astype(np.float64) for u in updates]), axis=0,
                      weights=[u.num_examples for u in updates])


options = st.builds(FedAvgM.Options, momentum=st.floats(0.0, 0.99), server_lr=st.floats(0.05, 2.0))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), rounds=st.integers(1, 5), k=st.integers(1, 5), opts=options)
def test_fedavgm_follows_the_heavy_ball_recursion_on_the_fedavg_pseudo_gradient(seed: int, rounds: int, k: int,
                                                                                opts) -> None:
    rng = np.random.default_rng(seed)
    strategy = FedAvgM(replace(CTX, options=opts))
    x = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    x_ref = {n: v.astype(np.float64) for n, v in x.items()}
    v_ref = {n: np.zeros(s) for n, s in SHAPES.items()}
    for number in range(1, rounds + 1):
        updates = _round(rng, k)
        x = strategy.aggregate(x, updates, number)
        for n in SHAPES:  # v <- beta v + (x - mean); x <- x - eta v (Hsu et al. 2019)
            v_ref[n] = opts.momentum * v_ref[n] + (x_ref[n] - _weighted_mean(updates, n))
            x_ref[n] = x_ref[n] - opts.server_lr * v_ref[n]
        for n in SHAPES:
            np.testing.assert_allclose(x[n], x_ref[n], rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), rounds=st.integers(1, 4), k=st.integers(1, 5))
def test_fedavgm_without_momentum_at_unit_rate_is_fedavg(seed: int, rounds: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    strategy = FedAvgM(replace(CTX, options=FedAvgM.Options(momentum=0.0, server_lr=1.0)))
    x = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    for number in range(1, rounds + 1):
        updates = _round(rng, k)
        x = strategy.aggregate(x, updates, number)
        for n in SHAPES:
            np.testing.assert_allclose(x[n], _weighted_mean(updates, n), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), rounds=st.integers(2, 5), data=st.data(), opts=options)
def test_a_fedavgm_run_resumed_from_its_stored_momentum_continues_bit_exactly(seed: int, rounds: int, data,
                                                                              opts) -> None:
    rng = np.random.default_rng(seed)
    stop = data.draw(st.integers(1, rounds - 1))
    rounds_of_updates = [_round(rng, 3) for _ in range(rounds)]
    start = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    uninterrupted, x = FedAvgM(replace(CTX, options=opts)), dict(start)
    for number, updates in enumerate(rounds_of_updates, 1):
        x = uninterrupted.aggregate_mean(x, mean_of(updates), number)
    first, y = FedAvgM(replace(CTX, options=opts)), dict(start)
    for number, updates in enumerate(rounds_of_updates[:stop], 1):
        y = first.aggregate_mean(y, mean_of(updates), number)
    resumed = FedAvgM(replace(CTX, options=opts))  # a new coordinator: only the stored state and arrays survive
    resumed.load_state_arrays(first.state_arrays())
    for number, updates in enumerate(rounds_of_updates[stop:], stop + 1):
        y = resumed.aggregate_mean(y, mean_of(updates), number)
    assert all(np.array_equal(x[n], y[n]) for n in SHAPES)


def test_fedavgm_refuses_options_outside_their_range_and_foreign_stored_state() -> None:
    # Options come from the run config, where each key is checked against its declared range.
    for key, value in (("strategy.fedavgm.momentum", 1.0), ("strategy.fedavgm.server-lr", 0.0)):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flat({"federation.strategy": "fedavgm", key: value})
    cfg = RunConfig.from_flat({"federation.strategy": "fedavgm", "strategy.fedavgm.momentum": 0.5})
    assert cfg.strategy == FedAvgM.Options(momentum=0.5)
    assert FedAvgM(CTX).options == FedAvgM.Options()  # no options in the context: the defaults
    with pytest.raises(AggregationError, match="momentum"):
        FedAvgM(CTX).load_state_arrays({"m/t0": np.zeros(3, dtype=np.float32)})
