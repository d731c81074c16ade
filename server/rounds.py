"""One federated round over Flower's Grid: wait for nodes, sample, exchange, validate, evaluate.

``GridExchange`` is the only place where strategy ``Request``s become Flower ``Message``s
and replies become validated ``ClientUpdate``s. Every reply, accepted or not, leaves a
``ClientRecord`` (with the reason when rejected or failed) for the round store.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from proto.adapter_record import (ADAPTER, INSTRUCTIONS, REPORT, TensorSpec, UpdateRejected, from_record,
                                  payload_bytes, specs_of, to_record)
from proto.run_config import RunConfig
from server.store import ClientRecord
from strategies import ClientUpdate, NamedArrays, Request


class RoundFailed(RuntimeError):
    """A round could not complete (too few nodes or accepted updates); the message says what to do."""


@dataclass
class RoundLedger:
    """What happened to every node in every exchange of one round."""

    clients: list[ClientRecord] = field(default_factory=list)

    def bytes(self, direction: str) -> int:
        return sum(getattr(c, f"bytes_{direction}") for c in self.clients)

    def failures(self) -> list[ClientRecord]:
        return [c for c in self.clients if c.status != "accepted"]


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """Connected node ids once at least ``minimum`` are there; ``RoundFailed`` after ``timeout_s``.

    Flower's own sampling waits forever when too few nodes connect; a coordinator must not.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise RoundFailed(f"only {len(nodes)} of the {minimum} required nodes connected within {timeout_s:.0f} s; "
                              f"start more nodes (`pollinate client ...`), or lower federation.min-nodes, or raise "
                              f"federation.wait-for-nodes")
        time.sleep(poll_s)


def sample_nodes(nodes: Sequence[int], cfg: RunConfig, round_number: int) -> list[int]:
    """A seeded sample of ``fraction-train`` of the nodes, never fewer than ``min-nodes``."""
    k = min(len(nodes), max(cfg.federation.min_nodes, math.ceil(cfg.federation.fraction_train * len(nodes))))
    return sorted(random.Random(f"{cfg.seed}/{round_number}").sample(list(nodes), k))


CheckUpdate = Callable[[Request, NamedArrays], str | None]


class GridExchange:
    """Sends one ``Request`` per node as a Flower message and returns the validated replies.

    A reply is accepted when its tensors have exactly the names and shapes expected (the
    request's, or its ``reply_shapes``), finite values, a valid report, and ``check_update``
    (the strategy's own rule, e.g. frozen factors unchanged) finds nothing wrong.
    """

    def __init__(self, grid: Grid, cfg: RunConfig, round_number: int, ledger: RoundLedger,
                 message_type: str = "train", replies_carry_tensors: bool = True,
                 check_update: CheckUpdate | None = None) -> None:
        self.grid, self.cfg, self.round_number, self.ledger = grid, cfg, round_number, ledger
        self.message_type, self.replies_carry_tensors = message_type, replies_carry_tensors
        self.check_update = check_update

    def __call__(self, requests: Mapping[int, Request]) -> list[ClientUpdate]:
        sent: dict[str, tuple[int, Request, int]] = {}  # message id -> (node, request, bytes down)
        messages = []
        for node, request in requests.items():
            record = to_record(request.tensors, self.cfg.federation.wire_dtype)
            instructions = ConfigRecord(replace(request.instructions, round=self.round_number).to_record_values())
            msg = Message(RecordDict({ADAPTER: record, INSTRUCTIONS: instructions}), dst_node_id=node,
                          message_type=self.message_type, group_id=str(self.round_number))
            messages.append((msg, node, request, payload_bytes(record)))
        replies = list(self.grid.send_and_receive([m for m, *_ in messages], timeout=self.cfg.federation.round_timeout))
        for msg, node, request, down in messages:
            sent[msg.metadata.message_id] = (node, request, down)
        updates: list[ClientUpdate] = []
        answered: set[str] = set()
        for reply in replies:
            key = reply.metadata.reply_to_message_id
            if key not in sent or key in answered:
                # A reply to nothing we sent this exchange, or a second reply to the same message: a replay.
                self._record(int(reply.metadata.src_node_id), "rejected",
                             "reply does not answer an open request of this exchange (replayed or stale)")
                continue
            answered.add(key)
            node, request, down = sent[key]
            update = self._accept(node, reply, request, down)
            if update is not None:
                updates.append(update)
        for key, (node, _, down) in sent.items():
            if key not in answered:
                self._record(node, "failed", f"no reply within federation.round-timeout = "
                             f"{self.cfg.federation.round_timeout:.0f} s (node offline or too slow)", bytes_down=down)
        return updates

    def _accept(self, node: int, reply: Message, request: Request, down: int) -> ClientUpdate | None:
        if int(reply.metadata.src_node_id) != node:
            self._record(node, "rejected", f"reply came from node {reply.metadata.src_node_id}, not {node}",
                         bytes_down=down)
            return None
        if reply.has_error():
            self._record(node, "failed", f"client error: {reply.error.reason}", bytes_down=down)
            return None
        try:
            report = _report(reply)
            record = reply.content.array_records.get(ADAPTER)
            if not self.replies_carry_tensors:
                if record is not None:
                    raise UpdateRejected(f"a {self.message_type} reply must not carry tensors")
                tensors, up = {}, 0
            elif record is None:
                raise UpdateRejected("reply carries no adapter tensors")
            else:
                expected = ({k: TensorSpec(tuple(v)) for k, v in request.reply_shapes.items()}
                            if request.reply_shapes is not None else specs_of(request.tensors))
                tensors, up = from_record(record, expected=expected), payload_bytes(record)
                problem = self.check_update(self._as_received(request), tensors) if self.check_update else None
                if problem:
                    raise UpdateRejected(problem)
        except UpdateRejected as e:
            self._record(node, "rejected", str(e), bytes_down=down)
            return None
        rank = request.instructions.rank or None
        self._record(node, "accepted", None, num_examples=int(report["num-examples"]), bytes_up=up,
                     bytes_down=down, metrics=report, rank=rank)
        return ClientUpdate(node_id=node, tensors=tensors, num_examples=int(report["num-examples"]),
                            rank=rank or 0, metrics=report)

    def _as_received(self, request: Request) -> Request:
        """The request as the node decoded it (rounded through the wire dtype), for exact comparisons."""
        if self.cfg.federation.wire_dtype == "float32":
            return request
        wire = self.cfg.federation.wire_dtype
        return replace(request, tensors={k: v.astype(wire).astype("float32") for k, v in request.tensors.items()})

    def _record(self, node: int, status: str, reason: str | None, **kwargs: object) -> None:
        self.ledger.clients.append(ClientRecord(node_id=node, phase=self.message_type, status=status,
                                                reason=reason, **kwargs))  # type: ignore[arg-type]


