"""Database faults: a locked SQLite file is retried with bounded backoff, then a one-line StoreError."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

import pollinate.server.store as store_module
from pollinate.server.store import RoundRecord, RoundStore, StoreError


def _round(number: int) -> RoundRecord:
    return RoundRecord(number=number, participants=1, accepted=1, train_loss=0.5, eval_loss=None, eval_accuracy=None,
                       bytes_up=1, bytes_down=1, duration_s=1.0, clients=[])


ADAPTER = {"a.lora_B.weight": np.zeros((4, 2), np.float32)}


class FileLock:
    """Another program holding SQLite's write lock on the store's file (a real exclusive transaction)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None  # type: ignore[assignment]


@pytest.fixture
def quick_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three attempts, no waits, a 50 ms busy timeout: the same retry code, at test speed."""
    monkeypatch.setattr(store_module, "RETRY_DELAYS_S", (0.0, 0.0))
    monkeypatch.setattr(store_module, "SQLITE_BUSY_TIMEOUT_S", 0.05)


def test_a_lock_that_lifts_during_the_backoff_is_retried_and_the_round_stored_once(tmp_path: Path,
                                                                                   quick_faults: None) -> None:
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    lock = FileLock(tmp_path / "store.db")
    waits: list[float] = []

    def wait(seconds: float) -> None:  # the other program commits while the store backs off
        waits.append(seconds)
        lock.release()

    store.sleep = wait  # type: ignore[method-assign]
    store.record_round(run_id, _round(1), ADAPTER)
    assert waits == [0.0]  # one failed attempt ("database is locked"), then stored
    assert [r.number for r in store.rounds(run_id)] == [1]


def test_a_lock_that_outlasts_every_retry_is_a_one_line_error(tmp_path: Path, quick_faults: None) -> None:
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    lock = FileLock(tmp_path / "store.db")
    try:
        with pytest.raises(StoreError) as e:
            store.record_round(run_id, _round(1), ADAPTER)
    finally:
        lock.release()
    message = str(e.value)
    assert "failed 3 time(s) in record_round (database is locked)" in message and "\n" not in message
    assert store.rounds(run_id) == []  # nothing half-written


def test_a_postgresql_connection_reset_mid_run_is_survived(tmp_path: Path) -> None:
    """The server drops every connection of the store (a restart, a failover): the next round is still stored."""
    import os

    from sqlalchemy import create_engine, text

    from tests.support.stores import POSTGRES_ENV, reset_postgres

    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"set {POSTGRES_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test); .ci/run sets it")
    reset_postgres(url)
    store = RoundStore(url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    store.record_round(run_id, _round(1), ADAPTER)  # the store's pool now holds an open connection
    admin = create_engine(url)
    with admin.begin() as conn:
        killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    admin.dispose()
    assert killed >= 1  # the store's pooled connection was among them
    store.record_round(run_id, _round(2), ADAPTER)
    assert [r.number for r in store.rounds(run_id)] == [1, 2]
