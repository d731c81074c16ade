"""The PostgreSQL the store tests run against (its URL's variable, a reset to an empty schema), and damage done
to a stored blob behind the store's back."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

POSTGRES_ENV = "POLLINATE_TEST_POSTGRES_URL"


def reset_postgres(url: str) -> None:
    """Drop every table of the round store (and Alembic's version table) in the database at ``url``, then
    migrate the empty database to the newest revision: a ``RoundStore`` migrates a database once per process,
    so a schema dropped behind its back is rebuilt here (and every reset migrates from empty again)."""
    from sqlalchemy import create_engine, text

    from pollinate.server.store import migrate

    engine = create_engine(url)
    with engine.begin() as conn:
        for table in ("privacy_ledger", "round_states", "run_attempts", "adapters", "client_updates", "rounds",
                      "runs", "alembic_version"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))
    migrate(engine)
    engine.dispose()


def damage_stored_blob(engine: Engine, table: str) -> None:
    """Flip one bit of the one blob in ``table`` (``adapters`` or ``round_states``), as a damaged disk or a
    hand-edited database would: through SQL on the real database, behind the store's back."""
    from sqlalchemy import text

    if table not in ("adapters", "round_states"):
        raise ValueError(f"{table!r} holds no stored blob; use 'adapters' or 'round_states'")
    with engine.begin() as conn:
        row_id, data = conn.execute(text(f"SELECT id, data FROM {table}")).one()
        data = bytes(data)
        conn.execute(text(f"UPDATE {table} SET data = :data WHERE id = :id"),
                     {"data": data[:-1] + bytes([data[-1] ^ 1]), "id": row_id})
