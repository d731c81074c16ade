"""The wire contract of every node reply: which records, which metric keys, of which type and range.

A node's reply is untrusted input: the coordinator reads nothing of it before ``check_reply`` has held it
against the schema of its exchange (``SCHEMAS``): the record names allowed (and required) in each of the
RecordDict's three maps, the report's required and optional metric keys with their type and range, and
bounds on key counts and value sizes. Anything outside is an ``UpdateRejected`` whose message is the
reason recorded in the round's ledger. Adapter tensors themselves are checked against what the node was
sent by ``adapter_record.from_record``; SecAgg+ messages by their dataclasses (``secagg_record``).

num-examples: a node declares its training-set size once, at the ``query`` exchange; a training reply may
not report more than that declaration. Every count fits ``MAX_EXAMPLES`` (the store's 32-bit column). Under
differential privacy a node sends no count at all (an exact count is not covered by the mechanism,
docs/privacy.md): the key is optional, and a node without one weighs as ``server.weighting`` says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import RecordDict

from pollinate.proto.adapter_record import ADAPTER, REPORT, UpdateRejected
from pollinate.proto.generation_metrics import all_keys as generation_keys
from pollinate.proto.generation_metrics import inconsistency as generation_inconsistency
from pollinate.proto.node_config import MAX_RANK
from pollinate.proto.secagg_record import CLIPPED, MASKED, SECAGG
from pollinate.privacy.ledger import REPORT_KEYS as DP_KEYS

MAX_EXAMPLES = 2**31 - 1  # a count above this is no training set; it also overflows the store's INTEGER column
MAX_RANK_DECLARED = 2**16  # no LoRA is wider than this
MAX_METRICS = 32  # keys in one reply's report (pollinate's own reports hold at most 10)
MAX_KEY_CHARS = 128  # characters of one record or metric name
MAX_CONFIG_VALUE_BYTES = 64 * 2**20  # one SecAgg config value (a node's shares: kilobytes per neighbour)
MAX_CONFIG_KEYS = 16  # fields of one SecAgg message (at most 5 today)
MODEL_LOADS = "model-loads"  # base models the node's process has built: 1 per run when the node stays warm
MAX_MODEL_LOADS = 2**20  # a node reloading more often than this is no node

# Exchange names: Flower message types, plus the secure training exchange whose reply carries keys, not tensors.
QUERY, TRAIN, EVALUATE, SECAGG_KEYS = "query", "train", "evaluate", "train+secagg"
SECAGG_SHARE, SECAGG_MASK, SECAGG_UNMASK = "train.secagg_share", "train.secagg_mask", "train.secagg_unmask"


@dataclass(frozen=True)
class Metric:
    """One report key: a finite number in [low, high], an integer when ``integer``."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    required: bool = False


@dataclass(frozen=True)
class ReplySchema:
    """What one exchange's reply may hold: record names per map (required ones too) and its report's keys."""

    arrays: frozenset[str] = frozenset()
    configs: frozenset[str] = frozenset()
    metrics: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()  # record names that must be present (in whichever map they belong)
    report: Mapping[str, Metric] = field(default_factory=dict)
    open_report: bool = False  # the report may carry further finite numbers (strategy and DP metrics of training)
    all_or_none: tuple[str, ...] = ()  # keys that come together or not at all (a DP release's description)


EXAMPLES = Metric(low=1, high=MAX_EXAMPLES, integer=True)  # optional: a node under DP withholds it
# A DP release as the node describes it (privacy.ledger.entry_from_report reads all six).
_DP_REPORT = {"dp-epsilon": Metric(low=0), "dp-delta": Metric(0, 1), "dp-noise-multiplier": Metric(low=0),
              "dp-clip-norm": Metric(low=0), "dp-sample-rate": Metric(0, 1),
              "dp-steps": Metric(0, MAX_EXAMPLES, integer=True)}
LOADS = Metric(0, MAX_MODEL_LOADS, integer=True)  # optional: a node that does not count reports nothing
_TRAIN_REPORT = {"num-examples": EXAMPLES, "train-loss": Metric(), MODEL_LOADS: LOADS, **_DP_REPORT}

SCHEMAS: Mapping[str, ReplySchema] = {
    QUERY: ReplySchema(metrics=frozenset({REPORT}), required=frozenset({REPORT}),
                       report={"num-examples": EXAMPLES, MAX_RANK: Metric(0, MAX_RANK_DECLARED, integer=True),
                               MODEL_LOADS: LOADS}),
    TRAIN: ReplySchema(arrays=frozenset({ADAPTER}), metrics=frozenset({REPORT}), required=frozenset({ADAPTER, REPORT}),
                       report=_TRAIN_REPORT, open_report=True, all_or_none=DP_KEYS),
    EVALUATE: ReplySchema(metrics=frozenset({REPORT}), required=frozenset({REPORT}),
                          report={"num-examples": EXAMPLES, "loss": Metric(low=0, required=True),
                                  "accuracy": Metric(0, 1, required=True), MODEL_LOADS: LOADS,
                                  # causal-lm: per-token argmax accuracy, and the generation counts
                                  "token-accuracy": Metric(0, 1),
                                  **{k: Metric(0, MAX_EXAMPLES, integer=True) for k in generation_keys()}}),
    SECAGG_KEYS: ReplySchema(configs=frozenset({SECAGG}), metrics=frozenset({REPORT}),
                             required=frozenset({SECAGG, REPORT}), report=_TRAIN_REPORT, open_report=True,
                             all_or_none=DP_KEYS),
    SECAGG_SHARE: ReplySchema(configs=frozenset({SECAGG}), required=frozenset({SECAGG})),
    SECAGG_MASK: ReplySchema(arrays=frozenset({MASKED}), configs=frozenset({SECAGG}), metrics=frozenset({CLIPPED}),
                             required=frozenset({MASKED, SECAGG}),
                             report={"count": Metric(0, math.inf, integer=True)}),
    SECAGG_UNMASK: ReplySchema(configs=frozenset({SECAGG}), required=frozenset({SECAGG})),
}


