"""Every node reply is checked against its exchange's schema (proto/reply_schema.py) before the server reads it.

The first tests hold single replies against the schema; the fuzz test runs the server's real exchanges
(query, train, evaluate) against nodes scripted in this process, one of which forges its replies: hundreds of
draws per second, no model. The same forging against the real ClientApp is tests/server/test_hostile_nodes.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.privacy.ledger import REPORT_KEYS
from pollinate.proto.adapter_record import ADAPTER, REPORT, UpdateRejected, to_record
from pollinate.proto.reply_schema import (EVALUATE, MAX_EXAMPLES, QUERY, SCHEMAS, SECAGG_MASK, SECAGG_SHARE, TRAIN,
                                          check_reply)
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.proto.secagg_record import MASKED, SECAGG
from pollinate.server.rounds import RoundExchange, RoundLedger, evaluate_global, query_capacities
from pollinate.strategies import Request
from pollinate.strategies.base import example_weights, mean_of
from tests.support.apps.hostile_client import PLANS, Forge, array_of, forge_of
from tests.support.inprocess import InProcessGrid, serverapp_identity

SHAPES = {"m.lora_A.weight": (4, 30), "m.lora_B.weight": (20, 4), "head.weight": (2, 16)}


@pytest.fixture(autouse=True)
def identity():
    with serverapp_identity():
        yield


def _report(**values: float) -> RecordDict:
    return RecordDict({REPORT: MetricRecord(values)})  # type: ignore[arg-type]


def test_a_report_is_held_to_its_exchange_keys_types_and_ranges() -> None:
    assert check_reply(QUERY, _report(**{"num-examples": 12, "max-rank": 8})) == {"num-examples": 12.0,
                                                                                  "max-rank": 8.0}
    # A node under DP sends no count at all (docs/privacy.md): the key is optional, never malformed.
    assert check_reply(QUERY, _report(**{"max-rank": 8})) == {"max-rank": 8.0}
    cases = [
        (QUERY, _report(**{"num-examples": 0}), "num-examples = 0 in the query report; it must be an integer in [1, "),
        (QUERY, _report(**{"num-examples": 2.5}), "must be an integer"),
        (QUERY, _report(**{"num-examples": MAX_EXAMPLES + 1}), f"[1, {MAX_EXAMPLES}]"),
        (QUERY, _report(**{"num-examples": 3, "spare": 1.0}), "unknown key(s) ['spare']"),
        (EVALUATE, _report(**{"num-examples": 3, "loss": 0.5}), "lacks the required key(s) ['accuracy']"),
        (EVALUATE, _report(**{"num-examples": 3, "loss": float("nan"), "accuracy": 0.5}), "loss = nan"),
        (EVALUATE, _report(**{"num-examples": 3, "loss": 0.5, "accuracy": 1.5}), "accuracy = 1.5"),
        (EVALUATE, RecordDict(), "must carry the record(s) ['report']"),
        (EVALUATE, RecordDict({REPORT: MetricRecord({"num-examples": 3, "loss": 0.5, "accuracy": 0.5}),
                               ADAPTER: ArrayRecord()}), "may carry array records none, not ['adapter']"),
        (EVALUATE, RecordDict({REPORT: MetricRecord({"num-examples": 3, "loss": [0.5], "accuracy": 0.5})}),
         "is a list; it must be a number"),
        (TRAIN, _report(**{"num-examples": 3}), "must carry the record(s) ['adapter']"),
        (SECAGG_SHARE, RecordDict({SECAGG: ConfigRecord({"x": 1}), MASKED: ArrayRecord()}), "array records none"),
        (SECAGG_MASK, RecordDict({SECAGG: ConfigRecord({"x": 1})}), "must carry the record(s) ['masked']"),
    ]
    for exchange, content, reason in cases:
        with pytest.raises(UpdateRejected) as err:
            check_reply(exchange, content)
        assert reason in str(err.value), (exchange, str(err.value))


def test_a_training_report_may_not_exceed_what_the_node_declared() -> None:
    content = RecordDict({ADAPTER: ArrayRecord(), REPORT: MetricRecord({"num-examples": 101, "train-loss": 0.3})})
    assert check_reply(TRAIN, content)["num-examples"] == 101
    with pytest.raises(UpdateRejected, match=r"num-examples = 101 .*declared 100 training examples at the query"):
        check_reply(TRAIN, content, declared_examples=100)


def test_a_dp_release_is_reported_whole_or_not_at_all() -> None:
    assert set(SCHEMAS[TRAIN].all_or_none) == set(REPORT_KEYS)  # what privacy.ledger.entry_from_report reads
    whole = {"num-examples": 5, "dp-epsilon": 1.0, "dp-delta": 1e-5, "dp-noise-multiplier": 1.1, "dp-clip-norm": 1.0,
             "dp-sample-rate": 0.1, "dp-steps": 4}
    check_reply(TRAIN, RecordDict({ADAPTER: ArrayRecord(), REPORT: MetricRecord(whole)}))
    del whole["dp-steps"]
    with pytest.raises(UpdateRejected, match="come together or not at all"):
        check_reply(TRAIN, RecordDict({ADAPTER: ArrayRecord(), REPORT: MetricRecord(whole)}))


def test_a_round_too_small_for_the_weight_cap_weighs_its_nodes_equally() -> None:
    from pollinate.server.weighting import round_weights

    # A one-node-minimum federation is valid with the default cap (0.5); so is a cap no small round can meet.
    RunConfig().replace(**{"federation.min-nodes": 1})
    cfg = RunConfig().replace(**{"federation.min-nodes": 2, "federation.max-weight-share": 0.3})
    assert round_weights({1: 10, 2: 1000}, cfg.federation, {1: 10, 2: 1000}) == {1: 0.5, 2: 0.5}
    assert round_weights({1: 1000}, cfg.federation, {1: 1000}) == {1: 1.0}
    with pytest.raises(ConfigError, match="federation.update-bound"):
        RunConfig().replace(**{"federation.update-bound": 0.5})  # median mode: a multiple below 1


# ---- fuzz: the server's exchanges against one forging node ---------------------------------------------------


class ScriptedGrid(InProcessGrid):
    """Nodes in this process that answer honestly (a small change to what they were sent), one through ``forge``."""

    def __init__(self, nodes: list[int], hostile: int, forge: Forge) -> None:
        super().__init__({n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                          for n in nodes}, app=None)
        self.hostile, self.forge = hostile, forge
        self.rng = np.random.default_rng(0)

    def deliver(self, msg: Message) -> list[Message]:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        examples = 50 + node % 100
        if kind == "query":
            content = _report(**{"num-examples": examples, "max-rank": 0})
        elif kind == "train":
            record = msg.content.array_records[ADAPTER]
            sent = {k: np.frombuffer(a.data, "<f4").reshape(a.shape) for k, a in record.items()}
            trained = {k: v + 0.01 * self.rng.standard_normal(v.shape).astype(np.float32) for k, v in sent.items()}
            content = RecordDict({ADAPTER: to_record(trained),
                                  REPORT: MetricRecord({"num-examples": examples, "train-loss": 0.5})})
        else:
            content = _report(**{"num-examples": 20, "loss": 0.7, "accuracy": 0.5})
        if node == self.hostile:
            try:
                content = self.forge(kind, content)
            except Exception as e:  # what Flower's ClientApp runner would send for a handler that raised
                return [Message(Error(0, f"{type(e).__name__}: {e}"), reply_to=msg)]
        return [Message(content, reply_to=msg)]


@settings(max_examples=150, deadline=None)
@given(query=PLANS, train=PLANS, evaluate=PLANS, seed=st.integers(0, 2**16))
def test_no_reply_of_one_node_escapes_the_exchange_that_received_it(query, train, evaluate, seed: int) -> None:
    federation = RunConfig().replace(**{"federation.update-bound": 3.0, "federation.round-timeout": 1.0}).federation
    rng = np.random.default_rng(seed)
    nodes = sorted(int(n) for n in rng.choice(2**62, size=4, replace=False))
    hostile = nodes[seed % 4]
    grid, ledger = ScriptedGrid(nodes, hostile, forge_of({"query": query, "train": train, "evaluate": evaluate})), \
        RoundLedger()
    declared = {node: d.num_examples for node, d in query_capacities(grid, federation, nodes, 1, ledger).items()}
    # 0: the node declared no count (as a node under DP does); it then weighs nothing beside nodes that did.
    assert set(nodes) - {hostile} <= set(declared) and all(0 <= n <= MAX_EXAMPLES for n in declared.values())
    state = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    exchange = RoundExchange(grid, federation, 1, ledger, declared=declared, scaling=lambda r: 8 / r)
    updates = exchange({node: Request(state) for node in declared})
    weights = example_weights(updates)
    assert math.isclose(sum(weights), 1.0) and max(weights) <= federation.max_weight_share + 1e-9
    assert all(np.isfinite(v).all() for v in mean_of(updates).tensors.values())
    evaluation = evaluate_global(grid, federation, nodes, Request(state), 1, ledger)
    assert evaluation is not None and math.isfinite(evaluation.loss) and 0 <= evaluation.accuracy <= 1
    for record in ledger.clients:
        assert record.status == "accepted" if record.node_id != hostile else (record.status == "accepted"
                                                                              or record.reason), record
    if evaluate == "empty":
        assert [(c.status, c.phase) for c in ledger.clients if c.node_id == hostile][-1] == ("rejected", "evaluate")


def test_an_unforeseen_error_on_one_reply_rejects_that_node_with_the_error_and_the_round_goes_on() -> None:
    federation = RunConfig().replace(**{"federation.round-timeout": 1.0}).federation
    marker = 12345.0

    def forge(kind: str, content: RecordDict) -> RecordDict:
        head = np.frombuffer(content.array_records[ADAPTER]["head.weight"].data, "<f4").reshape(2, 16).copy()
        head[0, 0] = marker
        content.array_records[ADAPTER]["head.weight"] = array_of(head)
        return content

    def check_update(request: Request, tensors: dict[str, np.ndarray]) -> str | None:
        if tensors["head.weight"][0, 0] == marker:  # a bug we have not found, met by one reply
            raise ZeroDivisionError("float division by zero")
        return None

    grid, ledger = ScriptedGrid([11, 22, 33], hostile=33, forge=forge), RoundLedger()
    state = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    updates = RoundExchange(grid, federation, 1, ledger, check_update=check_update)({n: Request(state)
                                                                                      for n in (11, 22, 33)})
    assert sorted(u.node_id for u in updates) == [11, 22]
    [rejected] = [c for c in ledger.clients if c.status != "accepted"]
    assert rejected.node_id == 33 and "ZeroDivisionError: float division by zero" in (rejected.reason or "")


def test_what_a_reason_quotes_of_a_reply_is_printable_and_bounded() -> None:
    federation = RunConfig().replace(**{"federation.round-timeout": 1.0}).federation

    def forge(kind: str, content: RecordDict) -> RecordDict:
        record = content.array_records[ADAPTER]
        name = sorted(record)[0]
        record[name] = Array(dtype="float32", shape=record[name].shape, stype="\x00[/b]" * 10_000,
                             data=record[name].data)
        return content

    grid, ledger = ScriptedGrid([11, 22, 33], hostile=33, forge=forge), RoundLedger()
    state = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    RoundExchange(grid, federation, 1, ledger)({n: Request(state) for n in (11, 22, 33)})
    [rejected] = [c for c in ledger.clients if c.status != "accepted"]
    assert rejected.node_id == 33 and "has encoding" in (rejected.reason or "")
    assert (rejected.reason or "").isprintable() and len(rejected.reason or "") < 2100  # PostgreSQL refuses NUL
