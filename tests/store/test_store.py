"""The round store on real databases: SQLite files and PostgreSQL (when $POLLINATE_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from pollinate.server.store import ClientRecord, RoundRecord, RoundStore, StoreError, sha256
from tests.support.stores import damage_stored_blob


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
    rounds = store.rounds(run_id)
    assert [r.number for r in rounds] == [1, 2]
    updates = store.client_updates(run_id, 1)
    assert len(updates) == 4 and updates[0].node_id == 2**63  # 64-bit Flower node ids survive
    assert {u.round_number for u in updates} == {1}
    assert [u.reason for u in updates if u.status == "rejected"] == ["tensor 'x' holds 1 NaN/Inf"]
    assert [u.round_number for u in store.client_updates(run_id)] == [1] * 4 + [2] * 4
    for n, digest, stored_round in zip((1, 2), digests, rounds):
        adapter = store.adapter(run_id, n)
        assert all(np.array_equal(adapter.tensors()[k], v) for k, v in _adapter(n).items())
        assert adapter.sha256 == stored_round.adapter_sha256 == digest == sha256(adapter.data)
        assert stored_round.adapter_nbytes == len(adapter.data)


def test_reads_return_frozen_records_not_database_rows(store_url: str) -> None:
    import dataclasses

    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    store.record_round(run_id, _round(1), _adapter(1))
    store.begin_attempt(run_id, flower_run_id=2**64 - 1, first_round=1)
    read = [store.run(run_id), store.rounds(run_id)[0], store.client_updates(run_id)[0], store.attempts(run_id)[0],
            store.adapter(run_id, 1)]
    for record in read:
        assert dataclasses.is_dataclass(record) and type(record).__dataclass_params__.frozen, type(record)
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.status = "changed"  # type: ignore[union-attr]
    assert store.attempts(run_id)[0].flower_run_id == 2**64 - 1  # unsigned 64-bit Flower run ids survive


def test_a_round_is_one_transaction(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    store.record_round(run_id, _round(1), _adapter(1))
    with pytest.raises(IntegrityError):
        store.record_round(run_id, _round(1, clients=5), _adapter(2))  # the same round twice
    assert len(store.rounds(run_id)) == 1
    assert len(store.client_updates(run_id)) == 4  # none of the 6 new rows
    adapter = store.adapter(run_id, 1).tensors()  # the first round's adapter, not the second's
    assert all(np.array_equal(adapter[k], v) for k, v in _adapter(1).items())


def test_a_tampered_adapter_fails_its_checksum(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    store.record_round(run_id, _round(1), _adapter(1))
    damage_stored_blob(store.engine, "adapters")
    with pytest.raises(StoreError, match="fails its sha256 check"):
        store.adapter(run_id, 1)


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
    assert [(u.node_id, u.reason) for u in store.client_updates(run_id, 2)] == [(5, "node offline")]
    assert rows[1].adapter_sha256 is None and rows[1].adapter_nbytes is None  # no adapter for a failed round
    with pytest.raises(StoreError, match="no stored adapter for round 2"):
        store.adapter(run_id, 2)
    checkpoint = store.last_checkpoint(run_id)  # the failed round is no checkpoint: round 1 is
    assert checkpoint is not None and checkpoint.number == 1
    assert checkpoint.adapter_sha256 == rows[0].adapter_sha256 == store.adapter(run_id, 1).sha256
    assert np.array_equal(checkpoint.state["state/x"], np.ones(3, np.float32))


def test_a_tampered_round_state_is_refused_for_resume(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    assert store.last_checkpoint(run_id) is None
    store.record_round(run_id, _round(1), _adapter(1), {"state/x": np.ones(3, np.float32)})
    damage_stored_blob(store.engine, "round_states")
    with pytest.raises(StoreError, match="cannot be resumed"):
        store.last_checkpoint(run_id)


def test_migrations_run_once_per_database_per_process(tmp_path) -> None:
    """A coordinator opens its store several times (command, ServerApp, status service): Alembic runs once."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(statement)

    url = f"sqlite:///{tmp_path / 'store.db'}"
    event.listen(Engine, "before_cursor_execute", seen)
    try:
        RoundStore(url).start_run({}, "fedavg", "tiny-bert")
        first = [s for s in statements if "alembic_version" in s]
        statements.clear()
        again = RoundStore(url)
        second = [s for s in statements if "alembic_version" in s]
        statements.clear()
        RoundStore(f"sqlite:///{tmp_path / 'other.db'}")
        other = [s for s in statements if "alembic_version" in s]
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    assert any(s.lstrip().upper().startswith("CREATE TABLE ALEMBIC_VERSION") for s in first)  # migrated from empty
    assert second == []  # the second open of the same database in this process leaves Alembic alone...
    assert [r.strategy for r in again.runs()] == ["fedavg"]  # ...and reads the schema the first one made
    assert other  # another database is migrated on its own
    for _ in range(2):  # an in-memory database is new with every engine: always migrated
        assert RoundStore("sqlite://").runs() == []


