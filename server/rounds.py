"""One federated round over Flower's Grid: wait for nodes, sample, exchange, validate, evaluate.

``GridExchange`` is the only place where strategy ``Request``s become Flower ``Message``s
and replies become validated ``ClientUpdate``s. Every reply, accepted or not, leaves a
``ClientRecord`` (with the reason when rejected or failed) for the round store. A node's reply
is untrusted input: it is held against its exchange's schema (``proto.reply_schema``) before
anything in it is read, and whatever processing it raises rejects that node only.
``RoundExchange`` is what a strategy gets: replies one by one, or only their mean (in the
clear, or through secure aggregation), with the round's minimum-nodes rule applied to both.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from pollinate.privacy.csprng import poisson_sample
from pollinate.proto.adapter_record import (ADAPTER, INSTRUCTIONS, TensorSpec, UpdateRejected, from_record,
                                  payload_bytes, specs_of, to_record)
from pollinate.proto.generation_metrics import scores, sum_counts
from pollinate.proto.node_config import MAX_RANK
from pollinate.proto.reply_schema import TRAIN, check_reply
from pollinate.proto.run_config import FederationConfig
from pollinate.server.round_events import RoundEvent, emit
from pollinate.server.store import ClientRecord
from pollinate.server.update_bound import norm_limit, update_norm
from pollinate.server.weighting import round_weights
from pollinate.strategies import ClientUpdate, MeanUpdate, NamedArrays, Request
from pollinate.strategies.base import mean_of, with_instructions


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


def sample_nodes(nodes: Sequence[int], federation: FederationConfig, seed: int, round_number: int,
                 secret: bool = False) -> list[int]:
    """A sample of ``fraction-train`` of the nodes, never fewer than ``min-nodes``, seeded by the run's seed.

    ``secret`` (central DP): each node independently with probability q = ``fraction-train``, from the OS
    CSPRNG, as the accountant's Poisson amplification assumes (DP-FedAvg, McMahan et al. 2018). Neither the
    public seed nor min-nodes shapes it: a sample below min-nodes fails its round (nothing is released).
    """
    if secret:
        return sorted(poisson_sample(list(nodes), federation.fraction_train))
    k = min(len(nodes), max(federation.min_nodes, math.ceil(federation.fraction_train * len(nodes))))
    return sorted(random.Random(f"{seed}/{round_number}").sample(list(nodes), k))


CheckUpdate = Callable[[Request, NamedArrays], str | None]
RecordOutcome = Callable[..., None]  # (node, status, reason, **ClientRecord fields)
Scaling = Callable[[int], float]  # LoRA's s at a rank (StrategyContext.scaling)


@dataclass(frozen=True)
class Declaration:
    """What a node declared at the query exchange: its largest LoRA rank (0: no limit), its training examples."""

    max_rank: int
    num_examples: int


def rejection_reason(err: Exception) -> str:
    """The ledger's reason for a reply whose processing raised: the check's own message, or the unexpected error.

    Whatever one node sends must not end the run: an exception other than a rejection (a case no check
    foresaw) still only rejects that node's reply, with the exception's type and message.
    """
    if isinstance(err, UpdateRejected):
        return str(err)
    return f"the reply could not be processed ({type(err).__name__}: {node_text(str(err))}); it was rejected"


def node_text(text: str, limit: int = 1000) -> str:
    """Text a node chose (an error reason), safe for the ledger: printable, bounded (PostgreSQL refuses NUL)."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


def error_line(reason: str) -> str:
    """A node's error reason as one line. Flower wraps what a ClientApp raised as ``<class 'X'>:<'...'>``, in a
    simulation around "Exception ClientAppException occurred. Message: <the ClientApp's message>" and Ray's
    traceback; the line is the ClientApp's own message (or a traceback's last line). The traceback stays in the
    node's log."""
    text = reason.strip()
    wrapped = re.fullmatch(r"<class '[\w.]+'>:<'(.*)'>", text, re.DOTALL)
    if wrapped:
        text = wrapped.group(1).strip()
    marker = "occurred. Message: "
    if marker in text:
        text = text.split(marker, 1)[1]
        return next((line.strip() for line in text.splitlines() if line.strip()), reason.strip())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[-1]
    return " ".join(lines)