def _report(reply: Message) -> dict[str, float]:
    """The client's MetricRecord, with a positive integer ``num-examples`` and finite metrics."""
    report = reply.content.metric_records.get(REPORT)
    if report is None:
        raise UpdateRejected(f"reply carries no '{REPORT}' metrics (num-examples is required)")
    values = {k: float(v) for k, v in report.items() if isinstance(v, int | float)}
    n = values.get("num-examples", 0.0)
    if not (n >= 1 and n == int(n)):
        raise UpdateRejected(f"num-examples = {report.get('num-examples')!r}; it must be a positive integer")
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise UpdateRejected(f"metrics {bad} are NaN/Inf")
    return values


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    num_examples: int


def evaluate_global(grid: Grid, cfg: RunConfig, nodes: Sequence[int], request: Request, round_number: int,
                    ledger: RoundLedger) -> Evaluation | None:
    """Federated evaluation of the strategy's evaluation request: example-weighted mean of loss and accuracy."""
    exchange = GridExchange(grid, cfg, round_number, ledger, message_type="evaluate", replies_carry_tensors=False)
    reports = exchange({node: request for node in nodes})
    total = sum(u.num_examples for u in reports)
    if total == 0:
        return None
    loss = sum(u.metrics["loss"] * u.num_examples for u in reports) / total
    accuracy = sum(u.metrics["accuracy"] * u.num_examples for u in reports) / total
    return Evaluation(loss=loss, accuracy=accuracy, num_examples=total)


def query_capacities(grid: Grid, cfg: RunConfig, nodes: Sequence[int], round_number: int,
                     ledger: RoundLedger) -> dict[int, int]:
    """Each answering node's announced max-rank (0: no limit); nodes that do not answer are absent."""
    exchange = GridExchange(grid, cfg, round_number, ledger, message_type="query", replies_carry_tensors=False)
    return {u.node_id: int(u.metrics.get("max-rank", 0)) for u in exchange({n: Request({}) for n in nodes})}


def mean_metric(updates: Sequence[ClientUpdate], key: str) -> float | None:
    """Example-weighted mean of a reported metric across updates (None when nobody reported it)."""
    pairs = [(u.metrics[key], u.num_examples) for u in updates if key in u.metrics]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None
