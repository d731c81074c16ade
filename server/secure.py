"""The coordinator's side of secure aggregation: ``RoundExchange.mean`` as four SecAgg+ exchanges.

1. ``train`` + Setup: each node trains as usual, keeps its upload, and answers with its public keys
   and its report (num-examples, train-loss travel in the clear);
2. ``train.secagg-share``: neighbours' public keys -> encrypted shares of the node's two secrets;
3. ``train.secagg-mask``: the shares addressed to the node and its weight n_k / N -> the masked,
   quantised, weighted upload;
4. ``train.secagg-unmask``: who survived and who dropped -> the shares needed to remove the masks.

The server learns sum_k w_k y_k over the nodes whose masked input arrived, dequantises it and
divides by their share of the weight: the weighted mean, as in the clear, within the quantisation
error of ``secagg.quantize`` (per value <= n c / 2^bits). The weights w_k are the server's own
(``server.weighting`` over the counts each node reported, each at most what it declared at the query
exchange), sent to each node in stage 3; none is read from a masked report. Every stage's reply is held
against its schema (``proto.reply_schema``) first, and the unmasked ring sum must lie within what n
quantised inputs in [-c, c] can sum to (docs/secure-aggregation.md, "What one node can still do").
The protocol itself is ``secagg.ServerSession``; this module only moves its messages through Flower's Grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from pollinate.proto.adapter_record import ADAPTER, INSTRUCTIONS, to_record
from pollinate.proto.message_size import message_bytes
from pollinate.proto.reply_schema import SECAGG_KEYS, check_reply
from pollinate.proto.run_config import FederationConfig, SecAggConfig
from pollinate.proto.secagg_record import (LAYOUT, SECAGG, STAGE_ACTIONS, WEIGHT, from_config, layout_record,
                                 masked_from_record, to_config)
from pollinate.secagg import (EncryptedShares, PublicKeys, Quantization, RoundConfig, SecAggError, ServerSession,
                    UnmaskShares, dequantize_sum, minimum_threshold, regular_graph, suggested_degree)
from pollinate.server.rounds import (RoundFailed, RoundLedger, instructions_record, ledger_text, rejection_reason,
                                     send_and_collect)
from pollinate.server.store import ClientRecord
from pollinate.server.weighting import round_weights
from pollinate.strategies import MeanUpdate, NamedArrays, Request

M = TypeVar("M", PublicKeys, EncryptedShares, UnmaskShares)


class SecureAggregation:
    """The example-weighted mean of one exchange's uploads, of which the server sees only the sum."""

    def __init__(self, grid: Grid, secagg: SecAggConfig, federation: FederationConfig, round_number: int,
                 ledger: RoundLedger, seed: int = 0, declared: Mapping[int, int] | None = None) -> None:
        """``federation``: the wire dtype, reply timeout and weighting of the stages; ``seed``: the run's, for the
        graph; ``declared``: each node's training examples as declared at the query exchange."""
        self.grid, self.secagg, self.federation, self.seed = grid, secagg, federation, seed
        self.declared = dict(declared or {})
        self._reported: dict[int, dict[str, float]] = {}  # this exchange's checked stage-1 reports
        self.round_number, self.ledger = round_number, ledger
        self.exchanges = 0
        self.clipped = 0  # weighted values clipped to [-c, c] by the nodes this round (secagg.clip-range)

    def __call__(self, requests: Mapping[int, Request], equal_weights: bool = False) -> MeanUpdate:
        """The mean of the uploads, weighted by examples (or equally: central DP's 1/m) over the survivors."""
        self.exchanges += 1
        try:
            return self._run(requests, equal_weights)
        except SecAggError as err:
            raise RoundFailed(f"round {self.round_number}: secure aggregation failed: {err}. If nodes dropped, "
                              f"start more nodes, or lower secagg.threshold (it must stay above half the degree) "
                              f"or raise secagg.degree") from err

    def _run(self, requests: Mapping[int, Request], equal_weights: bool) -> MeanUpdate:
        nodes = sorted(requests)
        layout = _layout(requests)
        session = ServerSession(self._round_config(nodes, sum(size for _, size, _ in layout)))
        index = {node: i for i, node in enumerate(nodes)}  # SecAgg ids: positions, never Flower node ids
        setups = session.setup()

        # Stage 1: train, then advertise keys.
        contents = {node: RecordDict({ADAPTER: to_record(requests[node].tensors, self.federation.wire_dtype),
                                      INSTRUCTIONS: instructions_record(requests[node], self.round_number),
                                      SECAGG: to_config(setups[index[node]]),
                                      LAYOUT: layout_record([n for n, _, _ in layout], [s for _, s, _ in layout])})
                    for node in nodes}
        reports = self._reported = {}

        def keys(node: int, reply: Message, report: dict[str, float]) -> None:
            session.receive_keys(_sent_by(index[node], PublicKeys, reply))
            reports[node] = report

        self._stage("train", contents, keys)
        # Stage 2: neighbours' keys -> encrypted shares.
        forwarded = session.forward_keys()
        self._stage(STAGE_ACTIONS[0], {node: RecordDict({SECAGG: to_config(forwarded[index[node]])})
                                       for node in nodes if index[node] in forwarded},
                    lambda node, reply, _: session.receive_shares(_sent_by(index[node], EncryptedShares, reply)))
        # Stage 3: shares + weight -> masked input. The weights are the server's, over the nodes still in the
        # round (U2): equal (central DP's 1/m) or by federation.weighting from the checked, declared-bounded counts.
        deliveries = session.route_shares()
        in_round = [node for node in nodes if index[node] in deliveries]
        weights = ({node: 1 / len(in_round) for node in in_round} if equal_weights else
                   round_weights({node: reports[node].get("num-examples", 0) for node in in_round}, self.federation,
                                 self.declared))
        q = session.config.quantization

        def masked(node: int, reply: Message, clipped: dict[str, float]) -> None:
            message = masked_from_record(reply.content, session.config.vector_length, q.dtype)
            if message.sender != index[node]:
                raise SecAggError(f"MaskedInput claims SecAgg id {message.sender}, but its node has id {index[node]}")
            session.receive_masked_input(message)
            self.clipped += int(clipped.get("count", 0))

        self._stage(STAGE_ACTIONS[1], {node: RecordDict({SECAGG: to_config(deliveries[index[node]]),
                                                         WEIGHT: ConfigRecord({"weight": weights[node]})})
                                       for node in in_round}, masked)
        # Stage 4: survivors and dropouts -> the shares that remove the masks.
        unmask = session.unmask_requests()
        self._stage(STAGE_ACTIONS[2], {node: RecordDict({SECAGG: to_config(unmask[index[node]])})
                                       for node in nodes if index[node] in unmask},
                    lambda node, reply, _: session.receive_unmask(_sent_by(index[node], UnmaskShares, reply)))
        total = session.aggregate()
        survivors = [nodes[i] for i in session.survivors]
        _check_sum(total, len(survivors), q, self.round_number)
        weight = sum(weights[node] for node in survivors)
        flat = dequantize_sum(total, len(survivors), q) / weight
        return MeanUpdate(_unflatten(flat, layout), tuple(survivors),
                          int(sum(reports[node].get("num-examples", 0) for node in survivors)),
                          {node: reports[node] for node in survivors})

    def _round_config(self, nodes: list[int], length: int) -> RoundConfig:
        sa, n = self.secagg, len(nodes)
        if n < 2:
            raise RoundFailed(f"round {self.round_number}: secure aggregation needs at least 2 nodes, "
                              f"{n} were sampled; lower nothing, start more nodes")
        graph = regular_graph(range(n), sa.degree or suggested_degree(n), seed=self.seed * 7919 + self.exchanges)
        degrees = {len(vs) for vs in graph.values()}
        threshold = sa.threshold or minimum_threshold(max(degrees))
        try:
            return RoundConfig(round_id=self.round_number * 16 + self.exchanges, neighbours=graph,
                               threshold=threshold, vector_length=length,
                               quantization=Quantization(sa.clip_range, 2**sa.bits, sa.modulus_bits))
        except ValueError as err:
            raise RoundFailed(f"round {self.round_number}: secure aggregation config does not fit {n} nodes: "
                              f"{err}") from err

    def _stage(self, action: str, contents: Mapping[int, RecordDict],
               accept: Callable[[int, Message, dict[str, float]], None]) -> None:
        """Send one stage's messages; check each reply against the stage's schema, hand it and its checked numbers
        (the report, or the clip count) to ``accept``; record every outcome in the ledger."""
        message_type = action if action == "train" else f"train.{action}"
        schema = SECAGG_KEYS if action == "train" else message_type

        def record(node: int, status: str, reason: str | None, **kwargs: object) -> None:
            self.ledger.clients.append(ClientRecord(node_id=node, phase=message_type, status=status,
                                                    reason=ledger_text(reason), **kwargs))  # type: ignore[arg-type]

        replies = send_and_collect(self.grid, contents, message_type, self.round_number,
                                   self.federation.round_timeout, record)
        for node, reply in replies.items():
            down = message_bytes(contents[node])
            try:  # around one node's reply only: a malformed stage reply rejects that node, never the round
                checked = check_reply(schema, reply.content, self.declared.get(node) if action == "train" else None)
                accept(node, reply, checked)
                up = message_bytes(reply.content)
            except Exception as err:  # noqa: BLE001 - SecAggError, UpdateRejected, or a case no check foresaw
                record(node, "rejected", str(err) if isinstance(err, SecAggError) else rejection_reason(err),
                       bytes_down=down)
                continue
            examples = self._reported.get(node, {}).get("num-examples", 0) if action == "train" else 0
            record(node, "accepted", None, bytes_up=up, bytes_down=down, num_examples=int(examples))