def test_withholding_the_password_is_pure() -> None:
    import os

    from pollinate.server.store import PASSWORD_ENV, withhold_password

    before = dict(os.environ)
    assert withhold_password("postgresql+psycopg://u:pw@db:5432/x") == ("postgresql+psycopg://u:***@db:5432/x", "pw")
    assert withhold_password("postgresql+psycopg://u@db:5432/x") == ("postgresql+psycopg://u@db:5432/x", None)
    assert withhold_password("postgresql+psycopg://u:***@db:5432/x") == ("postgresql+psycopg://u:***@db:5432/x", None)
    assert dict(os.environ) == before and PASSWORD_ENV not in os.environ


def test_the_store_password_never_travels_with_the_run_config(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Flower sends the run config to every node: `pollinate server --db URL-with-password` sends ``***``;
    the password stays in the coordinator's process and goes only to the SuperLink it starts."""
    import argparse
    import os
    import subprocess
    import sys

    from sqlalchemy.engine import make_url

    from pollinate.server.cli import add_arguments, run_config
    from pollinate.server.store import PASSWORD_ENV, password_env
    from pollinate.runtime.app_dir import write_app_dir
    from tests.support.paths import REPO, TINY
    from tests.support.stores import POSTGRES_ENV, reset_postgres

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
    assert PASSWORD_ENV not in os.environ  # nothing writes the environment...
    assert password_env(cfg.store.db) == {PASSWORD_ENV: "s3cret-pw"}  # ...the SuperLink is given it (launch.py)
    store = RoundStore(cfg.store.db)
    assert store.engine.url.password == "s3cret-pw" and "s3cret-pw" not in store.url
    run_id = store.start_run(cfg.to_flat(), "fedavg", "tiny-bert")
    assert "s3cret-pw" not in str(store.run(run_id).config)
    # A resume hands on the withheld URL too.
    resumed = run_config(parser.parse_args(["--resume", str(run_id), "--db", url]))
    assert (resumed.store.db, resumed.store.resume_run) == (cfg.store.db, run_id)

    # A coordinator process (the ServerApp under the SuperLink) opens the withheld URL with the password its
    # parent put in its environment, and without it is told what to set.
    opens = [sys.executable, "-c", "import sys; from pollinate.server.store import RoundStore; "
             "print(RoundStore(sys.argv[1]).engine.url.password)", cfg.store.db]
    child = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    given = subprocess.run(opens, env={**child, **password_env(cfg.store.db)}, cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert given.returncode == 0 and given.stdout.strip() == "s3cret-pw", given.stderr[-2000:]
    without = subprocess.run(opens, env=child, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert without.returncode != 0 and f"password withheld (***) and {PASSWORD_ENV} is not set" in without.stderr
