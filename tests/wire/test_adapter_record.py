"""Adapters on the wire: exact round trips, and every malformed upload rejected with its reason."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from pollinate.proto.adapter_record import RAW_STYPE, TensorSpec, UpdateRejected, from_record, payload_bytes, specs_of, to_record

A = "base_model.model.layer.0.query.lora_A.weight"
B = "base_model.model.layer.0.query.lora_B.weight"


def adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {A: rng.standard_normal((4, 64)).astype(np.float32), B: rng.standard_normal((64, 4)).astype(np.float32)}


def test_round_trip_is_exact_and_costs_parameters_times_element_size() -> None:
    tensors = adapter()
    record = to_record(tensors)
    back = from_record(record, expected=specs_of(tensors))
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
    params = sum(t.size for t in tensors.values())
    assert payload_bytes(record) == params * 4 + len(A) + len(B)


def test_float16_wire_halves_the_bytes_and_rounds_like_float16() -> None:
    tensors = adapter()
    record = to_record(tensors, "float16")
    back = from_record(record, expected=specs_of(tensors))
    assert payload_bytes(record) == sum(t.size for t in tensors.values()) * 2 + len(A) + len(B)
    assert np.array_equal(back[A], tensors[A].astype(np.float16).astype(np.float32))


def test_sender_refuses_a_tensor_outside_the_adapter() -> None:
    tensors = {**adapter(), "base_model.model.embeddings.word_embeddings.weight": np.zeros((10, 4), np.float32)}
    with pytest.raises(ValueError, match="refusing to send 1 tensor.*word_embeddings"):
        to_record(tensors, allowed=adapter().keys())


def _raw(values: np.ndarray, shape: tuple[int, ...] | None = None, dtype: str = "float32") -> Array:
    return Array(dtype=dtype, shape=shape or values.shape, stype=RAW_STYPE, data=values.tobytes())


@pytest.mark.parametrize("mutate, reason", [
    (lambda r: r.__setitem__(A, _raw(np.full((4, 64), np.nan, np.float32))), "NaN/Inf"),
    (lambda r: r.__setitem__(A, _raw(np.full((4, 64), np.inf, np.float32))), "NaN/Inf"),
    (lambda r: r.__setitem__(A, _raw(np.zeros((8, 64), np.float32))), "has shape (8, 64), expected (4, 64)"),
    (lambda r: r.__setitem__("extra", _raw(np.zeros(3, np.float32))), "unknown tensor(s) ['extra']"),
    (lambda r: r.__delitem__(B), "missing tensor(s)"),
    (lambda r: r.__setitem__(A, _raw(np.zeros(4 * 64 * 2, np.float32), shape=(4, 64))), "carries 2048 bytes"),
    (lambda r: r.__setitem__(A, _raw(np.zeros((4, 64), np.float64), dtype="float64")), "encoding"),
    (lambda r: r.__setitem__(A, Array(np.zeros((4, 64), np.float32))), "encoding numpy.ndarray"),
])
def test_malformed_uploads_are_rejected_with_a_reason(mutate, reason: str) -> None:
    tensors = adapter()
    record = to_record(tensors)
    mutate(record)
    with pytest.raises(UpdateRejected) as e:
        from_record(record, expected=specs_of(tensors))
    assert reason in str(e.value)


def test_oversized_claim_is_rejected_before_any_allocation() -> None:
    record = ArrayRecord()
    record[A] = Array(dtype="float32", shape=(4, 64), stype=RAW_STYPE, data=b"\0" * 16)
    with pytest.raises(UpdateRejected, match="carries 16 bytes"):
        from_record(record, expected={A: TensorSpec((4, 64))})


def test_message_bytes_counts_empty_values_that_flower_count_bytes_rejects() -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from pollinate.proto.message_size import message_bytes

    filled = ConfigRecord({"ids": [1, 2, 3], "key": b"\x00" * 32, "name": "fedavg", "mu": 0.5, "on": True})
    assert message_bytes(RecordDict({"c": filled})) == filled.count_bytes() == 3 * 8 + 32 + 6 + 8 + 1 + len("idskeynamemuon")
    # Our instructions carry "" (personal-factors) and unmasking requests [] (no dropped node):
    # Flower's own count raises on both; ours counts their keys.
    empty = ConfigRecord({"personal-factors": "", "dropped": []})
    with pytest.raises((ValueError, IndexError)):
        empty.count_bytes()
    content = RecordDict({"c": empty, "a": to_record(adapter()), "m": MetricRecord({"num-examples": 3})})
    assert message_bytes(content) == len("personal-factors") + len("dropped") + payload_bytes(content["a"]) + \
        MetricRecord({"num-examples": 3}).count_bytes()