def _check_sum(total: np.ndarray, n: int, q: Quantization, round_number: int) -> None:
    """The unmasked ring sum of n honest inputs, each in [0, levels), is at most n (levels - 1): within n x the
    clip range once dequantised. Above it, a node sent ring elements outside the quantisation range; which one
    the server cannot tell (it sees only the sum), so the round's mean is refused."""
    limit = n * (q.levels - 1)
    if total.size and int(total.max()) > limit:
        raise RoundFailed(f"round {round_number}: the unmasked sum lies outside {n} x the clip range "
                          f"(+-{n} x secagg.clip-range): some node masked values outside the quantisation range, "
                          f"so the round's mean was refused. Nodes run unmodified pollinate clients only if they "
                          f"stay within it; see docs/secure-aggregation.md")


def _sent_by(secagg_id: int, cls: type[M], reply: Message) -> M:
    """Decode a stage reply and check it speaks for the node that sent it (no node answers for another)."""
    message = from_config(cls, reply.content.config_records.get(SECAGG))
    if message.sender != secagg_id:
        raise SecAggError(f"{cls.__name__} claims SecAgg id {message.sender}, but its node has id {secagg_id}")
    return message


def _layout(requests: Mapping[int, Request]) -> list[tuple[str, int, tuple[int, ...]]]:
    """(name, size, shape) of the upload in vector order; every node must upload the same layout."""
    layouts = set()
    for request in requests.values():
        shapes = request.reply_shapes if request.reply_shapes is not None \
            else {k: v.shape for k, v in request.tensors.items()}
        layouts.add(tuple((name, int(np.prod(shape, dtype=np.int64)), tuple(shape))
                          for name, shape in sorted(shapes.items())))
    if len(layouts) != 1:
        raise RoundFailed("secure aggregation sums one vector per node, but this strategy asks nodes for uploads "
                          "of different shapes; use a strategy whose uploads share one shape (linear strategies "
                          "in `pollinate strategies`)")
    return list(layouts.pop())


def _unflatten(flat: np.ndarray, layout: list[tuple[str, int, tuple[int, ...]]]) -> NamedArrays:
    out: NamedArrays = {}
    offset = 0
    for name, size, shape in layout:
        out[name] = flat[offset:offset + size].reshape(shape).astype(np.float32)
        offset += size
    return out
