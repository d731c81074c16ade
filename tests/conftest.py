"""Shared fixtures: tiny run configs, a SQLite file store, the PostgreSQL URL from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.stores import POSTGRES_ENV, reset_postgres

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
# Simulated ClientApps run in Ray worker processes: let them import tests.support.apps.* too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    """A run config on a tiny random-init BERT (2 layers, hidden 64), storing into tmp_path."""
    from pollinate.proto.run_config import RunConfig

    return RunConfig().replace(**{
        "model.name": "tiny-bert", "model.max-length": 32, "adapter.r": 4, "adapter.alpha": 8.0,
        "train.local-steps": 3, "train.batch-size": 8, "train.lr": 5e-3,
        "store.db": f"sqlite:///{tmp_path / 'store.db'}", "store.output-dir": str(tmp_path / "runs")})


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A real database: a fresh SQLite file, or the PostgreSQL named by $POLLINATE_TEST_POSTGRES_URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"set {POSTGRES_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test); .ci/run sets it")
    reset_postgres(url)
    return url
