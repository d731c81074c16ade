"""A real deployment on 127.0.0.1: `pollinate server` (Flower SuperLink + ServerApp) and `pollinate client`
(Flower SuperNodes), the coordinator killed with SIGKILL and resumed, and, over TLS with the status service
on mutual TLS, a node killed mid-round."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel

from pollinate.models import adapter_state, load_base_model
from pollinate.runtime.processes import free_port
from pollinate.proto.run_config import RunConfig
from pollinate.security.certs import create_cert_dir
from pollinate.server.store import RoundStore, sha256
from tests.support.paths import TINY
from tests.support.processes import Processes, poll, write_node_data


@pytest.fixture
def procs(tmp_path: Path):
    processes = Processes(tmp_path / "logs")
    yield processes
    processes.stop_all()


def _lease_expired(store: RoundStore, run_id: int) -> bool:
    _, expires = store.lease(run_id)
    return expires is None or expires < datetime.now(UTC)


def _completed(store: RoundStore, run_id: int) -> list[int]:
    return [r.number for r in store.rounds(run_id) if r.status == "completed"]


@pytest.mark.timeout(2400)
def test_a_coordinator_killed_after_round_1_resumes_with_the_same_adapter_and_loses_no_round(
        tmp_path: Path, procs: Processes) -> None:
    url, port = f"sqlite:///{tmp_path / 'store.db'}", free_port()
    data = write_node_data(tmp_path, 2)
    server = procs.pollinate("server-1", "server", "--scenario", TINY, "--db", url, "--output", str(tmp_path / "out"),
                             "--port", str(port), "--rounds", "3", "--set", "federation.round-timeout=600",
                             "--set", "store.lease-ttl=5", "--status-port", str(free_port()))
    for i, path in enumerate(data):
        procs.pollinate(f"node-{i}", "client", "--superlink", f"127.0.0.1:{port}", "--data", str(path),
                        "--max-rank", "4", "--device", "cpu")
    store = poll("the store to be created", lambda: _open(url), 300)
    run_id = poll("a run", lambda: store.runs()[0].id if store.runs() else None, 600)
    poll("round 1 in the store", lambda: 1 in _completed(store, run_id) or None, 900, every_s=0.2)
    procs.kill_tree(server)  # the coordinator dies at once: SuperLink, SuperExec and the ServerApp

    assert store.run(run_id).status == "running"  # nobody could say otherwise
    assert [r.number for r in store.rounds(run_id)] == [1]  # round 2 was under way: nothing of it is stored
    round_1 = store.rounds(run_id)[0].adapter_sha256
    # The dead coordinator's lease (5 s) must expire first: until then a resume is refused as a second coordinator.
    poll("the dead coordinator's lease to expire", lambda: _lease_expired(store, run_id) or None, 60, every_s=0.5)

    resumed = procs.pollinate("server-2", "server", "--resume", str(run_id), "--db", url, "--port", str(port),
                              "--no-status")
    assert resumed.wait(timeout=1800) == 0, procs.log("server-2")[-4000:]

    run = store.run(run_id)
    assert run.status == "completed", run.error
    rounds = store.rounds(run_id)
    assert [(r.number, r.status) for r in rounds] == [(1, "completed"), (2, "completed"), (3, "completed")]
    assert all(r.accepted == 2 for r in rounds)
    adapters = [store.adapter(run_id, r.number) for r in rounds]  # each checked against its sha256 as it is read
    assert rounds[0].adapter_sha256 == adapters[0].sha256 == round_1  # round 1 untouched
    assert rounds[1].parent_sha256 == round_1  # round 2 started from round 1's adapter...
    assert rounds[2].parent_sha256 == adapters[1].sha256  # ...and round 3 from round 2's
    assert all(sha256(a.data) == r.adapter_sha256 for a, r in zip(adapters, rounds))
    attempts = store.attempts(run_id)
    assert [a.first_round for a in attempts] == [1, 2]
    assert attempts[0].flower_run_id != attempts[1].flower_run_id  # a new Flower run, the same pollinate run
    assert "resumed at round 2" in procs.log("server-2")
    # The dead coordinator's Flower run, and its undelivered round-2 messages, are gone from the SuperLink.
    dead = attempts[0].flower_run_id
    assert re.search(rf"Flower run {dead} of the coordinator that died: (stopped|already finished)",
                     procs.log("server-2"))

    cfg = RunConfig.from_flat(run.config)
    model = PeftModel.from_pretrained(load_base_model(cfg.model, cfg.seed).model, run.adapter_dir)
    exported, stored = adapter_state(model), store.adapter(run_id, 3).tensors()
    assert all(np.array_equal(stored[k], exported[k]) for k in stored)


def _open(url: str) -> RoundStore | None:
    try:
        return RoundStore(url)
    except Exception:  # the coordinator may be creating it right now
        return None


@pytest.mark.timeout(1800)
def test_over_tls_a_node_killed_mid_round_is_recorded_failed_and_the_run_completes_with_the_other(
        tmp_path: Path, procs: Processes) -> None:
    url, port, status_port = f"sqlite:///{tmp_path / 'store.db'}", free_port(), free_port()
    certs = create_cert_dir(tmp_path / "certs", nodes=0)  # `pollinate certs`: CA, server and operator certificates
    data = write_node_data(tmp_path, 2)
    nodes = [procs.pollinate(f"node-{i}", "client", "--superlink", f"127.0.0.1:{port}", "--data", str(path),
                             "--device", "cpu", "--wait", "600", "--certs", str(certs.root))
             for i, path in enumerate(data)]
    server = procs.pollinate("server", "server", "--scenario", TINY, "--db", url, "--output", str(tmp_path / "out"),
                             "--port", str(port), "--rounds", "2", "--set", "federation.min-nodes=1",
                             "--set", "federation.round-timeout=600", "--status-port", str(status_port),
                             # seconds of training, not the tiny scenario's milliseconds: the kill below must land
                             # inside node 1's round-2 training (seen when it starts), not after its reply left
                             "--set", "train.local-steps=100", "--certs", str(certs.root))
    store = poll("the store to be created", lambda: _open(url), 300)
    run_id = poll("a run", lambda: store.runs()[0].id if store.runs() else None, 600)
    poll("round 1 in the store", lambda: 1 in _completed(store, run_id) or None, 900, every_s=0.2)
    assert store.rounds(run_id)[0].participants == 2, "both nodes must have joined before round 1"
    # The status service `pollinate server` runs beside the SuperLink answers, over mutual TLS, from the store.
    said = subprocess.run([sys.executable, "-m", "pollinate.cli", "status", "--coordinator",
                           f"127.0.0.1:{status_port}", str(run_id), "--round", "1", "--json",
                           "--certs", str(certs.root)],
                          capture_output=True, text=True, timeout=120)
    assert said.returncode == 0, said.stdout + said.stderr
    status = json.loads(said.stdout)
    assert status["run"]["status"] == "running" and status["run"]["rounds"][0]["number"] == 1
    assert sum(c["phase"] == "train" for c in status["round"]["clients"]) == 2
    victim = int(poll("node 1's id", lambda: _node_id(procs.log("node-1")), 60))
    poll("node 1 training round 2", lambda: _training(procs.log("node-1"), 2), 600, every_s=0.2)
    procs.kill_tree(nodes[1])  # the node dies in the middle of its round-2 training

    assert server.wait(timeout=1200) == 0, procs.log("server")[-4000:]
    run = store.run(run_id)
    assert run.status == "completed", run.error
    round_2 = store.rounds(run_id)[1]
    assert (round_2.status, round_2.participants, round_2.accepted) == ("completed", 2, 1)
    train = {int(u.node_id): u for u in store.client_updates(run_id, 2) if u.phase == "train"}
    # Killed while training, Flower reports the node unavailable; killed while its reply was uploading, the reply's
    # objects are missing ("node lost"): either way the node's round-2 update is a recorded failure.
    reason = train[victim].reason or ""
    assert train[victim].status == "failed" and ("Node Unavailable" in reason or "node lost" in reason), reason
    assert [u.status for n, u in train.items() if n != victim] == ["accepted"]
    assert Path(run.adapter_dir, "adapter_model.safetensors").is_file()


def _node_id(log: str) -> str | None:
    found = re.search(r"SuperNode ID: (\d+)", log)
    return found.group(1) if found else None


def _training(log: str, times: int) -> bool | None:
    """True once the node's warm worker has started its ``times``-th train task (it logs each task it starts)."""
    return len(re.findall(r"task \d+ \(train\) started", log)) >= times or None


