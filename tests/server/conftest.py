"""A real 2-round in-process run shared by the progress and report tests: one run, not one per module."""

from __future__ import annotations

import pytest

from tests.support.inprocess import run_in_process_with_events


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory: pytest.TempPathFactory):
    """(workdir holding store.db, run id, every round event in order) of tiny.toml, 2 rounds, 4 nodes."""
    workdir = tmp_path_factory.mktemp("recorded-run")
    run_id, events = run_in_process_with_events("tiny.toml", workdir, **{"federation.rounds": 2})
    return workdir, run_id, events
