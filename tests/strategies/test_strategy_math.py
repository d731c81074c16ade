"""Strategy-level identities on named arrays, checked against dense references (hypothesis).

Clients here are pure functions of what they are sent (their "training" adds a random update),
and the exchange is in memory (InMemoryExchange): the same two calls the server's RoundExchange offers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.proto.instructions import Instructions
from pollinate.strategies import ClientUpdate, Request, StrategyContext, build
from pollinate.strategies.base import MeanUpdate, lora_pairs, lora_rank, mean_of
from pollinate.strategies.fedex_lora import FedExLora
from pollinate.strategies.flexlora import FlexLora
from pollinate.strategies.flora import FLora
from pollinate.strategies.heterogeneous import at_rank
from pollinate.strategies.merged import add_to_deltas, fold_into_lora, split_deltas
from pollinate.strategies.sketch import Sketch
from tests.support.adapters import A, B, HEAD, P, adapter, close, dense

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(seed=st.integers(0, 2**31), r=st.integers(1, 6), r_k=st.integers(1, 6), rslora=st.booleans())
def test_a_node_at_a_lower_rank_is_sent_the_truncated_update(seed: int, r: int, r_k: int, rslora: bool) -> None:
    r_k = min(r, r_k)
    ctx = StrategyContext(rank=r, alpha=8.0, use_rslora=rslora)
    state = adapter(np.random.default_rng(seed), r)
    sent = at_rank(state, r_k, ctx)
    truncated = ctx.scaling(r) * state[B][:, :r_k].astype(np.float64) @ state[A][:r_k].astype(np.float64)
    assert close(dense(sent, ctx.scaling(r_k)), truncated)


@SETTINGS
@given(seed=st.integers(0, 2**31), ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_base_deltas_accumulate_exactly_and_stay_small(seed: int, ranks: list[int]) -> None:
    rng = np.random.default_rng(seed)
    deltas: dict = {}
    total = np.zeros((12, 10))
    for r in ranks:
        a, b = rng.standard_normal((r, 10)), rng.standard_normal((12, r))
        add_to_deltas(deltas, P, [a.astype(np.float32)], [b.astype(np.float32)])
        total += b @ a
    da, db = deltas[P]
    assert close(db.astype(np.float64) @ da, total)
    assert da.shape[0] <= min(sum(ranks), 10)


@SETTINGS
@given(seed=st.integers(0, 2**31), r=st.integers(1, 5), q=st.integers(1, 7))
def test_folding_deltas_into_one_lora_preserves_the_model(seed: int, r: int, q: int) -> None:
    rng = np.random.default_rng(seed)
    state = adapter(rng, r)
    deltas = {P: (rng.standard_normal((q, 10)).astype(np.float32), rng.standard_normal((12, q)).astype(np.float32))}
    folded, rank = fold_into_lora(state, deltas, StrategyContext(rank=r, alpha=8.0).scaling, rank=r)
    expected = deltas[P][1].astype(np.float64) @ deltas[P][0] + dense(state, 8.0 / r)
    assert rank == r + q and close(dense(folded, 8.0 / rank), expected)
    assert np.array_equal(folded[HEAD], state[HEAD])


def _updates(rng: np.random.Generator, ranks: list[int], counts: list[int]) -> list[ClientUpdate]:
    return [ClientUpdate(node_id=i, tensors=adapter(rng, r), num_examples=n, rank=r)
            for i, (r, n) in enumerate(zip(ranks, counts, strict=True))]


@SETTINGS
@given(seed=st.integers(0, 2**31), k=st.integers(1, 4), r=st.integers(1, 4))
def test_fedex_lora_base_plus_adapter_equals_the_mean_of_client_models(seed: int, k: int, r: int) -> None:
    rng = np.random.default_rng(seed)
    ctx = StrategyContext(rank=r, alpha=4.0)
    updates = _updates(rng, [r] * k, list(rng.integers(1, 50, size=k)))
    p = np.array([u.num_examples for u in updates]) / sum(u.num_examples for u in updates)
    state = FedExLora(ctx).aggregate(adapter(rng, r), updates, 1)
    adapter_part, deltas = split_deltas(state)
    effective = deltas[P][1].astype(np.float64) @ deltas[P][0] + dense(adapter_part, ctx.scaling(r))
    assert close(effective, sum(w * dense(u.tensors, ctx.scaling(r)) for w, u in zip(p, updates)))


@SETTINGS
@given(seed=st.integers(0, 2**31), ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_flora_merges_exactly_the_weighted_sum_of_products(seed: int, ranks: list[int]) -> None:
    rng = np.random.default_rng(seed)
    ctx = StrategyContext(rank=4, alpha=4.0)
    updates = _updates(rng, ranks, list(rng.integers(1, 50, size=len(ranks))))
    p = np.array([u.num_examples for u in updates]) / sum(u.num_examples for u in updates)
    state = FLora(ctx).aggregate(adapter(rng, 4), updates, 1)
    _, deltas = split_deltas(state)
    expected = sum(w * dense(u.tensors, ctx.scaling(u.rank)) for w, u in zip(p, updates))
    assert close(deltas[P][1].astype(np.float64) @ deltas[P][0], expected)


class InMemoryExchange:
    """The server's exchange without a network: ``answer`` plays every node; ``mean`` is computed in the clear."""

    def __init__(self, answer: Callable[[Mapping[int, Request]], list[ClientUpdate]]) -> None:
        self.answer = answer

    def __call__(self, requests: Mapping[int, Request]) -> list[ClientUpdate]:
        return self.answer(requests)

    def mean(self, requests: Mapping[int, Request]) -> MeanUpdate:
        return mean_of(self.answer(requests))


