"""Persist before release: a coordinator killed after aggregating, or after committing but before any node got the
new adapter, resumes to exactly the epsilon an uninterrupted run spends.

The coordinator is a real process (tests/support/crash_run.py) that ``os._exit``s at the named point
(server/crash_points.py): no handler, no ``finally`` runs, as after kill -9. The resume runs in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pollinate.server.crash_points import AFTER_AGGREGATION, AFTER_COMMIT, CRASH_ENV, CRASH_EXIT_CODE
from pollinate.server.store import RoundStore
from tests.support.inprocess import run_in_process
from tests.support.paths import REPO

CLIENTS = 2
CENTRAL_DP = {"privacy.mode": "central", "privacy.noise-multiplier": 1.0, "privacy.target-epsilon": 50.0,
              "privacy.clip-norm": 0.5, "federation.rounds": 2, "federation.strategy": "ffa-lora",
              "train.local-steps": 2}


def _store(workdir: Path) -> RoundStore:
    return RoundStore(f"sqlite:///{workdir / 'store.db'}")


def _epsilons(store: RoundStore, run_id: int) -> list[tuple[int, float]]:
    return [(n, e.epsilon) for n, e in store.privacy_ledger(run_id)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, float]]:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_id = run_in_process("tiny.toml", workdir, CLIENTS, **CENTRAL_DP)
    return _epsilons(_store(workdir), run_id)


def _crash(workdir: Path, point: str) -> None:
    env = {**os.environ, CRASH_ENV: point}
    done = subprocess.run([sys.executable, "-m", "tests.support.crash_run", str(workdir), str(CLIENTS),
                           json.dumps(CENTRAL_DP)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == CRASH_EXIT_CODE, done.stderr[-2000:]


def _wait_for_lease_expiry(store: RoundStore, run_id: int) -> None:
    """The dead coordinator's lease (1 s) must run out before another may take the run: wait for it, bounded."""
    _, expires = store.lease(run_id)
    assert expires is not None  # it died holding the lease, as a killed process does
    time.sleep(max(0.0, min(5.0, (expires - datetime.now(UTC)).total_seconds())) + 0.05)


@pytest.mark.parametrize("point", [AFTER_AGGREGATION, AFTER_COMMIT])
def test_a_coordinator_killed_around_the_commit_resumes_to_the_uninterrupted_epsilon(
        point: str, tmp_path: Path, uninterrupted: list[tuple[int, float]]) -> None:
    _crash(tmp_path, point)
    store = _store(tmp_path)
    [run] = store.runs()
    assert run.status == "running"  # nothing ran after the kill
    rounds = store.rounds(run.id)
    if point == AFTER_AGGREGATION:  # the new adapter lived only in the dead process: nothing of round 1 stored
        assert rounds == [] and store.privacy_ledger(run.id) == []
    else:  # committed with its adapter and ledger, released to no node (no evaluation, no round 2 exchange)
        assert [(r.number, r.status, r.eval_loss) for r in rounds] == [(1, "completed", None)]
        assert rounds[0].adapter_sha256 is not None
        assert _epsilons(store, run.id) == uninterrupted[:1]
        assert not [u for u in store.client_updates(run.id, 1) if u.phase == "evaluate"]
        assert store.client_updates(run.id, 2) == []

    _wait_for_lease_expiry(store, run.id)
    run_in_process("tiny.toml", tmp_path, CLIENTS, **CENTRAL_DP, **{"store.resume-run": run.id})
    assert store.run(run.id).status == "completed"
    assert _epsilons(store, run.id) == uninterrupted  # the accountant is deterministic: exactly equal
    assert [(r.number, r.status) for r in store.rounds(run.id)] == [(1, "completed"), (2, "completed")]