def ledger_text(reason: str | None) -> str | None:
    """A reason as the ledger stores it: whatever of a node's reply it quotes, printable and bounded."""
    return None if reason is None else node_text(reason, 2000)


def instructions_record(request: Request, round_number: int) -> ConfigRecord:
    """The request's instructions as the node receives them, stamped with the round."""
    return ConfigRecord(replace(request.instructions, round=round_number).to_record_values())


def send_and_collect(grid: Grid, contents: Mapping[int, RecordDict], message_type: str, round_number: int,
                     timeout: float, record: RecordOutcome) -> dict[int, Message]:
    """Send one message per node and return the one genuine reply of each node that answered.

    A reply to nothing sent in this call, a second reply to one message, a reply from another node
    than the one asked, an error reply (also the SuperLink's, for a node that died), or no reply within
    ``timeout``: each is recorded (rejected or failed, with the reason) and left out.
    """
    messages = {node: Message(content, dst_node_id=node, message_type=message_type, group_id=str(round_number))
                for node, content in contents.items()}
    down = {node: payload_bytes(c.array_records[ADAPTER]) if ADAPTER in c.array_records else 0
            for node, c in contents.items()}
    total = len(messages)
    emit(RoundEvent("exchange-start", round=round_number, exchange=message_type, total=total))
    replies = send_and_receive(grid, list(messages.values()), timeout, lambda done: emit(RoundEvent(
        "reply", round=round_number, exchange=message_type, done=done, total=total)))
    emit(RoundEvent("exchange-end", round=round_number, exchange=message_type, done=len(replies), total=total))
    sent = {msg.metadata.message_id: node for node, msg in messages.items()}
    out: dict[int, Message] = {}
    answered: set[str] = set()
    for reply in replies:
        key = reply.metadata.reply_to_message_id
        if key not in sent or key in answered:
            # A reply to nothing we sent this exchange, or a second reply to the same message: a replay.
            record(int(reply.metadata.src_node_id), "rejected",
                   "reply does not answer an open request of this exchange (replayed or stale)")
            continue
        answered.add(key)
        node = sent[key]
        if reply.has_error() and int(reply.metadata.src_node_id) == SUPERLINK_NODE_ID:
            # The SuperLink answers for a node that stopped sending heartbeats (died mid-round).
            record(node, "failed", f"node lost: {node_text(reply.error.reason)}", bytes_down=down[node])
        elif int(reply.metadata.src_node_id) != node:
            record(node, "rejected", f"reply came from node {reply.metadata.src_node_id}, not {node}",
                   bytes_down=down[node])
        elif reply.has_error():
            record(node, "failed", f"client error: {node_text(error_line(reply.error.reason))}", bytes_down=down[node],
                   metrics={"error-code": float(reply.error.code)})
        else:
            out[node] = reply
    for key, node in sent.items():
        if key not in answered:
            record(node, "failed", f"no reply within {timeout:.0f} s (node offline or too slow; "
                   f"federation.round-timeout)", bytes_down=down[node])
    return out


POLL_FIRST_S, POLL_MAX_S = 0.005, 1.0  # reply polling: quick for short exchanges, gentle on the SuperLink for long


