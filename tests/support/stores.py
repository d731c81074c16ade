"""The PostgreSQL the store tests run against: its URL's variable, and a reset to an empty schema."""

from __future__ import annotations

POSTGRES_ENV = "POLLINATE_TEST_POSTGRES_URL"


def reset_postgres(url: str) -> None:
    """Drop every table of the round store (and Alembic's version table) in the database at ``url``."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        for table in ("privacy_ledger", "round_states", "run_attempts", "adapters", "client_updates", "rounds",
                      "runs", "alembic_version"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))
    engine.dispose()
