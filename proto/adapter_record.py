"""Adapter tensors on the wire: named numpy arrays <-> Flower ``ArrayRecord``, with validation.

Every exchange between the ServerApp and a ClientApp carries adapter tensors through
this module, and nothing else does. Tensors travel as raw little-endian bytes with
their dtype and shape in Flower's ``Array`` metadata (``stype = "pollinate.raw"``):
there is no parser on the receiving side, only a length check and ``np.frombuffer``,
so a hostile payload cannot run code and cannot claim more memory than the shape the
receiver expects. It also makes the upload exactly ``parameters x bytes per element``
plus the key names (no per-array npy header).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

NamedArrays = dict[str, np.ndarray]

RAW_STYPE = "pollinate.raw"
WIRE_DTYPES = ("float32", "float16")

# Names of the records inside a Message's RecordDict.
ADAPTER = "adapter"  # ArrayRecord: the adapter tensors
INSTRUCTIONS = "instructions"  # ConfigRecord: what the server asks of the client this round
REPORT = "report"  # MetricRecord: num-examples and metrics the client reports back


class UpdateRejected(ValueError):
    """A client upload failed validation; the message is the reason recorded in the round store."""


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects for one tensor: its shape (dtype is any of WIRE_DTYPES)."""

    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def specs_of(tensors: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(tuple(int(d) for d in t.shape)) for name, t in tensors.items()}


def to_record(tensors: Mapping[str, np.ndarray], wire_dtype: str = "float32",
              allowed: Iterable[str] | None = None) -> ArrayRecord:
    """Pack named tensors for sending. With ``allowed``, refuse any name outside it.

    The client passes its adapter's own key set as ``allowed``: that check is what
    makes it impossible for a base-model tensor (patient-derived or not) to leave the node.
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {wire_dtype!r} is not supported; use one of {WIRE_DTYPES}")
    refuse_outside(tensors, allowed)
    record = ArrayRecord()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype=np.dtype(wire_dtype).newbyteorder("<"))
        record[name] = Array(dtype=wire_dtype, shape=tuple(arr.shape), stype=RAW_STYPE, data=arr.tobytes())
    return record


def refuse_outside(tensors: Iterable[str], allowed: Iterable[str] | None) -> None:
    """Raise unless every name is in ``allowed`` (None: no restriction): only adapter tensors leave a node."""
    if allowed is None:
        return
    outside = sorted(set(tensors) - set(allowed))
    if outside:
        raise ValueError(f"refusing to send {len(outside)} tensor(s) that are not part of the adapter: "
                         f"{outside[:5]}; only adapter tensors may leave this node")


def from_record(record: ArrayRecord, expected: Mapping[str, TensorSpec] | None = None) -> NamedArrays:
    """Unpack and validate named tensors; raise ``UpdateRejected`` with a fixable reason.

    With ``expected`` (what the server sent this client), the key set and every shape
    must match exactly. Values must be finite. Returns float32 arrays.
    """
    if expected is not None:
        missing = sorted(set(expected) - set(record))
        unknown = sorted(set(record) - set(expected))
        if unknown:
            raise UpdateRejected(f"unknown tensor(s) {unknown[:3]} (+{max(0, len(unknown) - 3)} more) are not "
                                 f"part of the adapter this client was sent")
        if missing:
            raise UpdateRejected(f"missing tensor(s) {missing[:3]} (+{max(0, len(missing) - 3)} more) of the "
                                 f"adapter this client was sent")
    out: NamedArrays = {}
    for name, array in record.items():
        if array.stype != RAW_STYPE or array.dtype not in WIRE_DTYPES:
            raise UpdateRejected(f"tensor {name!r} has encoding {str(array.stype)[:60]}/{str(array.dtype)[:60]}; "
                                 f"expected {RAW_STYPE} with dtype in {WIRE_DTYPES} (upgrade the client)")
        shape = tuple(int(d) for d in array.shape)
        if expected is not None and shape != expected[name].shape:
            raise UpdateRejected(f"tensor {name!r} has shape {shape}, expected {expected[name].shape} "
                                 f"(the shape this client was sent)")
        dtype = np.dtype(array.dtype).newbyteorder("<")
        numel = int(np.prod(shape, dtype=np.int64))
        if len(array.data) != numel * dtype.itemsize:
            raise UpdateRejected(f"tensor {name!r} carries {len(array.data)} bytes, but shape {shape} of "
                                 f"{array.dtype} needs {numel * dtype.itemsize}")
        values = np.frombuffer(array.data, dtype=dtype).reshape(shape).astype(np.float32)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise UpdateRejected(f"tensor {name!r} holds {bad} NaN/Inf value(s), so the update cannot be averaged; "
                                 f"a node whose own training diverged sends this: lower train.lr")
        out[name] = values
    return out


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data plus key names: what one message's adapter costs on the wire."""
    return record.count_bytes()