def _trained(request: Request, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A node's 'training': a random update of the factors it was sent."""
    return {k: v + 0.5 * rng.standard_normal(v.shape).astype(np.float32) for k, v in request.tensors.items()}


@SETTINGS
@given(seed=st.integers(0, 2**31), ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       global_rank=st.integers(1, 10))
def test_sketch_recovers_the_flexlora_target_exactly_through_two_summed_exchanges(seed: int, ranks: list[int],
                                                                                 global_rank: int) -> None:
    rng = np.random.default_rng(seed)
    # Any global rank R, also below the rank of the summed update (up to sum r_k): what the adapter cannot hold is
    # merged into the base deltas, so the exported model is the exact mean.
    ctx = StrategyContext(rank=global_rank, alpha=4.0)
    counts = {i: int(n) for i, n in enumerate(rng.integers(1, 50, size=len(ranks)))}
    sketch = Sketch(ctx)
    node_state: dict[int, dict] = {i: {} for i in counts}
    trained: dict[int, dict[str, np.ndarray]] = {}

    def answer(requests: Mapping[int, Request]) -> list[ClientUpdate]:
        out = []
        for node, request in requests.items():
            ins = request.instructions
            if sketch.trains(ins):
                trained[node] = _trained(request, rng)
                tensors, _ = sketch.transform_upload(trained[node], request.tensors, ins, node_state[node])
            else:
                tensors = sketch.answer(request.tensors, ins, node_state[node])
            assert set(tensors) <= sketch.upload_names(request.tensors, ins)
            out.append(ClientUpdate(node, tensors, counts[node], ins.rank))
        return out

    state = adapter(rng, ctx.rank)
    ranks_by_node = {i: min(r, global_rank) for i, r in enumerate(ranks)}
    new = sketch.run_round(state, ranks_by_node, InMemoryExchange(answer), round_number=1)
    total = sum(counts.values())
    target = sum(counts[n] / total * dense(trained[n], ctx.scaling(r)) for n, r in ranks_by_node.items())
    exported = sketch.export(new)
    assert close(dense(exported, ctx.scaling(lora_rank(exported))), target, tol=1e-3)
    adapter_part, deltas = split_deltas(new)
    assert lora_rank(adapter_part) == global_rank and (P in deltas) == (min(sum(ranks_by_node.values()), 10) > global_rank)
    head = sum(counts[n] / total * trained[n][HEAD] for n in counts)
    assert np.allclose(exported[HEAD], head, atol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 2**31), ranks=st.lists(st.integers(1, 3), min_size=1, max_size=3))