def send_and_receive(grid: Grid, messages: list[Message], timeout: float,
                     on_replies: Callable[[int], None] | None = None) -> list[Message]:
    """``Grid.send_and_receive`` with polling that backs off from 5 ms to 1 s; ``on_replies(n)`` whenever the
    replies in so far grow to n (the progress of the exchange).

    Flower's own sleeps a fixed 0.1 s (Simulation Engine) or 3 s (deployment) between polls: one such wait
    per exchange, which a SecAgg+ round pays four times (docs/secagg-bench.md, "where the time goes").
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = POLL_FIRST_S
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies += pulled
        if pulled and on_replies is not None:
            on_replies(len(replies))
        pending -= {reply.metadata.reply_to_message_id for reply in pulled}
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(wait, left))
        wait = min(wait * 1.5, POLL_MAX_S)
    return replies


class GridExchange:
    """Sends one ``Request`` per node as a Flower message and returns the validated replies.

    A reply is accepted when it fits its exchange's schema (``proto.reply_schema``: records, report keys,
    types, ranges, num-examples at most the node's ``declared`` count), its tensors have exactly the names
    and shapes expected (the request's, or its ``reply_shapes``) and finite values, ``check_update`` (the
    strategy's own rule, e.g. frozen factors unchanged) finds nothing wrong, and its update norm is within
    ``federation.update-bound`` (``server.update_bound``; training exchanges).
    """

    def __init__(self, grid: Grid, federation: FederationConfig, round_number: int, ledger: RoundLedger,
                 message_type: str = "train", replies_carry_tensors: bool = True,
                 check_update: CheckUpdate | None = None, declared: Mapping[int, int] | None = None,
                 scaling: Scaling | None = None) -> None:
        self.grid, self.federation, self.round_number, self.ledger = grid, federation, round_number, ledger
        self.message_type, self.replies_carry_tensors = message_type, replies_carry_tensors
        self.check_update, self.declared, self.scaling = check_update, declared or {}, scaling

    def __call__(self, requests: Mapping[int, Request]) -> list[ClientUpdate]:
        contents = {node: RecordDict({ADAPTER: to_record(request.tensors, self.federation.wire_dtype),
                                      INSTRUCTIONS: self.instructions(request)})
                    for node, request in requests.items()}
        replies = send_and_collect(self.grid, contents, self.message_type, self.round_number,
                                   self.federation.round_timeout, self._record)
        valid: dict[int, tuple[ClientUpdate, int, int]] = {}
        for node, reply in replies.items():
            down = payload_bytes(contents[node].array_records[ADAPTER])
            try:  # around one node's reply only: nothing in it may end the round for the others
                update, up = self._accept(node, reply, requests[node])
            except Exception as err:  # noqa: BLE001 - see rejection_reason
                self._record(node, "rejected", rejection_reason(err), bytes_down=down)
                continue
            valid[node] = (update, up, down)
        norms = self._bounded(valid, requests)
        updates = []
        for node, (update, up, down) in valid.items():
            metrics = {**update.metrics, "update-norm": norms[node]} if node in norms else update.metrics
            self._record(node, "accepted", None, num_examples=update.num_examples, bytes_up=up, bytes_down=down,
                         metrics=metrics, rank=update.rank or None)
            updates.append(update)
        return updates

    def _bounded(self, valid: dict[int, tuple[ClientUpdate, int, int]],
                 requests: Mapping[int, Request]) -> dict[int, float]:
        """Reject (and drop from ``valid``) the updates above ``federation.update-bound``; the norms of the rest."""
        if self.message_type != TRAIN or not self.replies_carry_tensors or self.federation.update_bound <= 0:
            return {}
        norms = {node: update_norm(self._as_received(requests[node]).tensors, update.tensors, self.scaling)
                 for node, (update, _, _) in valid.items()}
        limit = norm_limit(norms, self.federation.update_bound, self.federation.update_bound_mode)
        for node, norm in list(norms.items()):
            if limit is not None and norm > limit:
                rule = ("federation.update-bound" if self.federation.update_bound_mode == "absolute" else
                        f"{self.federation.update_bound:g} x the round's median norm")
                self._record(node, "rejected", f"update norm ||dW||_F = {norm:.4g} exceeds {limit:.4g} ({rule}); "
                             f"the update was rejected as an outlier", bytes_down=valid[node][2],
                             metrics={"update-norm": norm})
                del valid[node], norms[node]
        return norms

    def instructions(self, request: Request) -> ConfigRecord:
        return instructions_record(request, self.round_number)

    def _accept(self, node: int, reply: Message, request: Request) -> tuple[ClientUpdate, int]:
        """The validated update of one reply and its upload bytes; ``UpdateRejected`` with the reason."""
        report = check_reply(self.message_type, reply.content, self.declared.get(node))
        tensors, up = {}, 0
        if self.replies_carry_tensors:
            record = reply.content.array_records[ADAPTER]
            expected = ({k: TensorSpec(tuple(v)) for k, v in request.reply_shapes.items()}
                        if request.reply_shapes is not None else specs_of(request.tensors))
            tensors, up = from_record(record, expected=expected), payload_bytes(record)
            problem = self.check_update(self._as_received(request), tensors) if self.check_update else None
            if problem:
                raise UpdateRejected(problem)
        rank = request.instructions.rank
        # No count (a node under DP withholds it): 0, which server.weighting turns into an equal share.
        return ClientUpdate(node_id=node, tensors=tensors, num_examples=int(report.get("num-examples", 0)), rank=rank,
                            metrics=report), up

    def _as_received(self, request: Request) -> Request:
        """The request as the node decoded it (rounded through the wire dtype), for exact comparisons."""
        if self.federation.wire_dtype == "float32":
            return request
        wire = self.federation.wire_dtype
        return replace(request, tensors={k: v.astype(wire).astype("float32") for k, v in request.tensors.items()})

    def _record(self, node: int, status: str, reason: str | None, **kwargs: object) -> None:
        self.ledger.clients.append(ClientRecord(node_id=node, phase=self.message_type, status=status,
                                                reason=ledger_text(reason), **kwargs))  # type: ignore[arg-type]


class SecureMean(Protocol):
    """Computes the example-weighted mean of the replies to ``requests`` without seeing any one reply."""

    def __call__(self, requests: Mapping[int, Request], equal_weights: bool = False) -> MeanUpdate: ...


class PrivateMean(Protocol):
    """Client-level central DP: the clipped, noised mean of the replies (server/privacy_rounds.py)."""

    clip_norm: float

    def mean(self, requests: Mapping[int, Request], updates: Sequence[ClientUpdate]) -> MeanUpdate: ...

    def noised_mean(self, requests: Mapping[int, Request], mean: MeanUpdate) -> MeanUpdate: ...


class RoundExchange:
    """The ``strategies.Exchange`` of one round: every exchange must keep at least federation.min-nodes.

    ``reports`` keeps each contributing node's reports (num-examples, train-loss, ...) for the round
    record, merged over the round's exchanges: sketch's second exchange does not train, so its report has no
    train-loss, and the first one's is kept. With ``secure`` set, ``mean`` goes through secure aggregation and individual replies
    (``__call__``) are refused: a strategy that needs them is not linear and was refused before round 1.
    """

    def __init__(self, grid: Grid, federation: FederationConfig, round_number: int, ledger: RoundLedger,
                 check_update: CheckUpdate | None = None, secure: SecureMean | None = None,
                 private: PrivateMean | None = None, privacy_run_key: str = "",
                 declared: Mapping[int, int] | None = None, scaling: Scaling | None = None) -> None:
        """``declared``: each node's training examples as declared at the query exchange (the bound of its
        reports and, with federation.weighting = 'capped', of its weight); ``scaling``: LoRA's s at a rank."""
        self.min_nodes, self.round_number, self.ledger, self.secure = federation.min_nodes, round_number, ledger, secure
        self.private, self.privacy_run_key = private, privacy_run_key
        self.federation, self.declared = federation, dict(declared or {})
        self.grid_exchange = GridExchange(grid, federation, round_number, ledger, check_update=check_update,
                                          declared=self.declared, scaling=scaling)
        self.reports: dict[int, Mapping[str, float]] = {}

    def _keep_reports(self, reports: Mapping[int, Mapping[str, float]]) -> None:
        for node, report in reports.items():
            self.reports[node] = {**self.reports.get(node, {}), **report}

    def __call__(self, requests: Mapping[int, Request]) -> list[ClientUpdate]:
        """Each node's accepted reply, carrying its weight in this exchange (``server.weighting``)."""
        if self.secure is not None:
            raise RoundFailed("secure aggregation is on, but the strategy asked for individual replies; "
                              "use a linear strategy (`pollinate strategies`) or turn secagg.enabled off")
        updates = self.grid_exchange(self._keyed(requests))
        self._require(len(updates), len(requests))
        self._keep_reports({u.node_id: u.metrics for u in updates})
        weights = round_weights({u.node_id: u.num_examples for u in updates}, self.federation, self.declared)
        return [replace(u, weight=weights[u.node_id]) for u in updates]

    def mean(self, requests: Mapping[int, Request]) -> MeanUpdate:
        if self.secure is None:
            updates = self(requests)
            return self.private.mean(requests, updates) if self.private is not None else mean_of(updates)
        requests = self._keyed(requests)
        if self.private is not None:  # nodes clip their own deltas; the noise goes on the unmasked mean
            requests = {n: with_instructions(r, clip_norm=self.private.clip_norm) for n, r in requests.items()}
        mean = self.secure(requests, equal_weights=self.private is not None)
        self._require(len(mean.node_ids), len(requests))
        self._keep_reports(mean.node_metrics)
        return self.private.noised_mean(requests, mean) if self.private is not None else mean

    def _keyed(self, requests: Mapping[int, Request]) -> dict[int, Request]:
        """Requests carrying the run key nodes file their privacy budget under."""
        if not self.privacy_run_key:
            return dict(requests)
        return {n: with_instructions(r, privacy_run_key=self.privacy_run_key) for n, r in requests.items()}

    def _require(self, accepted: int, asked: int) -> None:
        if accepted < self.min_nodes:
            reasons = "; ".join(f"node {c.node_id}: {c.reason}" for c in self.ledger.failures())
            raise RoundFailed(f"round {self.round_number}: only {accepted} of {asked} updates were accepted, "
                              f"federation.min-nodes = {self.min_nodes}. {reasons}")


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)  # perplexity; causal-lm generation scores


