"""Failed rounds are stored as rounds (reason + every node's record) and federation.on-round-failure decides."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollinate.server.rounds import RoundFailed
from pollinate.server.store import RoundStore
from tests.support.inprocess import run_in_process


def test_failed_rounds_are_stored_and_continue_until_too_many_in_a_row(tmp_path: Path, capsys) -> None:
    # faulty.toml: 3 of 5 nodes corrupt every upload, so 2 accepted < min-nodes 3 fails every round.
    # The coordinator loop and the faulty ClientApp, in this process (tests/support/inprocess.py).
    with pytest.raises(RoundFailed, match="round 2: only 2 of 5 updates were accepted"):  # the ServerApp fails
        run_in_process("faulty.toml", tmp_path, **{"federation.min-nodes": 3, "federation.rounds": 3,
                                                   "federation.on-round-failure": "continue",
                                                   "federation.max-consecutive-failures": 2})
    out = capsys.readouterr().out
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    [run] = store.runs()
    assert run.status == "failed" and "only 2 of 5 updates were accepted" in (run.error or "")
    rounds = store.rounds(run.id)
    assert [(r.number, r.status, r.participants, r.accepted) for r in rounds] == [(1, "failed", 5, 2),
                                                                                  (2, "failed", 5, 2)]
    assert all("federation.min-nodes = 3" in (r.reason or "") for r in rounds)
    for number in (1, 2):  # the ledger of a failed round is kept: who was accepted, who was rejected and why
        train = [u for u in store.client_updates(run.id, number) if u.phase == "train"]
        assert sorted(u.status for u in train) == ["accepted"] * 2 + ["rejected"] * 3
        assert any("NaN/Inf" in (u.reason or "") for u in train)
    assert all(r.adapter_sha256 is None for r in rounds) and store.last_checkpoint(run.id) is None
    assert rounds[1].parent_sha256 == rounds[0].parent_sha256  # round 2 started from the last good state again
    assert "round 1/3 failed" in out.replace("\n", "") and "1 in a row" in out
