"""One hostile node in a federation: whatever it replies, the run completes and its replies are recorded.

The real ServerApp against pollinate's real ClientApp in this process (tests/support/inprocess.py); one node's
replies go through ``hostile_app``'s forge: edited (a metric, a tensor, a record) or replaced outright.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict
from hypothesis import HealthCheck, given, settings

from pollinate.cli import main
from pollinate.proto.adapter_record import ADAPTER, REPORT
from pollinate.proto.run_config import RunConfig
from pollinate.server.app import INITIAL_EVALUATION, run_federation
from pollinate.server.store import RoundStore
from pollinate.simulations.cli import write_node_data
from pollinate.simulations.scenario import load_scenario
from tests.support.apps.hostile_client import PLANS, Forge, array_of, forge_of, hostile_app
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


def _dominate(message_type: str, content: RecordDict) -> RecordDict:
    """Claims 10^12 examples (declared and reported) and uploads lora_B = 5 everywhere."""
    if REPORT in content.metric_records:
        content.metric_records[REPORT]["num-examples"] = 10**12
    if message_type == "query":
        content.metric_records[REPORT]["num-examples"] = 2**31 - 1  # the most a declaration may say
    if ADAPTER in content.array_records:
        record = content.array_records[ADAPTER]
        for name in [k for k in record if "lora_B" in k]:
            record[name] = array_of(np.full(record[name].shape, 5.0))
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
    # Capped weighting alone (the update bound off):
    store, run = _run(federation, _dominate_within_declaration, tmp_path / "capped",
                      **{"federation.update-bound": 0.0})
    hostile = _hostile_node(federation)
    b = np.concatenate([v.ravel() for k, v in store.adapter(run, 1).tensors().items() if "lora_B" in k])
    # Capped at federation.max-weight-share = 0.5: the global B is half the hostile one plus half the honest mean.
    assert np.abs(b - 2.5).max() < 0.1
    train = {c.node_id: c for c in store.client_updates(run, 1) if c.phase == "train"}
    assert train[hostile].status == "accepted" and train[hostile].num_examples == 2**31 - 1
    # The same node under the default bound of 3 x the median update norm: rejected, with its norm and the bound.
    store, run = _run(federation, _dominate_within_declaration, tmp_path / "bounded")
    train = {c.node_id: c for c in store.client_updates(run, 1) if c.phase == "train"}
    assert train[hostile].status == "rejected" and "exceeds" in (train[hostile].reason or "")
    assert all(c.status == "accepted" and c.metrics["update-norm"] > 0 for n, c in train.items() if n != hostile)
    b = np.concatenate([v.ravel() for k, v in store.adapter(run, 1).tensors().items() if "lora_B" in k])
    assert np.abs(b).max() < 0.5


def _markup(message_type: str, content: RecordDict) -> RecordDict:
    """A report key that is rich console markup, which the coordinator prints in the rejection reason."""
    if REPORT in content.metric_records:
        content.metric_records[REPORT]["[/bold]"] = 1.0
    return content


def test_a_reason_quoting_what_a_node_sent_is_printed_as_text(federation: RunConfig, tmp_path: Path) -> None:
    store, run = _run(federation, _markup, tmp_path)
    assert store.run(run).status == "completed"
    reasons = [c.reason for c in store.client_updates(run) if c.status != "accepted"]
    assert reasons and all("[/bold]" in (r or "") for r in reasons)


# ---- fuzz: one node replies with anything at all (denser, without training: tests/server/test_reply_checks.py) --

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(query=PLANS, train=PLANS, evaluate=PLANS)
def test_whatever_one_node_replies_the_run_completes_and_its_rejections_have_reasons(
        federation: RunConfig, capsys, query: object, train: object, evaluate: object) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        store, run = _run(federation, forge_of({"query": query, "train": train, "evaluate": evaluate}), Path(workdir),
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


def _no_loss_in_evaluation(message_type: str, content: RecordDict) -> RecordDict:
    """Answers every evaluation, the round-0 one included, without its loss."""
    if message_type == "evaluate":
        del content.metric_records[REPORT]["loss"]
    return content


def test_a_rejected_round_0_evaluation_is_stored_with_its_reason(federation: RunConfig, tmp_path: Path) -> None:
    store, run = _run(federation, _no_loss_in_evaluation, tmp_path)
    assert store.run(run).status == "completed"
    hostile = _hostile_node(federation)
    # Round 0 has no round of its own: its records are stored with round 1, under their own phase.
    initial = {c.node_id: c for c in store.client_updates(run, 1) if c.phase == INITIAL_EVALUATION}
    assert sorted(initial) == sorted(InProcessGrid.of_scenario(federation, CLIENTS).contexts)
    assert initial[hostile].status == "rejected" and "loss" in (initial[hostile].reason or "")
    assert all(c.status == "accepted" for node, c in initial.items() if node != hostile)
    later = [c for c in store.client_updates(run, 1) if c.phase == "evaluate" and c.node_id == hostile]
    assert [c.status for c in later] == ["rejected"]  # round 1's own evaluation is recorded as before
