"""FedAvg over named adapter tensors: property tests against a dense reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.strategies import ClientUpdate, StrategyContext
from pollinate.strategies.fedavg import FedAvg, weighted_mean


def build_fedavg() -> FedAvg:
    return FedAvg(StrategyContext(rank=4, alpha=8.0))


def _updates(draw_seed: int, k: int, shapes: list[tuple[int, int]], counts: list[int]) -> list[ClientUpdate]:
    rng = np.random.default_rng(draw_seed)
    return [ClientUpdate(node_id=i, num_examples=counts[i],
                         tensors={f"t{j}": rng.standard_normal(s).astype(np.float32) for j, s in enumerate(shapes)})
            for i in range(k)]


shapes = st.lists(st.tuples(st.integers(1, 17), st.integers(1, 17)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 9), shapes=shapes, data=st.data())
def test_fedavg_equals_the_dense_weighted_average(seed: int, k: int, shapes, data) -> None:
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=k, max_size=k))
    updates = _updates(seed, k, shapes, counts)
    out = build_fedavg().aggregate({}, updates, 1)
    for name in updates[0].tensors:
        stacked = np.stack([u.tensors[name].astype(np.float64) for u in updates])
        reference = np.average(stacked, axis=0, weights=counts)
        np.testing.assert_allclose(out[name], reference, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 9), shapes=shapes, data=st.data())
def test_fedavg_of_identical_adapters_is_the_identity(seed: int, k: int, shapes, data) -> None:
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=k, max_size=k))
    one = _updates(seed, 1, shapes, [1])[0].tensors
    updates = [ClientUpdate(node_id=i, num_examples=c, tensors=one) for i, c in enumerate(counts)]
    out = build_fedavg().aggregate({}, updates, 1)
    for name, t in one.items():
        np.testing.assert_allclose(out[name], t, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(2, 7), shapes=shapes)
def test_fedavg_does_not_depend_on_client_order(seed: int, k: int, shapes) -> None:
    updates = _updates(seed, k, shapes, list(range(1, k + 1)))
    total = sum(u.num_examples for u in updates)
    forward = weighted_mean([u.tensors for u in updates], [u.num_examples / total for u in updates])
    backward = weighted_mean([u.tensors for u in updates[::-1]], [u.num_examples / total for u in updates[::-1]])
    for name in forward:  # equal up to float32 summation order
        np.testing.assert_allclose(forward[name], backward[name], rtol=1e-5, atol=1e-5)