def check_reply(exchange: str, content: RecordDict, declared_examples: int | None = None) -> dict[str, float]:
    """The reply's report (or the stage-3 clip count) as checked numbers; ``UpdateRejected`` with the reason.

    ``declared_examples``: what the node declared at the query exchange; a report may not exceed it.
    """
    schema = SCHEMAS[exchange]
    present = {"array": set(content.array_records), "config": set(content.config_records),
               "metric": set(content.metric_records)}
    for kind, allowed in (("array", schema.arrays), ("config", schema.configs), ("metric", schema.metrics)):
        extra = sorted(present[kind] - allowed, key=str)
        if extra:
            raise UpdateRejected(f"a {exchange} reply may carry {kind} records {sorted(allowed) or 'none'}, "
                                 f"not {_names(extra)}")
    missing = sorted(schema.required - set().union(*present.values()))
    if missing:
        raise UpdateRejected(f"a {exchange} reply must carry the record(s) {missing}; it has none")
    for name in content.config_records:
        _check_config(exchange, name, content.config_records[name])
    numbers = [name for name in schema.metrics if name in content.metric_records]
    values = _check_report(exchange, schema, dict(content.metric_records[numbers[0]]), declared_examples) \
        if numbers else {}
    why = generation_inconsistency(values) if exchange == EVALUATE else None
    if why:
        raise UpdateRejected(f"the {exchange} report's {why}")
    return values


def _check_report(exchange: str, schema: ReplySchema, report: Mapping[str, object],
                  declared: int | None) -> dict[str, float]:
    if len(report) > MAX_METRICS:
        raise UpdateRejected(f"the {exchange} report holds {len(report)} keys; at most {MAX_METRICS} are accepted")
    unknown = sorted(set(report) - set(schema.report), key=str)
    if unknown and not schema.open_report:
        raise UpdateRejected(f"the {exchange} report has unknown key(s) {_names(unknown)}; it may hold "
                             f"{sorted(schema.report)}")
    missing = sorted(k for k, m in schema.report.items() if m.required and k not in report)
    if missing:
        raise UpdateRejected(f"the {exchange} report lacks the required key(s) {missing}")
    group = [k for k in schema.all_or_none if k in report]
    if group and len(group) != len(schema.all_or_none):
        raise UpdateRejected(f"the {exchange} report has {group} but not {sorted(set(schema.all_or_none) - set(group))}"
                             f"; these keys come together or not at all")
    values: dict[str, float] = {}
    for key, raw in report.items():
        if len(key) > MAX_KEY_CHARS or not key.isprintable():
            raise UpdateRejected(f"the {exchange} report key {_short(key)} is not a printable name of at most "
                                 f"{MAX_KEY_CHARS} characters")
        # bool is an int in Python, and a list is what MetricRecord also allows: neither is a number here.
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise UpdateRejected(f"{key} = {_short(raw)} in the {exchange} report is a {type(raw).__name__}; "
                                 f"it must be a number")
        value = float(raw)  # a Python int of any size becomes inf here when huge: caught as not finite
        metric = schema.report.get(key, Metric())
        high = metric.high
        if key == "num-examples" and declared is not None:
            high = min(high, declared)
        if not math.isfinite(value) or not metric.low <= value <= high or (metric.integer and value != int(value)):
            kind = "an integer" if metric.integer else "a finite number"
            why = (f" (the node declared {declared} training examples at the query exchange)"
                   if key == "num-examples" and declared is not None else "")
            span = f"[{metric.low:.0f}, {high:.0f}]" if metric.integer else f"[{metric.low:g}, {high:g}]"
            raise UpdateRejected(f"{key} = {_short(raw)} in the {exchange} report; it must be {kind} in {span}{why}")
        values[key] = value
    return values


def _check_config(exchange: str, name: str, record: Mapping[str, object]) -> None:
    if len(record) > MAX_CONFIG_KEYS:
        raise UpdateRejected(f"the {exchange} reply's {name!r} record holds {len(record)} fields; at most "
                             f"{MAX_CONFIG_KEYS}")
    for key, value in record.items():
        size = sum(map(_size, value)) if isinstance(value, list) else _size(value)
        if size > MAX_CONFIG_VALUE_BYTES:
            raise UpdateRejected(f"field {key!r} of the {exchange} reply's {name!r} record is {size} bytes; at "
                                 f"most {MAX_CONFIG_VALUE_BYTES} are accepted")


def _size(value: object) -> int:
    return len(value) if isinstance(value, bytes | str) else 8


def _names(names: list[str]) -> str:
    shown = ", ".join(_short(n) for n in names[:3])
    return f"[{shown}]" + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