def test_flexlora_keeps_the_best_rank_r_approximation_of_the_summed_update(seed: int, ranks: list[int]) -> None:
    rng = np.random.default_rng(seed)
    ctx = StrategyContext(rank=3, alpha=4.0)
    updates = _updates(rng, ranks, [10] * len(ranks))
    new = FlexLora(ctx).aggregate(adapter(rng, 3), updates, 1)
    target = sum(dense(u.tensors, ctx.scaling(u.rank)) for u in updates) / len(updates)
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    assert close(dense(new, ctx.scaling(3)), best, tol=1e-3)


def test_build_refuses_factor_strategies_for_non_lora_adapters(tiny_cfg) -> None:
    import pytest

    from pollinate.proto.run_config import ConfigError

    with pytest.raises(ConfigError, match="works on LoRA factors"):
        build(tiny_cfg.replace(**{"adapter.method": "ia3", "federation.strategy": "flexlora"}))
    assert lora_pairs({A: 0, B: 0}) == {P: (A, B)}
    assert Instructions().upload == "adapter"


def test_hetlora_self_pruning_zeroes_the_tail_and_the_node_keeps_the_smaller_rank() -> None:
    from pollinate.strategies.hetlora import HetLora
    from pollinate.strategies.hetlora_math import prune_tail
    from pollinate.strategies.lowrank import pad_rank

    rng = np.random.default_rng(0)
    tensors = adapter(rng, 2)
    tensors[A], tensors[B] = pad_rank(tensors[A], tensors[B], 6)
    tensors[A][2:] += 1e-9  # a negligible tail
    pruned, rank = prune_tail(tensors, gamma=1e-6)
    assert rank == 2 and not pruned[A][2:].any() and not pruned[B][:, 2:].any()
    assert close(dense(pruned, 1.0), dense(tensors, 1.0))

    strategy = HetLora(StrategyContext(rank=6, alpha=6.0, options=HetLora.Options(prune=1e-6)))
    assert strategy.request(adapter(rng, 6), 6, 1).instructions.prune_gamma == 1e-6
    strategy.aggregate(adapter(rng, 6), [ClientUpdate(7, pruned, 10, 6, {"pruned-rank": 2.0})], 1)
    assert strategy.assign_rank(7, capacity=0) == 2 and strategy.assign_rank(8, capacity=0) == 6


@SETTINGS
@given(seed=st.integers(0, 2**31), ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4), rslora=st.booleans())
def test_linear_hetlora_mean_of_client_padded_uploads_equals_padding_on_the_server(seed: int, ranks: list[int],
                                                                                  rslora: bool) -> None:
    from pollinate.strategies.hetlora import HetLora

    rng = np.random.default_rng(seed)
    ctx = StrategyContext(rank=4, alpha=8.0, options=HetLora.Options(norm_weighting=False), use_rslora=rslora)
    strategy, state = HetLora(ctx), adapter(rng, 4)
    assert strategy.linear and strategy.request(state, 2, 1).instructions.upload_rank == 4
    updates = [ClientUpdate(node, _trained(Request(at_rank(state, r, ctx)), rng), int(rng.integers(1, 50)), r)
               for node, r in enumerate(ranks)]
    on_server = strategy.aggregate(state, updates, 1)

    def uploaded(u: ClientUpdate) -> dict[str, np.ndarray]:  # the node half pads it, as the ClientApp calls it
        return strategy.transform_upload(u.tensors, {}, strategy.request(state, u.rank, 1).instructions, {})[0]

    padded = [ClientUpdate(u.node_id, uploaded(u), u.num_examples, u.rank) for u in updates]
    on_clients = strategy.aggregate_mean(state, mean_of(padded), 1)
    assert on_clients.keys() == on_server.keys()
    for k in on_server:
        np.testing.assert_allclose(on_clients[k], on_server[k], rtol=1e-5, atol=1e-6)
