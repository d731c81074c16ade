"""The warm node on real processes (127.0.0.1): one SuperLink, two `pollinate client` nodes, three rounds.

Each node's base model loads once (the ``model-loads`` counter every reply carries, as the coordinator stored
it), and a warm worker that crashes mid-round (the fault hook: it dies on its 5th task, round 2's training)
is that node's recorded failure for the round; `pollinate client` restarts it and the node trains round 3.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pollinate.client.warm import CRASH_AT_TASK
from pollinate.proto.reply_schema import MODEL_LOADS
from pollinate.runtime.processes import free_port
from pollinate.server.store import RoundStore
from tests.support.paths import TINY
from tests.support.processes import Processes, poll, write_node_data


@pytest.fixture
def procs(tmp_path: Path):
    processes = Processes(tmp_path / "logs")
    yield processes
    processes.stop_all()


@pytest.mark.timeout(1200)
def test_each_node_loads_its_model_once_and_a_crashed_warm_worker_is_a_failure_then_rejoins(
        tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    url, port = f"sqlite:///{tmp_path / 'store.db'}", free_port()
    data = write_node_data(tmp_path, 2)
    server = procs.pollinate("server", "server", "--scenario", TINY, "--db", url, "--output", str(tmp_path / "out"),
                             "--port", str(port), "--rounds", "3", "--set", "federation.min-nodes=1",
                             "--set", "federation.round-timeout=600", "--no-status")
    procs.pollinate("node-0", "client", "--superlink", f"127.0.0.1:{port}", "--data", str(data[0]),
                    "--device", "cpu")
    # Node 1's worker: round-0 evaluation, capacity query, round-1 train and evaluate, then round 2's train.
    monkeypatch.setenv(CRASH_AT_TASK, "5")
    procs.pollinate("node-1", "client", "--superlink", f"127.0.0.1:{port}", "--data", str(data[1]),
                    "--device", "cpu")
    assert server.wait(timeout=1100) == 0, procs.log("server")[-4000:]

    store = RoundStore(url)
    [run] = store.runs()
    assert run.status == "completed", run.error
    victim = int(re.search(r"SuperNode ID: (\d+)", procs.log("node-1")).group(1))  # type: ignore[union-attr]
    updates = store.client_updates(run.id)
    failed = [(u.round_number, u.phase) for u in updates if u.status == "failed"]
    assert failed == [(2, "train")] and all(u.node_id == victim for u in updates if u.status == "failed"), failed
    assert "restarting it" in procs.log("node-1") and "warm worker restarted" in procs.log("node-1")
    round_3 = {(int(u.node_id), u.phase): u.status for u in store.client_updates(run.id, 3)}
    assert round_3[(victim, "train")] == "accepted"  # the restarted worker serves the next round
    assert len({n for n, _ in round_3}) == 2
    # One base-model load per node process over all three rounds: every reply of every phase says 1
    # (the victim's restarted worker loaded once more, in its new process, and says 1 again).
    loads = {(int(u.node_id), u.round_number, u.phase): u.metrics.get(MODEL_LOADS) for u in updates
             if u.status == "accepted"}
    assert loads and set(loads.values()) == {1.0}, loads
    assert {r for _, r, _ in loads} == {1, 2, 3}
