"""The run lease on real databases: one live coordinator per run, refused by name, taken over only once expired."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from pollinate.server.lease import refuse_live_run
from pollinate.server.store import LeaseHeld, RoundRecord, RoundStore


def _round(number: int) -> RoundRecord:
    return RoundRecord(number=number, participants=1, accepted=1, train_loss=0.5, eval_loss=None, eval_accuracy=None,
                       bytes_up=1, bytes_down=1, duration_s=1.0, clients=[])


ADAPTER = {"a.lora_B.weight": np.zeros((4, 2), np.float32)}


def _expire(url: str, run_id: int) -> None:
    """The holder stopped renewing long ago: its expiry set into the past, through SQL behind the store's back."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE runs SET lease_expires_at = :t WHERE id = :id"),
                     {"t": datetime.now(UTC) - timedelta(minutes=5), "id": run_id})
    engine.dispose()


def test_a_second_coordinator_on_a_live_run_is_refused_and_told_who_holds_it(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert", holder="host-a:101:aaaa", lease_ttl_s=60)
    with pytest.raises(LeaseHeld, match=f"run {run_id} is being worked on by coordinator host-a:101:aaaa"):
        store.acquire_lease(run_id, "host-b:202:bbbb", 60)
    with pytest.raises(LeaseHeld, match="host-a:101:aaaa"):
        refuse_live_run(store, run_id)
    with pytest.raises(LeaseHeld, match="lost the lease"):  # the refused one cannot store a round either
        store.record_round(run_id, _round(1), ADAPTER, holder="host-b:202:bbbb", lease_ttl_s=60)
    store.renew_lease(run_id, "host-a:101:aaaa", 60)  # the holder's heartbeat goes on
    store.record_round(run_id, _round(1), ADAPTER, holder="host-a:101:aaaa", lease_ttl_s=60)
    assert [r.number for r in store.rounds(run_id)] == [1]
    assert store.lease(run_id)[0] == "host-a:101:aaaa"


def test_a_stale_lease_is_taken_over_only_after_it_expires_and_fences_the_old_holder(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert", holder="old", lease_ttl_s=60)
    with pytest.raises(LeaseHeld):
        store.acquire_lease(run_id, "new", 60)
    _expire(store_url, run_id)
    refuse_live_run(store, run_id)  # expired: nothing to refuse
    store.acquire_lease(run_id, "new", 60)
    assert store.lease(run_id)[0] == "new"
    # The old coordinator wakes up: it can neither store a round, nor renew, nor end the run.
    with pytest.raises(LeaseHeld, match="lost the lease on run .* to new"):
        store.record_round(run_id, _round(1), ADAPTER, holder="old", lease_ttl_s=60)
    with pytest.raises(LeaseHeld):
        store.renew_lease(run_id, "old", 60)
    store.finish_run(run_id, "failed", error="old coordinator", holder="old")
    assert store.run(run_id).status == "running" and store.rounds(run_id) == []
    store.finish_run(run_id, "completed", holder="new")
    assert store.run(run_id).status == "completed" and store.lease(run_id) == (None, None)


def test_a_released_lease_lets_the_next_coordinator_in_at_once(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert", holder="first", lease_ttl_s=60)
    store.finish_run(run_id, "interrupted", error="stopped", holder="first")
    store.acquire_lease(run_id, "second", 60)
    assert store.lease(run_id)[0] == "second"
