"""The warm node on real processes (127.0.0.1): one SuperLink, two `pollinate client` nodes, three rounds.

Each node's base model loads once (the ``model-loads`` counter every reply carries, as the coordinator stored
it), and a warm worker that crashes mid-round (the fault hook: it dies on its 5th task, round 2's training)
is that node's recorded failure for the round; `pollinate client` restarts it and the node trains round 3.
With node authentication, a node started before its key is registered retries until it is admitted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate.client.warm import CRASH_AT_TASK
from pollinate.proto.reply_schema import MODEL_LOADS
from pollinate.runtime.processes import free_port
from pollinate.security.certs import create_cert_dir
from pollinate.security.flower_flags import register_command, superlink_flags, write_flwr_connection
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


@pytest.mark.timeout(900)
def test_with_node_auth_a_node_started_before_its_key_is_registered_retries_and_joins(
        tmp_path: Path, procs: Processes) -> None:
    certs = create_cert_dir(tmp_path / "certs", nodes=1)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "flwr"),
           "FLWR_TELEMETRY_ENABLED": "0"}
    port = free_port()
    with (tmp_path / "superlink.log").open("w") as out:
        link = subprocess.Popen([str(bin_dir / "flower-superlink"), *superlink_flags(certs), "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    procs.started.append(link)
    [data] = write_node_data(tmp_path, 1)
    node = procs.pollinate("node", "client", "--superlink", f"127.0.0.1:{port}", "--data", str(data), "--device",
                           "cpu", "--certs", str(certs.root), "--node-key", str(certs.node_key(1)), "--wait", "600")
    poll("the node to be refused and retry", lambda: "retrying in" in procs.log("node") or None, 400)

    write_flwr_connection(env["FLWR_HOME"], "t", certs, f"127.0.0.1:{port}")
    registered = subprocess.run([str(bin_dir / "flwr"), *register_command(certs, 1, "t")[1:], "--format", "json"],
                                env=env, capture_output=True, text=True, timeout=180)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    poll("the node to join once its key is registered", lambda: "SuperNode ID" in procs.log("node") or None, 400)
    assert node.poll() is None, procs.log("node")[-3000:]
