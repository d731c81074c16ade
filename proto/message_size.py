"""What a Flower message's records cost on the wire, counted the way Flower's ``count_bytes`` counts them.

Flower 1.42's ``ConfigRecord.count_bytes`` raises on an empty string or bytes value (ValueError) and on an
empty list (IndexError), both of which our messages carry (``personal-factors = ""`` in the instructions,
``dropped = []`` in an unmasking request). This counts the same way and accepts them: tensor data plus
key names for arrays (Flower's own count), 8 bytes per int/float, 1 per bool, the length of str/bytes,
plus each key's name. Protobuf framing is not counted.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict


def _value_bytes(value: object) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, int | float):
        return 8  # protobuf carries ints and floats of a ConfigRecord as 64-bit
    if isinstance(value, str | bytes):
        return len(value)
    raise TypeError(f"a ConfigRecord value must be bool, int, float, str, bytes or a list of them, "
                    f"got {type(value).__name__}")


def record_bytes(record: object) -> int:
    """Bytes of one record (ArrayRecord, MetricRecord or ConfigRecord), keys included."""
    if isinstance(record, ConfigRecord):
        return sum(len(key) + _value_bytes(value) for key, value in record.items())
    return record.count_bytes()  # type: ignore[attr-defined]


def message_bytes(content: RecordDict) -> int:
    """Bytes of every record of one message's content."""
    return sum(record_bytes(record) for record in content.values())
