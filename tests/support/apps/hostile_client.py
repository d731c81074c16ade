"""A ClientApp for tests: pollinate's real client, but one node's replies are rewritten by a test's ``Forge``.

``hostile_app(forge)`` answers every message with pollinate's own handlers, then hands the hostile node's
honest reply to ``forge(message_type, honest_reply)``, which returns the content that node sends instead
(edited or replaced). It is built per test and used in an in-process federation (tests/support/inprocess.py).
``PLANS`` (hypothesis) draws what a hostile node does to one exchange's reply: nothing, send an empty message,
or a few edits (a metric set to any value or dropped, a record dropped or added, a tensor made NaN, huge,
of the wrong shape, dtype or length, missing or extra); ``forge_of(plans)`` turns one plan per exchange
into a ``Forge``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import strategies as st

from pollinate.client.app import describe_node, evaluate_adapter, train_adapter
from pollinate.proto.adapter_record import ADAPTER, RAW_STYPE, REPORT
from pollinate.proto.node_config import PARTITION_ID

Forge = Callable[[str, RecordDict], RecordDict]  # (message type, the honest reply's content) -> what is sent
Handler = Callable[[Message, Context], Message]


def hostile_app(forge: Forge, hostile_partition: int = 0) -> ClientApp:
    """pollinate's ClientApp, but the node of ``hostile_partition`` sends ``forge``'s content instead of its own."""
    app = ClientApp()

    def wrap(handler: Handler, message_type: str) -> Handler:
        def answer(msg: Message, context: Context) -> Message:
            reply = handler(msg, context)
            if int(context.node_config[PARTITION_ID]) != hostile_partition or reply.has_error():
                return reply
            return Message(forge(message_type, reply.content), reply_to=msg)
        return answer

    app.query()(wrap(describe_node, "query"))
    app.train()(wrap(train_adapter, "train"))
    app.evaluate()(wrap(evaluate_adapter, "evaluate"))
    return app


def array_of(values: np.ndarray) -> Array:
    """A float32 tensor as pollinate puts it on the wire."""
    values = np.ascontiguousarray(values, dtype="<f4")
    return Array(dtype="float32", shape=values.shape, stype=RAW_STYPE, data=values.tobytes())


KEYS = ["num-examples", "max-rank", "loss", "accuracy", "train-loss", "dp-epsilon", "dp-steps", "", "x" * 200,
        "bad\x00key", "[/bold]"]
NUMBERS = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 2**31, 10**12, 0.5, -1.0]))
METRIC_VALUES = st.one_of(NUMBERS, st.lists(st.integers(-2**63, 2**63 - 1), max_size=3),
                          st.lists(st.floats(allow_nan=True), max_size=3))
TENSOR_VALUES = st.sampled_from([np.nan, np.inf, -np.inf, 1e30, 5.0, 0.0, -1e-3])

Edit = Callable[[RecordDict], None]


def _set_metric(key: str, value: object) -> Edit:
    def edit(content: RecordDict) -> None:
        report = content.metric_records.get(REPORT)
        if report is not None:
            report[key] = value  # type: ignore[assignment]
    return edit


def _drop_metric(key: str) -> Edit:
    def edit(content: RecordDict) -> None:
        report = content.metric_records.get(REPORT)
        if report is not None and key in report:
            del report[key]
    return edit


def _drop(kind: str, name: str) -> Edit:
    def edit(content: RecordDict) -> None:
        records = getattr(content, f"{kind}_records")
        if name in records:
            del records[name]
    return edit


def _add_record(kind: str) -> Edit:
    def edit(content: RecordDict) -> None:
        if kind == "array":
            content["extra"] = ArrayRecord({"x": array_of(np.zeros((2, 2)))})
        elif kind == "config":
            content["extra"] = ConfigRecord({"x": b"\x00" * 10})
        else:
            content["extra"] = MetricRecord({"x": 1.0})
    return edit


def _tensor(kind: str, value: float) -> Edit:
    def edit(content: RecordDict) -> None:
        record = content.array_records.get(ADAPTER)
        if record is None or not len(record):
            return
        name = sorted(record)[0 if kind != "b" else -1]
        shape = tuple(record[name].shape)
        if kind == "shape":
            record[name] = array_of(np.zeros((shape[0] + 1, *shape[1:])))
        elif kind == "bytes":
            array = record[name]
            record[name] = Array(dtype=array.dtype, shape=shape, stype=RAW_STYPE, data=array.data[:-4])
        elif kind == "dtype":
            record[name] = Array(dtype="float64", shape=shape, stype=RAW_STYPE,
                                 data=np.zeros(shape, "<f8").tobytes())
        elif kind == "extra":
            record["base_model.model.classifier.weight"] = array_of(np.zeros((2, 2)))
        elif kind == "missing":
            del record[name]
        else:
            record[name] = array_of(np.full(shape, value))
    return edit


EDITS = st.one_of(
    st.builds(_set_metric, st.sampled_from(KEYS) | st.text(max_size=8), METRIC_VALUES),
    st.builds(_drop_metric, st.sampled_from(["num-examples", "loss", "accuracy", "max-rank", "train-loss"])),
    st.builds(_drop, st.sampled_from(["array", "metric"]), st.sampled_from([ADAPTER, REPORT])),
    st.builds(_add_record, st.sampled_from(["array", "config", "metric"])),
    st.builds(_tensor, st.sampled_from(["a", "b", "shape", "bytes", "dtype", "extra", "missing"]), TENSOR_VALUES),
)
# Per exchange: honest (None), emptied (the empty message), or edited.
PLANS = st.one_of(st.none(), st.just("empty"), st.lists(EDITS, min_size=1, max_size=3))


def forge_of(plans: dict[str, object]) -> Forge:
    """The forge that applies ``plans[message_type]`` (a draw of ``PLANS``) to each honest reply."""
    def forge(message_type: str, content: RecordDict) -> RecordDict:
        plan = plans[message_type]
        if plan == "empty":
            return RecordDict()
        for edit in plan or []:  # type: ignore[union-attr]
            edit(content)
        return content
    return forge
