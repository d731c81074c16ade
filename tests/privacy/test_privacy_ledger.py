"""The privacy ledger on real databases: written with its round, read back exactly, infinite epsilon kept."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from pollinate.privacy.ledger import PrivacyEntry, entry_from_report, releases
from pollinate.server.store import ClientRecord, RoundRecord, RoundStore


def _entries(round_number: int) -> list[PrivacyEntry]:
    spent = [PrivacyEntry(node_id=2**63 + i, mechanism="dp-sgd", status="spent", noise_multiplier=1.1,
                          clip_norm=1.0, sample_rate=0.01, steps=40, epsilon=0.5 * round_number + i, delta=1e-5)
             for i in range(2)]
    refused = PrivacyEntry(node_id=9, mechanism="dp-sgd", status="refused", noise_multiplier=1.1, clip_norm=1.0,
                           sample_rate=0.01, steps=0, epsilon=math.inf, delta=1e-5, reason="privacy budget: over 8")
    server = PrivacyEntry(node_id=None, mechanism="central-gaussian", status="spent", noise_multiplier=0.9,
                          clip_norm=0.3, sample_rate=1.0, steps=1, epsilon=1.5, delta=1e-5,
                          metrics={"unclipped-fraction": 0.4, "next-clip-norm": 0.32})
    return [*spent, refused, server]


def _round(number: int) -> RoundRecord:
    return RoundRecord(number=number, participants=3, accepted=2, train_loss=0.5, eval_loss=None, eval_accuracy=None,
                       bytes_up=1, bytes_down=1, duration_s=1.0,
                       clients=[ClientRecord(node_id=9, phase="train", status="failed", reason="client error: x")],
                       privacy=_entries(number))


def _adapter() -> dict[str, np.ndarray]:
    return {"a.lora_B.weight": np.zeros((4, 2), np.float32)}


def test_ledger_rows_are_stored_with_their_round_and_read_back(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "ffa-lora", "tiny-bert")
    other = store.start_run({}, "ffa-lora", "tiny-bert")
    for n in (1, 2):
        store.record_round(run_id, _round(n), _adapter())
    store.record_round(other, _round(1), _adapter())
    ledger = store.privacy_ledger(run_id)
    assert [n for n, _ in ledger] == [1] * 4 + [2] * 4
    assert [e for n, e in ledger if n == 2] == _entries(2)  # every field, 64-bit node ids and inf epsilon included
    assert releases([e for _, e in ledger], node_id=2**63)[0].steps == 40
    assert len(releases([e for _, e in ledger], node_id=None)) == 2  # the server's own history


def test_ledger_rows_share_the_round_transaction(store_url: str) -> None:
    store = RoundStore(store_url)
    run_id = store.start_run({}, "fedavg", "tiny-bert")
    store.record_round(run_id, _round(1), _adapter())
    with pytest.raises(IntegrityError):
        store.record_round(run_id, _round(1), _adapter())
    assert len(store.privacy_ledger(run_id)) == 4  # none of the second round 1's rows


def test_a_training_report_becomes_a_ledger_entry() -> None:
    report = {"num-examples": 100, "dp-epsilon": 2.5, "dp-delta": 1e-5, "dp-noise-multiplier": 1.2,
              "dp-clip-norm": 1.0, "dp-sample-rate": 0.08, "dp-steps": 40}
    entry = entry_from_report(5, "sample", report)
    assert entry == PrivacyEntry(node_id=5, mechanism="dp-sgd", status="spent", noise_multiplier=1.2, clip_norm=1.0,
                                 sample_rate=0.08, steps=40, epsilon=2.5, delta=1e-5)
    assert entry_from_report(5, "sample", {"num-examples": 100}) is None