@pytest.mark.timeout(600)
def test_the_coordinator_registers_the_node_keys_for_supernode_authentication(tmp_path: Path, procs: Processes) -> None:
    """`--register-node` goes through the SuperLink's Control API over TLS; node admission by a registered key
    is tested against raw Flower processes in tests/deployment/test_security.py."""
    certs = create_cert_dir(tmp_path / "certs", nodes=2)
    url, port = f"sqlite:///{tmp_path / 'store.db'}", free_port()
    keys = [str(certs.node_public_key(i)) for i in (1, 2)]
    server = procs.pollinate("server", "server", "--scenario", TINY, "--db", url, "--output", str(tmp_path / "out"),
                             "--port", str(port), "--rounds", "1", "--no-status",
                             "--set", "federation.wait-for-nodes=3", "--certs", str(certs.root),
                             "--enable-supernode-auth", "--register-node", keys[0], "--register-node", keys[1])
    assert server.wait(timeout=300) == 1, procs.log("server")[-4000:]  # no node came: round 1 failed, recorded
    log = procs.log("server")
    registered = re.findall(r"registered SuperNode key (\S+) \(node (\d+)\)", log)
    assert [k for k, _ in registered] == keys and len({n for _, n in registered}) == 2, log[-4000:]
    [run] = RoundStore(url).runs()
    assert run.status == "failed" and "federation.min-nodes" in (run.error or "")
