"""The round store on real databases: SQLite files and PostgreSQL (when $POLLINATE_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pollinate.server.store import (AdapterRow, ClientRecord, ClientUpdateRow, RoundRecord, RoundRow, RoundStore, StoreError,
                          sha256)


def _round(number: int, clients: int = 3) -> RoundRecord:
    records = [ClientRecord(node_id=2**63 + i, phase="train", status="accepted", num_examples=10 * (i + 1),
                            bytes_up=1000, bytes_down=1000, metrics={"train-loss": 0.5}) for i in range(clients)]
    records.append(ClientRecord(node_id=7, phase="train", status="rejected", reason="tensor 'x' holds 1 NaN/Inf"))
    return RoundRecord(number=number, participants=clients + 1, accepted=clients, train_loss=0.5, eval_loss=0.4,
                       eval_accuracy=0.8, bytes_up=3000, bytes_down=4000, duration_s=1.5, clients=records)


def _adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
            "a.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32)}


def test_a_run_its_rounds_and_adapters_are_stored_and_verified(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({"adapter.r": 4}, "fedavg", "tiny-bert")
    digests = [store.record_round(run_id, _round(n), _adapter(n)) for n in (1, 2)]
    store.finish_run(run_id, "completed", adapter_dir="/tmp/x")

    run = store.run(run_id)
    assert (run.status, run.strategy, run.config["adapter.r"], run.adapter_dir) == ("completed", "fedavg", 4, "/tmp/x")
    assert [r.number for r in store.rounds(run_id)] == [1, 2]
    updates = store.client_updates(run_id, 1)
    assert len(updates) == 4 and int(updates[0].node_id) == 2**63  # 64-bit Flower node ids survive
    assert [u.reason for u in updates if u.status == "rejected"] == ["tensor 'x' holds 1 NaN/Inf"]
    for n, digest in zip((1, 2), digests):
        loaded = store.load_adapter(run_id, n)
        assert all(np.array_equal(loaded[k], v) for k, v in _adapter(n).items())
        stored_digest, blob = store.adapter_digests(run_id)[n]
        assert stored_digest == digest == sha256(blob)


def test_a_round_is_one_transaction(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    store.record_round(run_id, _round(1), _adapter(1))
    with pytest.raises(IntegrityError):
        store.record_round(run_id, _round(1, clients=5), _adapter(2))  # the same round twice
    with Session(store.engine) as s:
        assert s.scalar(select(func.count()).select_from(RoundRow)) == 1
        assert s.scalar(select(func.count()).select_from(ClientUpdateRow)) == 4  # none of the 6 new rows
        assert s.scalar(select(func.count()).select_from(AdapterRow)) == 1


def test_a_tampered_adapter_fails_its_checksum(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    store.record_round(run_id, _round(1), _adapter(1))
    with Session(store.engine) as s, s.begin():
        row = s.scalars(select(AdapterRow)).one()
        row.data = row.data[:-1] + bytes([row.data[-1] ^ 1])
    with pytest.raises(StoreError, match="fails its sha256 check"):
        store.load_adapter(run_id, 1)


@pytest.mark.parametrize("url, says", [
    ("postgresql+psycopg://nobody@127.0.0.1:1/nothing", "cannot open the round store at postgresql+psycopg://"),
    ("sqlite:////nonexistent-dir/deeper/store.db", "cannot open the round store at sqlite:////nonexistent-dir"),
    ("not a url", "is not a database URL"),
])
def test_an_unreachable_database_fails_fast_and_says_what_to_check(url: str, says: str) -> None:
    with pytest.raises(StoreError) as e:
        RoundStore(url, connect_timeout_s=2)
    assert says in str(e.value)


def test_the_schema_is_managed_by_alembic_and_matches_the_models(store_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from pollinate.server.store import metadata

    store = RoundStore(store_url)
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() is not None
        assert compare_metadata(context, metadata) == []  # no model change without a migration
    RoundStore(store_url)  # opening an up-to-date store again migrates nothing and keeps the data


def test_a_failed_round_is_stored_with_its_reason_and_ledger_but_no_adapter(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    store.record_round(run_id, _round(1), _adapter(1), {"state/x": np.ones(3, np.float32)})
    failed = RoundRecord(number=2, participants=2, accepted=1, train_loss=None, eval_loss=None, eval_accuracy=None,
                         bytes_up=0, bytes_down=0, duration_s=60.0, status="failed", reason="only 1 of 2 updates",
                         clients=[ClientRecord(node_id=5, phase="train", status="failed", reason="node offline")])
    assert store.record_round(run_id, failed, None) is None
    rows = store.rounds(run_id)
    assert [(r.number, r.status, r.reason) for r in rows] == [(1, "completed", None), (2, "failed", "only 1 of 2 updates")]
    assert [(u.node_id, u.reason) for u in store.client_updates(run_id, 2)] == [("5", "node offline")]
    assert sorted(store.adapter_digests(run_id)) == [1]
    checkpoint = store.last_checkpoint(run_id)  # the failed round is no checkpoint: round 1 is
    assert checkpoint is not None and checkpoint.number == 1
    assert checkpoint.adapter_sha256 == store.adapter_digests(run_id)[1][0]
    assert np.array_equal(checkpoint.state["state/x"], np.ones(3, np.float32))


def test_a_tampered_round_state_is_refused_for_resume(store_url: str) -> None:
    from pollinate.server.store import RoundStateRow

    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    assert store.last_checkpoint(run_id) is None
    store.record_round(run_id, _round(1), _adapter(1), {"state/x": np.ones(3, np.float32)})
    with Session(store.engine) as s, s.begin():
        row = s.scalars(select(RoundStateRow)).one()
        row.data = row.data[:-1] + bytes([row.data[-1] ^ 1])
    with pytest.raises(StoreError, match="cannot be resumed"):
        store.last_checkpoint(run_id)



def test_the_store_password_never_travels_with_the_run_config(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Flower sends the run config to every node: `pollinate server --db URL-with-password` sends ``***``."""
    import argparse
    import os

    from sqlalchemy.engine import make_url

    from pollinate.server.cli import add_arguments, run_config
    from pollinate.server.store import PASSWORD_ENV
    from pollinate.simulations.engine import write_app_dir
    from tests.support.stores import POSTGRES_ENV, reset_postgres
    from tests.support.paths import TINY

    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"set {POSTGRES_ENV}; .ci/run sets it")
    reset_postgres(os.environ[POSTGRES_ENV])
    url = make_url(os.environ[POSTGRES_ENV]).set(password="s3cret-pw").render_as_string(hide_password=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    cfg = run_config(parser.parse_args(["--scenario", TINY, "--db", url, "--output", str(tmp_path)]))
    assert make_url(cfg.store.db).password == "***"
    assert "s3cret-pw" not in (write_app_dir(cfg, tmp_path / "app") / "pyproject.toml").read_text()
    assert os.environ[PASSWORD_ENV] == "s3cret-pw"  # the SuperLink, and the ServerApp it starts, inherit it
    store = RoundStore(cfg.store.db)
    assert store.engine.url.password == "s3cret-pw" and "s3cret-pw" not in store.url
    run_id = store.start_run(cfg.to_flat(), "fedavg", "tiny-bert")
    assert "s3cret-pw" not in str(store.run(run_id).config)
    # A resume hands on the withheld URL too.
    resumed = run_config(parser.parse_args(["--resume", str(run_id), "--db", url]))
    assert (resumed.store.db, resumed.store.resume_run) == (cfg.store.db, run_id)

    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(StoreError, match=f"password withheld .* set {PASSWORD_ENV}"):
        RoundStore(cfg.store.db)
