"""One hostile node in a federation: whatever it replies, the run completes and its replies are recorded.

The real ServerApp against pollinate's real ClientApp in this process (tests/support/inprocess.py); one node's
replies go through ``hostile_app``'s forge: edited (a metric, a tensor, a record) or replaced outright.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollinate.cli import main
from pollinate.proto.adapter_record import ADAPTER, RAW_STYPE, REPORT
from pollinate.proto.run_config import RunConfig
from pollinate.server.app import run_federation
from pollinate.server.store import RoundStore
from pollinate.simulations.cli import write_node_data
from pollinate.simulations.scenario import load_scenario
from tests.support.apps.hostile_client import Forge, hostile_app
from tests.support.inprocess import InProcessGrid, serverapp_identity
from tests.support.paths import SCENARIOS

CLIENTS = 4


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> RunConfig:
    """The tiny scenario's 4 nodes with their data written once; each test run gets its own store."""
    workdir = tmp_path_factory.mktemp("hostile")
    cfg, sim = load_scenario(SCENARIOS / "tiny.toml", {"federation.rounds": 1}, CLIENTS)
    cfg, _ = write_node_data(cfg, sim, workdir / "partitions")
    return cfg


def _run(cfg: RunConfig, forge: Forge, workdir: Path, **overrides: object) -> tuple[RoundStore, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(**{"store.db": f"sqlite:///{workdir / 'store.db'}", "store.output-dir": str(workdir / "out"),
                         **overrides})
    grid = InProcessGrid.of_scenario(cfg, CLIENTS, hostile_app(forge))
    with serverapp_identity():
        run = run_federation(grid, cfg)  # type: ignore[arg-type]
    return RoundStore(cfg.store.db), run


def _hostile_node(cfg: RunConfig) -> int:
    return sorted(InProcessGrid.of_scenario(cfg, CLIENTS).contexts.items(),
                  key=lambda item: int(item[1].node_config["partition-id"]))[0][0]


def _array(values: np.ndarray) -> Array:
    values = np.ascontiguousarray(values, dtype="<f4")
    return Array(dtype="float32", shape=values.shape, stype=RAW_STYPE, data=values.tobytes())


def _dominate(message_type: str, content: RecordDict) -> RecordDict:
    """Claims 10^12 examples (declared and reported) and uploads lora_B = 5 everywhere."""
    if REPORT in content.metric_records:
        content.metric_records[REPORT]["num-examples"] = 10**12
    if message_type == "query":
        content.metric_records[REPORT]["num-examples"] = 2**31 - 1  # the most a declaration may say
    if ADAPTER in content.array_records:
        record = content.array_records[ADAPTER]
        for name in [k for k in record if "lora_B" in k]:
            record[name] = _array(np.full(record[name].shape, 5.0))
    return content


@pytest.mark.parametrize("bound", [0.0, 3.0])
def test_a_node_claiming_1e12_examples_and_lora_b_5_does_not_become_the_model(federation: RunConfig, bound: float,
                                                                              tmp_path: Path) -> None:
    store, run = _run(federation, _dominate, tmp_path, **{"federation.update-bound": bound})
    assert store.run(run).status == "completed"
    hostile = _hostile_node(federation)
    records = {(c.node_id, c.phase): c for c in store.client_updates(run, 1)}
    assert "num-examples = 1000000000000" in (records[(hostile, "train")].reason or "")  # above its declaration
    adapter = store.adapter(run, 1).tensors()
    b = np.concatenate([v.ravel() for k, v in adapter.items() if "lora_B" in k])
    assert np.abs(b).max() < 0.5  # the honest nodes' mean after a few steps from B = 0, nowhere near 5


def _dominate_within_declaration(message_type: str, content: RecordDict) -> RecordDict:
    """Declares and reports the most a count may be (2^31 - 1), and uploads lora_B = 5."""
    content = _dominate(message_type, content)
    if REPORT in content.metric_records:
        content.metric_records[REPORT]["num-examples"] = 2**31 - 1
    return content


def test_capped_weighting_and_the_update_bound_hold_a_node_that_declares_the_maximum(federation: RunConfig,
                                                                                     tmp_path: Path) -> None:
    store, run = _run(federation, _dominate_within_declaration, tmp_path / "capped")
    hostile = _hostile_node(federation)
    b = np.concatenate([v.ravel() for k, v in store.adapter(run, 1).tensors().items() if "lora_B" in k])
    # Capped at federation.max-weight-share = 0.5: the global B is half the hostile one plus half the honest mean.
    assert np.abs(b - 2.5).max() < 0.1
    train = {c.node_id: c for c in store.client_updates(run, 1) if c.phase == "train"}
    assert train[hostile].status == "accepted" and train[hostile].num_examples == 2**31 - 1
    # The same node under a bound of 3 x the median update norm: rejected, with its norm and the bound.
    store, run = _run(federation, _dominate_within_declaration, tmp_path / "bounded",
                      **{"federation.update-bound": 3.0})
    train = {c.node_id: c for c in store.client_updates(run, 1) if c.phase == "train"}
    assert train[hostile].status == "rejected" and "exceeds" in (train[hostile].reason or "")
    assert all(c.status == "accepted" and c.metrics["update-norm"] > 0 for n, c in train.items() if n != hostile)
    b = np.concatenate([v.ravel() for k, v in store.adapter(run, 1).tensors().items() if "lora_B" in k])
    assert np.abs(b).max() < 0.5


# ---- fuzz: one node replies with anything at all -----------------------------------------------------------

KEYS = ["num-examples", "max-rank", "loss", "accuracy", "train-loss", "dp-epsilon", "dp-steps", "", "x" * 200,
        "bad\x00key"]
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


def _drop(kind: str, name: str) -> Edit:
    def edit(content: RecordDict) -> None:
        records = getattr(content, f"{kind}_records")
        if name in records:
            del records[name]
    return edit


def _add_record(kind: str) -> Edit:
    def edit(content: RecordDict) -> None:
        if kind == "array":
            content["extra"] = ArrayRecord({"x": _array(np.zeros((2, 2)))})
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
            record[name] = _array(np.zeros((shape[0] + 1, *shape[1:])))
        elif kind == "bytes":
            array = record[name]
            record[name] = Array(dtype=array.dtype, shape=shape, stype=RAW_STYPE, data=array.data[:-4])
        elif kind == "dtype":
            record[name] = Array(dtype="float64", shape=shape, stype=RAW_STYPE,
                                 data=np.zeros(shape, "<f8").tobytes())
        elif kind == "extra":
            record["base_model.model.classifier.weight"] = _array(np.zeros((2, 2)))
        elif kind == "missing":
            del record[name]
        else:
            record[name] = _array(np.full(shape, value))
    return edit


EDITS = st.one_of(
    st.builds(_set_metric, st.sampled_from(KEYS) | st.text(max_size=8), METRIC_VALUES),
    st.builds(_drop, st.sampled_from(["array", "metric"]), st.sampled_from([ADAPTER, REPORT])),
    st.builds(_add_record, st.sampled_from(["array", "config", "metric"])),
    st.builds(_tensor, st.sampled_from(["a", "b", "shape", "bytes", "dtype", "extra", "missing"]), TENSOR_VALUES),
)
# Per exchange: honest (None), emptied (the empty message), or edited.
PLANS = st.one_of(st.none(), st.just("empty"), st.lists(EDITS, min_size=1, max_size=3))


def _forge(plans: dict[str, object]) -> Forge:
    def forge(message_type: str, content: RecordDict) -> RecordDict:
        plan = plans[message_type]
        if plan == "empty":
            return RecordDict()
        for edit in plan or []:  # type: ignore[union-attr]
            edit(content)
        return content
    return forge


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(query=PLANS, train=PLANS, evaluate=PLANS)
def test_whatever_one_node_replies_the_run_completes_and_its_rejections_have_reasons(
        federation: RunConfig, capsys, query: object, train: object, evaluate: object) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        store, run = _run(federation, _forge({"query": query, "train": train, "evaluate": evaluate}), Path(workdir),
                          **{"federation.update-bound": 3.0})
        assert store.run(run).status == "completed"
        hostile = _hostile_node(federation)
        records = store.client_updates(run)
        honest = [c for c in records if c.node_id != hostile]
        assert honest and all(c.status == "accepted" for c in honest)  # the others never pay for it
        theirs = [c for c in records if c.node_id == hostile]
        assert theirs and all(c.status == "accepted" or c.reason for c in theirs)
        if query == "empty":  # never declared: never trained, asked again, still recorded
            assert {c.status for c in theirs if c.phase == "query"} == {"rejected"}
            assert not [c for c in theirs if c.phase == "train"]
        if train == "empty" and query is None:
            assert [c.status for c in theirs if c.phase == "train"] == ["rejected"]
        # Every rejection and its reason are in `pollinate runs RUN --json`.
        capsys.readouterr()
        assert main(["runs", str(run), "--json", "--db", store.url]) == 0
        shown = json.loads(capsys.readouterr().out)
        clients = [c for r in shown[0]["rounds"] for c in r["clients"]]
        rejected = [(c.phase, c.reason) for c in theirs if c.status != "accepted" and c.round_number > 0]
        assert sorted((c["phase"], c["reason"]) for c in clients
                      if c["node_id"] == str(hostile) and c["status"] != "accepted") == sorted(rejected)
