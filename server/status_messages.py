"""Round-store records -> pollinate.v1 status messages (proto/pollinate_status.proto)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from pollinate.proto import pollinate_status_pb2 as pb
from pollinate.server.store import RunSummary, StoredClientUpdate, StoredRound


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    # SQLite hands back naive datetimes; the store writes UTC.
    stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return stamp


def _metrics(values: Mapping[str, Any] | None) -> dict[str, float]:
    """Finite numeric metrics only: the store keeps NaN/Inf as null, which a proto double map cannot hold."""
    out = {}
    for key, value in (values or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def run_message(run: RunSummary, rounds_stored: int) -> pb.Run:
    message = pb.Run(id=run.id, status=run.status, strategy=run.strategy, model=run.model,
                     started_at=_timestamp(run.started_at), error=run.error or "", adapter_dir=run.adapter_dir or "",
                     initial_metrics=_metrics(run.initial_metrics), config_json=json.dumps(dict(run.config)),
                     rounds_stored=rounds_stored)
    if run.ended_at is not None:
        message.ended_at.CopyFrom(_timestamp(run.ended_at))
    return message


def round_message(row: StoredRound, clients: list[StoredClientUpdate] | None = None) -> pb.Round:
    message = pb.Round(run_id=row.run_id, number=row.number, participants=row.participants, accepted=row.accepted,
                       bytes_up=row.bytes_up, bytes_down=row.bytes_down, duration_s=row.duration_s,
                       metrics=_metrics(row.metrics), clients=[client_message(c) for c in clients or []])
    for name in ("train_loss", "eval_loss", "eval_accuracy"):
        if getattr(row, name) is not None:
            setattr(message, name, getattr(row, name))
    if row.adapter_sha256 is not None and row.adapter_nbytes is not None:
        message.adapter_sha256, message.adapter_bytes = row.adapter_sha256, row.adapter_nbytes
    return message


def client_message(row: StoredClientUpdate) -> pb.ClientUpdate:
    message = pb.ClientUpdate(node_id=str(row.node_id), phase=row.phase, status=row.status, reason=row.reason or "",
                              num_examples=row.num_examples, bytes_up=row.bytes_up, bytes_down=row.bytes_down,
                              metrics=_metrics(row.metrics))
    if row.rank is not None:
        message.rank = row.rank
    return message
