"""The node's side of secure aggregation: the upload is computed as usual, then only ever sent masked.

Stage 1 (``begin``): instead of the upload, reply with this round's public keys; the upload waits,
flattened in the server's layout, in the node's own context. Stages 2-4 (``share``, ``mask``,
``unmask``) answer the server's SecAgg+ messages. The session (it holds private keys) and the upload
live in ``context.state``, which never leaves the node, because a ClientApp may be a fresh process
at every message.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from pollinate.proto.adapter_record import REPORT
from pollinate.proto.secagg_record import (CLIPPED, LAYOUT, SECAGG, WEIGHT, from_config, layout_from_record,
                                 masked_to_record, to_config)
from pollinate.secagg import ClientSession, NeighbourKeys, SecAggError, Setup, ShareDelivery, UnmaskRequest, quantize

SESSION = "secagg-session"  # context.state ConfigRecord: the ClientSession snapshot (private keys)
UPLOAD = "secagg-upload"  # context.state ArrayRecord: this exchange's upload, flattened, until it is masked


def requested(msg: Message) -> bool:
    """Does the server ask for this upload through secure aggregation?"""
    return SECAGG in msg.content.config_records


def begin(msg: Message, context: Context, tensors: Mapping[str, np.ndarray], report: MetricRecord) -> Message:
    """Stage 1: keep the upload here and reply with public keys (and the report) instead."""
    content = msg.content.config_records
    setup = from_config(Setup, content.get(SECAGG))
    layout = layout_from_record(content.get(LAYOUT))
    if sorted(name for name, _ in layout) != sorted(tensors):
        raise SecAggError(f"the server's upload layout names {sorted(n for n, _ in layout)[:3]}..., but this node "
                          f"computed {sorted(tensors)[:3]}...; refusing to upload")
    wrong = [name for name, size in layout if tensors[name].size != size]
    if wrong:
        raise SecAggError(f"upload tensors {wrong[:3]} do not have the sizes of the server's layout")
    vector = np.concatenate([np.asarray(tensors[name], dtype=np.float32).ravel() for name, _ in layout])
    if vector.size != setup.vector_length:
        raise SecAggError(f"the layout holds {vector.size} values, the setup says {setup.vector_length}")
    session = ClientSession(setup)
    public_keys = session.advertise_keys()
    context.state[SESSION] = ConfigRecord(session.snapshot())  # type: ignore[arg-type]
    context.state[UPLOAD] = ArrayRecord({"upload": Array(vector)})
    return Message(RecordDict({SECAGG: to_config(public_keys), REPORT: report}), reply_to=msg)


def share(msg: Message, context: Context) -> Message:
    """Stage 2: encrypted shares of this node's secrets for its neighbours."""
    session = _session(context)
    shares = session.share_keys(from_config(NeighbourKeys, msg.content.config_records.get(SECAGG)))
    context.state[SESSION] = ConfigRecord(session.snapshot())  # type: ignore[arg-type]
    return Message(RecordDict({SECAGG: to_config(shares)}), reply_to=msg)


def mask(msg: Message, context: Context) -> Message:
    """Stage 3: the upload, weighted, quantised (stochastic rounding) and masked."""
    session = _session(context)
    if UPLOAD not in context.state.array_records:
        raise SecAggError("asked to mask an upload, but this node holds none for this round")
    weight_record = msg.content.config_records.get(WEIGHT)
    weight = float(weight_record["weight"]) if weight_record is not None else float("nan")  # type: ignore[arg-type]
    if not 0.0 < weight <= 1.0:
        raise SecAggError(f"the server sent weight {weight}; a node's weight n_k / N must be in (0, 1]")
    upload = context.state.array_records[UPLOAD]["upload"].numpy()
    q = session.setup.quantization
    clipped = int(np.count_nonzero(np.abs(upload) > q.clip / weight))  # |w x| > c, without a float64 copy
    quantised = quantize(upload, weight, q, rng=np.random.default_rng(secrets.randbits(128)))
    masked = session.mask_input(from_config(ShareDelivery, msg.content.config_records.get(SECAGG)), quantised)
    context.state[SESSION] = ConfigRecord(session.snapshot())  # type: ignore[arg-type]
    del context.state[UPLOAD]  # masked and sent: the plain upload is no longer needed here
    reply = masked_to_record(masked)
    reply[CLIPPED] = MetricRecord({"count": clipped})
    return Message(reply, reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: shares of survivors' self-mask seeds and of dropped neighbours' masking keys, never both."""
    session = _session(context)
    shares = session.unmask(from_config(UnmaskRequest, msg.content.config_records.get(SECAGG)))
    del context.state[SESSION]  # the round is over for this node: forget its secrets
    return Message(RecordDict({SECAGG: to_config(shares)}), reply_to=msg)


def _session(context: Context) -> ClientSession:
    if SESSION not in context.state.config_records:
        raise SecAggError("this node holds no secure-aggregation session (it restarted mid-round, or the message "
                          "arrived out of order); it drops out of this round")
    return ClientSession.restore(dict(context.state.config_records[SESSION]))
