"""The robustness bench's adversaries: pollinate's real ClientApp, with the replies or data of some nodes edited.

An attack on the reply is a function of what the node was sent and what it honestly trained
(``sent, trained -> uploaded``), applied to the train exchange's adapter; ``inflation`` also lies about the
node's example count, at the query exchange and in every train report. Label flipping edits no reply: it
rewrites the node's partition file before the run (``flip_labels``), so the node trains honestly on wrong labels.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pollinate.client.app import describe_node, evaluate_adapter, train_adapter
from pollinate.proto.adapter_record import ADAPTER, REPORT, from_record, to_record
from pollinate.proto.node_config import PARTITION_ID

NamedArrays = dict[str, np.ndarray]
Upload = Callable[[NamedArrays, NamedArrays, np.random.Generator], NamedArrays]  # (sent, trained, rng) -> uploaded
# The node claimed 10^12 examples; the reply schema caps a declaration at 2^31 - 1 and a report at the
# declaration, so the most a count can claim and still be accepted is 2^31 - 1, at both exchanges.
INFLATED_COUNT = 2**31 - 1


def _scaled(sent: NamedArrays, trained: NamedArrays, rng: np.random.Generator) -> NamedArrays:
    """The node's update (trained - sent) on every factor, times 100."""
    return {k: sent.get(k, 0) + 100.0 * (v - sent.get(k, 0)) for k, v in trained.items()}


def _sign_flip(sent: NamedArrays, trained: NamedArrays, rng: np.random.Generator) -> NamedArrays:
    """The node's update reversed: it pushes the model uphill by as much as it honestly would downhill."""
    return {k: sent.get(k, 0) - (v - sent.get(k, 0)) for k, v in trained.items()}


def _noise(sent: NamedArrays, trained: NamedArrays, rng: np.random.Generator) -> NamedArrays:
    """Gaussian noise of standard deviation 1 added to every uploaded entry (LoRA factors are ~0.1 in scale)."""
    return {k: v + rng.standard_normal(v.shape).astype(v.dtype) for k, v in trained.items()}


def _inflation(sent: NamedArrays, trained: NamedArrays, rng: np.random.Generator) -> NamedArrays:
    """The issue's dominating node: every lora_B entry set to 5 (its count is inflated in the report too)."""
    return {k: np.full_like(v, 5.0) if "lora_B" in k else v for k, v in trained.items()}


def _nan(sent: NamedArrays, trained: NamedArrays, rng: np.random.Generator) -> NamedArrays:
    """Every uploaded entry NaN."""
    return {k: np.full_like(v, np.nan) for k, v in trained.items()}


UPLOADS: dict[str, Upload] = {"scaled-x100": _scaled, "sign-flip": _sign_flip, "gaussian-noise": _noise,
                              "weight-inflation": _inflation, "nan": _nan}
ATTACKS = [*UPLOADS, "label-flip"]


def attacker_app(attack: str, adversaries: Collection[int], seed: int) -> ClientApp:
    """pollinate's ClientApp in which the nodes of partitions ``adversaries`` run ``attack`` on their replies."""
    app, upload, rng = ClientApp(), UPLOADS.get(attack), np.random.default_rng(seed)

    def hostile(context: Context) -> bool:
        return upload is not None and int(context.node_config[PARTITION_ID]) in adversaries

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        reply = describe_node(msg, context)
        if hostile(context) and attack == "weight-inflation" and not reply.has_error():
            reply.content.metric_records[REPORT]["num-examples"] = INFLATED_COUNT
        return reply

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = train_adapter(msg, context)
        if not hostile(context) or reply.has_error():
            return reply
        assert upload is not None
        sent = from_record(msg.content.array_records[ADAPTER])
        trained = from_record(reply.content.array_records[ADAPTER])
        content = RecordDict({ADAPTER: to_record(upload(sent, trained, rng)),
                              REPORT: reply.content.metric_records[REPORT]})
        if attack == "weight-inflation":
            content.metric_records[REPORT]["num-examples"] = INFLATED_COUNT
        return Message(content, reply_to=msg)

    app.evaluate()(evaluate_adapter)
    return app


def flip_labels(partition_dir: Path, partitions: Collection[int]) -> None:
    """Label flipping: every binary label of these partitions' files inverted (0 <-> 1), in place."""
    for i in partitions:
        path = partition_dir / f"partition-{i}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for row in rows:
            row["label"] = 1 - int(row["label"])
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
