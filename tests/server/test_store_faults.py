"""The round loop against a failing store and a second coordinator: refused by name, or ended interrupted in one line.

Real SQLite, real locks (another connection's exclusive transaction), the real ServerApp loop and ClientApp in this
process (tests/support/inprocess.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import pollinate.server.store as store_module
from pollinate.server.app import run_federation
from pollinate.server.store import LeaseHeld, RoundStore, StoreError
from pollinate.simulations.cli import write_node_data
from pollinate.simulations.scenario import load_scenario
from tests.support.commands import pollinate
from tests.support.inprocess import InProcessGrid, serverapp_identity
from tests.support.paths import SCENARIOS


def test_a_second_coordinator_on_a_live_run_is_refused_by_name_and_leaves_the_run_alone(
        tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = RoundStore(tiny_cfg.store.db)
    run_id = store.start_run(tiny_cfg.to_flat(), "fedavg", "tiny-bert", holder="coordinator-a:4242:beef",
                             lease_ttl_s=600)
    store.begin_attempt(run_id, 1, 1)
    with pytest.raises(LeaseHeld, match=f"run {run_id} is being worked on by coordinator coordinator-a:4242:beef"):
        run_federation(None, tiny_cfg.replace(**{"store.resume-run": run_id}))  # type: ignore[arg-type]
    assert store.run(run_id).status == "running" and len(store.attempts(run_id)) == 1  # untouched
    # The command refuses it before starting a SuperLink, in one line.
    code, out = pollinate(capsys, "server", "--resume", str(run_id), "--db", tiny_cfg.store.db, "--no-status")
    assert code != 0 and "coordinator-a:4242:beef" in out and "Traceback" not in out


class LockingGrid(InProcessGrid):
    """Nodes that answer as usual, while another program takes the store's write lock as round 1 trains."""

    db: Path
    lock: sqlite3.Connection | None = None

    def deliver(self, msg):  # type: ignore[no-untyped-def]
        if msg.metadata.message_type == "train" and self.lock is None:
            self.lock = sqlite3.connect(self.db, isolation_level=None)
            self.lock.execute("BEGIN EXCLUSIVE")
        return super().deliver(msg)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.execute("ROLLBACK")
            self.lock.close()


def test_a_round_that_cannot_be_stored_ends_the_run_interrupted_and_resumable_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "RETRY_DELAYS_S", (0.0, 0.0))  # three attempts per transaction
    monkeypatch.setattr(store_module, "SQLITE_BUSY_TIMEOUT_S", 0.05)
    cfg, sim = load_scenario(SCENARIOS / "tiny.toml", {
        "store.db": f"sqlite:///{tmp_path / 'store.db'}", "store.output-dir": str(tmp_path / "out"),
        "federation.rounds": 1, "train.local-steps": 2}, 2)
    cfg, _ = write_node_data(cfg, sim, tmp_path / "partitions")
    grid = LockingGrid.of_scenario(cfg, sim.clients)
    grid.db = tmp_path / "store.db"
    waits: list[float] = []

    def wait(_: RoundStore, seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:  # record_round gave up after 2 waits; the lock lifts while finish_run retries
            grid.release()

    monkeypatch.setattr(RoundStore, "sleep", wait)
    with serverapp_identity(), pytest.raises(StoreError) as e:
        run_federation(grid, cfg, lease_ttl_s=3600)  # type: ignore[arg-type]
    message = str(e.value)
    assert "\n" not in message and "failed 3 time(s) in record_round (database is locked)" in message
    assert "`pollinate server --resume 1`" in message
    store = RoundStore(cfg.store.db)
    run = store.run(1)
    assert run.status == "interrupted" and run.error == message
    assert store.rounds(1) == [] and store.lease(1) == (None, None)  # nothing half-stored; free to resume
