"""SecAgg+ messages on the wire: each ``secagg.messages`` dataclass <-> one Flower ``ConfigRecord``.

Fields map one-to-one onto ConfigRecord values (ints, floats, bytes and lists of them); the masked
vector of ``MaskedInput`` travels as one raw little-endian ``Array`` (no parser, as for adapters).
Decoding rebuilds the dataclass, whose constructor checks types and sizes, so a malformed message
becomes a ``SecAggError`` that says what is wrong, never an exception from deep inside the protocol.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from pollinate.proto.adapter_record import RAW_STYPE
from pollinate.secagg.messages import MaskedInput, SecAggError

SECAGG = "secagg"  # ConfigRecord: the stage's SecAgg+ message
MASKED = "masked"  # ArrayRecord: the masked vector (stage 3 reply)
LAYOUT = "secagg-layout"  # ConfigRecord (stage 1): names and sizes of the upload, in vector order
WEIGHT = "secagg-weight"  # ConfigRecord of stage 3: the node's weight n_k / N
CLIPPED = "secagg-clipped"  # MetricRecord of a stage-3 reply: how many weighted values the node clipped
STAGE_ACTIONS = ("secagg_share", "secagg_mask", "secagg_unmask")  # train.<action> of stages 2..4

M = TypeVar("M")


def to_config(message: object) -> ConfigRecord:
    """The dataclass's fields as a ConfigRecord (MaskedInput's vector goes through ``masked_to_record``)."""
    values = {}
    for f in fields(message):  # type: ignore[arg-type]
        if f.name != "masked":
            value = getattr(message, f.name)
            values[f.name] = list(value) if isinstance(value, list) else value
    return ConfigRecord(values)


def from_config(cls: type[M], record: ConfigRecord | None, **extra: object) -> M:
    """Rebuild a ``cls`` message from its ConfigRecord; ``SecAggError`` when fields are missing or malformed."""
    name = cls.__name__
    if record is None:
        raise SecAggError(f"the message carries no '{SECAGG}' record; expected a {name}")
    wanted = {f.name for f in fields(cls)} - set(extra)  # type: ignore[arg-type]
    missing, unknown = sorted(wanted - set(record)), sorted(set(record) - wanted)
    if missing or unknown:
        raise SecAggError(f"{name} has missing fields {missing} and unknown fields {unknown}; "
                          f"sender and receiver run different pollinate versions?")
    values = {k: list(v) if isinstance(v, list) else v for k, v in record.items()}
    try:
        return cls(**values, **extra)
    except TypeError as err:
        raise SecAggError(f"malformed {name}: {err}") from err


def masked_to_record(message: MaskedInput) -> RecordDict:
    vector = np.ascontiguousarray(message.masked, dtype=message.masked.dtype.newbyteorder("<"))
    array = Array(dtype=str(vector.dtype.name), shape=(int(vector.size),), stype=RAW_STYPE, data=vector.tobytes())
    return RecordDict({SECAGG: to_config(message), MASKED: ArrayRecord({"masked": array})})


def masked_from_record(content: RecordDict, length: int, dtype: type[np.unsignedinteger]) -> MaskedInput:
    """The MaskedInput of a stage-3 reply, checked against the round's vector length and ring dtype."""
    record = content.array_records.get(MASKED)
    if record is None or list(record.keys()) != ["masked"]:
        raise SecAggError(f"a MaskedInput reply must carry exactly one array '{MASKED}/masked'")
    array = record["masked"]
    item = np.dtype(dtype).newbyteorder("<")
    if array.stype != RAW_STYPE or array.dtype != item.name or tuple(array.shape) != (length,) \
            or len(array.data) != length * item.itemsize:
        raise SecAggError(f"masked vector is {array.stype}/{array.dtype} {tuple(array.shape)} with "
                          f"{len(array.data)} bytes; expected {RAW_STYPE}/{item.name} ({length},)")
    masked = np.frombuffer(array.data, dtype=item).astype(dtype)
    return from_config(MaskedInput, content.config_records.get(SECAGG), masked=masked)


def layout_record(names: list[str], sizes: list[int]) -> ConfigRecord:
    return ConfigRecord({"names": names, "sizes": sizes})


def layout_from_record(record: ConfigRecord | None) -> list[tuple[str, int]]:
    if record is None or set(record) != {"names", "sizes"} or len(record["names"]) != len(record["sizes"]):
        raise SecAggError(f"the training message carries no valid '{LAYOUT}' record (names and sizes of the "
                          "upload); the server runs a different pollinate version?")
    return list(zip(record["names"], record["sizes"]))  # type: ignore[arg-type]