def evaluate_global(grid: Grid, federation: FederationConfig, nodes: Sequence[int], request: Request,
                    round_number: int, ledger: RoundLedger, label_words: int = 0) -> Evaluation | None:
    """Federated evaluation of the strategy's evaluation request: the weighted mean of loss and accuracy.

    The weights follow federation.weighting (by evaluation examples, capped), so no node's report dominates.
    """
    exchange = GridExchange(grid, federation, round_number, ledger, message_type="evaluate",
                            replies_carry_tensors=False)
    reports = exchange({node: request for node in nodes})
    if not reports:
        return None
    weights = round_weights({u.node_id: u.num_examples for u in reports}, federation)
    loss = sum(u.metrics["loss"] * weights[u.node_id] for u in reports)
    accuracy = sum(u.metrics["accuracy"] * weights[u.node_id] for u in reports)
    metrics: dict[str, float] = {}
    if any("token-accuracy" in u.metrics for u in reports):  # a causal LM: loss is per token
        metrics["perplexity"] = math.exp(min(loss, 700.0))
        metrics["token-accuracy"] = sum(u.metrics.get("token-accuracy", 0.0) * weights[u.node_id] for u in reports)
    # Generation counts are sufficient statistics: summed, they score the pooled evaluation set exactly.
    generated = scores(sum_counts([u.metrics for u in reports]), label_words)
    metrics.update(generated)
    accuracy = generated.get("gen-accuracy", generated.get("gen-exact-match", accuracy))
    return Evaluation(loss=loss, accuracy=accuracy, num_examples=sum(u.num_examples for u in reports),
                      metrics=metrics)


def query_capacities(grid: Grid, federation: FederationConfig, nodes: Sequence[int], round_number: int,
                     ledger: RoundLedger) -> dict[int, Declaration]:
    """What each answering node declared (max-rank, training examples); nodes that do not answer are absent."""
    exchange = GridExchange(grid, federation, round_number, ledger, message_type="query",
                            replies_carry_tensors=False)
    return {u.node_id: Declaration(int(u.metrics.get(MAX_RANK, 0)), u.num_examples)
            for u in exchange({n: Request({}) for n in nodes})}


def mean_metric(reports: Mapping[int, Mapping[str, float]], key: str) -> float | None:
    """Example-weighted mean of a reported metric across nodes' reports (None when nobody reported it)."""
    pairs = [(r[key], r["num-examples"]) for r in reports.values() if key in r and "num-examples" in r]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None
