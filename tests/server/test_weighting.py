"""federation.weighting: examples (today's FedAvg weights), equal, and capped (declared counts, water-filled share)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from pollinate.proto.run_config import RunConfig
from pollinate.server.weighting import capped_shares, round_weights
from pollinate.strategies import ClientUpdate
from pollinate.strategies.base import example_weights

COUNTS = st.dictionaries(st.integers(1, 2**62), st.integers(1, 2**31 - 1), min_size=1, max_size=12)
SHARES = st.floats(0.05, 1.0)


def _federation(weighting: str, share: float = 1.0):
    return RunConfig().replace(**{"federation.weighting": weighting, "federation.max-weight-share": share,
                                  "federation.min-nodes": 20}).federation  # any share >= 0.05 is valid


@given(counts=COUNTS, share=SHARES, weighting=st.sampled_from(["examples", "equal", "capped"]))
def test_weights_are_a_distribution_over_the_nodes(counts: dict[int, int], share: float, weighting: str) -> None:
    weights = round_weights(counts, _federation(weighting, share))
    assert set(weights) == set(counts) and math.isclose(sum(weights.values()), 1.0, rel_tol=1e-9)
    assert all(w >= 0 for w in weights.values())


@given(counts=COUNTS)
def test_examples_weighting_is_todays_fedavg_weighting(counts: dict[int, int]) -> None:
    weights = round_weights(counts, _federation("examples"))
    updates = [ClientUpdate(node, {}, n) for node, n in counts.items()]
    assert [weights[u.node_id] for u in updates] == example_weights(updates)


@given(counts=COUNTS, share=SHARES)
def test_capped_shares_never_exceed_the_cap_when_it_can_be_met(counts: dict[int, int], share: float) -> None:
    weights = round_weights(counts, _federation("capped", share))
    if share * len(counts) >= 1:
        assert max(weights.values()) <= share + 1e-12
    else:  # the cap cannot hold for so few nodes: the closest there is, equal weights
        assert all(math.isclose(w, 1 / len(counts)) for w in weights.values())


@given(counts=COUNTS, share=SHARES)
def test_capped_equals_examples_when_no_node_reaches_the_cap(counts: dict[int, int], share: float) -> None:
    examples = round_weights(counts, _federation("examples"))
    if max(examples.values()) <= share:
        capped = round_weights(counts, _federation("capped", share))
        assert all(math.isclose(capped[n], examples[n], rel_tol=1e-9) for n in counts)


@given(counts=COUNTS, share=SHARES)
def test_capped_keeps_the_order_of_the_counts(counts: dict[int, int], share: float) -> None:
    weights = round_weights(counts, _federation("capped", share))
    for a in counts:
        for b in counts:
            if counts[a] >= counts[b]:
                assert weights[a] >= weights[b] - 1e-12


@given(counts=COUNTS, share=SHARES, data=st.data())
def test_a_count_above_its_declaration_weighs_as_the_declaration(counts: dict[int, int], share: float,
                                                                  data: st.DataObject) -> None:
    declared = {n: data.draw(st.integers(1, c)) for n, c in counts.items()}
    assert round_weights(counts, _federation("capped", share), declared) == \
        round_weights(declared, _federation("capped", share))


def test_one_node_claiming_the_most_weighs_the_cap_and_the_others_share_the_rest() -> None:
    weights = capped_shares({1: 2**31 - 1, 2: 100, 3: 300, 4: 100}, 0.5)
    assert weights[1] == 0.5
    assert math.isclose(weights[3], 0.3) and math.isclose(weights[2], 0.1) and math.isclose(weights[4], 0.1)
