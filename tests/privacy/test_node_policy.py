"""The node owns its privacy: its own policy and node-wide budget, a locked budget file, nothing unprotected sent.

Runs are the real coordinator loop against the real ClientApp in this process (tests/support/inprocess.py),
with each node's policy as the node config `pollinate client --max-epsilon E --delta D` writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Message
from flwr.common.config import parse_config_args

from pollinate.client.app import app as pollinate_client
from pollinate.client.node import node_config
from pollinate.client.private_training import BudgetRefused, plan_round
from pollinate.privacy.accountant import Release, epsilon
from pollinate.privacy.budget import BudgetExceeded, BudgetFile, Limit, SpentRound
from pollinate.privacy.node_policy import NodePolicy
from pollinate.proto import pollinate_status_pb2 as pb
from pollinate.proto.adapter_record import REPORT
from pollinate.proto.instructions import Instructions
from pollinate.proto.node_config import NodeConfig
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.server.privacy_rounds import RELEASED_KEYS
from pollinate.server.status_client import connect
from pollinate.server.status_service import serve_status
from pollinate.server.store import RoundStore
from tests.support.commands import pollinate
from tests.support.inprocess import run_in_process

Z, DELTA = 3.0, 1e-5  # local DP, one release per round: epsilon 1.386 after one, 2.029 after two (delta 1e-5)
ONE, TWO = epsilon([Release(Z, 1.0, 1)], DELTA), epsilon([Release(Z, 1.0, 1)] * 2, DELTA)


def _local_cfg(**extra: object) -> RunConfig:
    return RunConfig().replace(**{"privacy.mode": "local", "privacy.clip-norm": 0.5, "privacy.noise-multiplier": Z,
                                  "privacy.target-epsilon": 2.0, "privacy.delta": DELTA, **extra})


@pytest.mark.parametrize("run, says", [
    ({"privacy.mode": "off"}, "this run uses no differential privacy"),
    ({"privacy.mode": "central"}, "central DP, whose noise the coordinator adds"),
    ({"privacy.delta": 1e-4}, "privacy.delta = 0.0001 is larger than this node's --delta 1e-05"),
    ({"privacy.target-epsilon": 8.0}, "privacy.target-epsilon = 8 exceeds this node's remaining budget 3"),
])
def test_a_node_policy_refuses_a_weaker_run_before_training(tmp_path: Path, run: dict, says: str) -> None:
    policy = NodePolicy(max_epsilon=3.0, delta=DELTA)
    with pytest.raises(BudgetRefused, match=says.replace("(", r"\(").replace(")", r"\)")):
        plan_round(_local_cfg(**run), Instructions(round=1, privacy_run_key="k"), 1000,
                   BudgetFile(tmp_path / "b.json"), policy)
    assert not (tmp_path / "b.json").exists()  # a refusal spends nothing


def test_the_node_wide_budget_ignores_the_server_key_and_the_per_run_option_does_not(tmp_path: Path) -> None:
    budget, cfg = BudgetFile(tmp_path / "b.json"), _local_cfg(**{"privacy.target-epsilon": 1.5})
    for key in ("run-a", "run-b"):  # a coordinator that sends a new key each time
        plan = plan_round(cfg, Instructions(round=1, privacy_run_key=key), 1000, budget, NodePolicy(5.0, DELTA))
        budget.record(plan.run_key, plan.spent, plan.limits)
    assert budget.spent(None, DELTA) == pytest.approx(TWO) and budget.spent("run-b", DELTA) == pytest.approx(ONE)
    # Node-wide: a third key does not reset the spend; 1.5 no longer fits in 3.4 - 2.03.
    with pytest.raises(BudgetRefused, match=r"remaining budget 1.371 \(--max-epsilon 3.4, 2.029 spent across every"):
        plan_round(cfg, Instructions(round=1, privacy_run_key="run-c"), 1000, budget, NodePolicy(3.4, DELTA))
    # Per run, as the node may choose: the new key starts from zero.
    plan = plan_round(cfg, Instructions(round=1, privacy_run_key="run-c"), 1000, budget,
                      NodePolicy(3.4, DELTA, "run"))
    assert plan.limits[-1] == Limit(3.4, DELTA, "run-c")


def test_a_release_is_checked_again_under_the_lock_and_not_recorded_over_the_limit(tmp_path: Path) -> None:
    budget, spent = BudgetFile(tmp_path / "b.json"), SpentRound(1, "local-gaussian", Z, 1.0, 1, 0.5)
    budget.record("a", spent, (Limit(1.5, DELTA, None),))
    # Another run spent since this one planned: the second release would reach 2.03 > 1.5.
    with pytest.raises(BudgetExceeded, match="over its epsilon 1.5 at delta 1e-05 across every run"):
        budget.record("b", spent, (Limit(1.5, DELTA, None),))
    assert [len(rows) for rows in json.loads(budget.path.read_text()).values()] == [1]


_WRITER = """
import sys
from pollinate.privacy.budget import BudgetFile, SpentRound
budget = BudgetFile(sys.argv[1])
for i in range(40):
    budget.record(sys.argv[2], SpentRound(i, "local-gaussian", 3.0, 1.0, 1, 0.5))
"""


def test_two_processes_writing_one_budget_file_lose_no_release(tmp_path: Path) -> None:
    # Each record is a read-modify-write of the whole file; without the lock, concurrent writers drop rows.
    path = tmp_path / "b.json"
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), key]) for key in ("run-a", "run-b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    assert {k: len(v) for k, v in json.loads(path.read_text()).items()} == {"run-a": 40, "run-b": 40}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.json.lock"]  # no temporary file left


@pytest.mark.parametrize("flags, says", [
    (["--max-epsilon", "nan"], "--max-epsilon nan is invalid"),
    (["--max-epsilon", "inf"], "--max-epsilon inf is invalid"),
    (["--max-epsilon", "0"], "--max-epsilon 0.0 is invalid"),
    (["--max-epsilon", "3", "--delta", "1"], "--delta 1.0 is invalid"),
    (["--delta", "1e-5"], "--delta and --budget-scope belong to this node's privacy policy"),
])
def test_bad_policy_flags_are_one_line_errors_before_anything_starts(capsys, tmp_path: Path, flags: list[str],
                                                                     says: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n')
    code, said = pollinate(capsys, "client", "--superlink", "127.0.0.1:1", "--data", str(data), "--wait", "1", *flags)
    assert code == 2 and says in said and "Traceback" not in said, said


def test_the_policy_reaches_the_clientapp_through_flowers_node_config(tmp_path: Path) -> None:
    data = tmp_path / "node.jsonl"
    data.write_text('{"text": "a fine film", "label": 1}\n')
    config = node_config(data, 4, "cpu", None, NodePolicy(3.0, 1e-6, "run"))
    node = NodeConfig.from_flower(parse_config_args([config]))  # as the SuperNode hands it to the ClientApp
    assert node.policy == NodePolicy(3.0, 1e-6, "run")
    assert NodeConfig.from_flower(parse_config_args([node_config(data, 4, "cpu")])).policy is None
    with pytest.raises(ConfigError, match="max-epsilon"):
        NodeConfig.from_flower({"data-path": str(data), "max-delta": 1e-5})


def _assert_nothing_unreleased(store: RoundStore, run_id: int) -> None:
    """The store holds no per-node count, loss or accuracy, and no per-node metric outside the DP release's own."""
    updates = store.client_updates(run_id)
    assert updates and all(u.num_examples == 0 for u in updates)
    assert all(set(u.metrics) <= RELEASED_KEYS for u in updates), [u.metrics for u in updates]
    assert "evaluate" not in {u.phase for u in updates}
    assert all(r.train_loss is None and r.eval_loss is None and r.eval_accuracy is None
               for r in store.rounds(run_id))
    assert not store.run(run_id).initial_metrics
    server = serve_status(store.url, "127.0.0.1", 0, poll_interval_s=0.05)
    try:
        stub = connect(f"127.0.0.1:{server.port}")
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=30)
        assert not run.initial_metrics
        for stored in run.rounds:
            reply = stub.GetRound(pb.GetRoundRequest(run_id=run_id, round=stored.number), timeout=30)
            assert not any(reply.HasField(f) for f in ("train_loss", "eval_loss", "eval_accuracy"))
            assert reply.clients and all(c.num_examples == 0 and set(c.metrics) <= RELEASED_KEYS
                                         for c in reply.clients)
    finally:
        server.stop()


class _Recording:
    """Wraps the ClientApp: every report a node sends, as it leaves the node."""

    def __init__(self) -> None:
        self.app, self.reports = pollinate_client, []

    def __call__(self, message: Message, context) -> Message:
        reply = self.app(message, context)
        if reply.has_content() and REPORT in reply.content.metric_records:
            self.reports.append((message.metadata.message_type, dict(reply.content.metric_records[REPORT])))
        return reply


def _policy_node(budgets: Path, max_epsilon: float = 3.0):
    return lambda i: {"privacy-state": str(budgets / f"node-{i}.json"), "max-epsilon": max_epsilon,
                      "max-delta": DELTA}


_RUN = {"privacy.mode": "local", "privacy.noise-multiplier": Z, "privacy.clip-norm": 0.5, "privacy.delta": DELTA,
        "federation.rounds": 1, "federation.strategy": "ffa-lora"}


def test_a_node_keeps_its_own_spend_across_two_runs_and_a_restart_and_refuses_epsilon_8(tmp_path: Path) -> None:
    budgets = tmp_path / "budgets"
    budgets.mkdir()
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    recording = _Recording()
    first = run_in_process("tiny.toml", tmp_path, 2, _policy_node(budgets), recording,
                           **_RUN, **{"privacy.target-epsilon": 2.0})
    # Under local DP only the release's own description leaves a node, and nothing else reaches the store.
    assert {kind for kind, _ in recording.reports} == {"query", "train"}  # no evaluation asked for, none sent
    assert all(set(report) <= RELEASED_KEYS | {"max-rank"} for _, report in recording.reports), recording.reports
    assert all("dp-epsilon" in report for kind, report in recording.reports if kind == "train")
    _assert_nothing_unreleased(store, first)
    # A second run (a new pollinate run key) against the same budget files: its target fits what is left.
    second = run_in_process("tiny.toml", tmp_path, 2, _policy_node(budgets),
                            **_RUN, **{"privacy.target-epsilon": 1.5})
    for run in (first, second):
        assert [(r.number, r.accepted) for r in store.rounds(run)] == [(1, 2)]
    # A fresh process reads what each node spent: both runs, at the node's own delta, whatever the keys were.
    read = subprocess.run([sys.executable, "-c", "import sys; from pollinate.privacy.budget import BudgetFile; "
                           "print([BudgetFile(p).spent(None, 1e-5) for p in sys.argv[1:]])",
                           *sorted(map(str, budgets.glob("node-*.json")))], capture_output=True, text=True,
                          timeout=120)
    assert read.returncode == 0, read.stderr
    assert eval(read.stdout) == pytest.approx([TWO, TWO])  # noqa: S307 - a list of floats this test printed
    # Restarted nodes (fresh contexts) keep that spend: a run configured for epsilon 8 is refused by every node.
    third = run_in_process("tiny.toml", tmp_path, 2, _policy_node(budgets), **_RUN, **{"privacy.target-epsilon": 8.0})
    refused = [u for u in store.client_updates(third) if u.phase == "train"]
    assert len(refused) == 2 and all(u.status == "failed" for u in refused)
    assert all(f"privacy.target-epsilon = 8 exceeds this node's remaining budget {3 - TWO:.4g}" in u.reason
               for u in refused)
    assert [e.status for _, e in store.privacy_ledger(third)] == ["refused", "refused"]
    assert [BudgetFile(p).spent(None, DELTA) for p in sorted(budgets.glob("node-*.json"))] == pytest.approx([TWO] * 2)


def test_under_central_dp_no_per_node_metric_leaves_a_node_or_reaches_the_store_or_the_status_service(
        tmp_path: Path) -> None:
    # The update bound on: the server computes each node's update norm from its reply, and must not store it.
    recording = _Recording()
    run = run_in_process("tiny.toml", tmp_path, 2, client_app=recording, **{
        "privacy.mode": "central", "privacy.clip-norm": 0.5, "privacy.noise-multiplier": 1.0,
        "privacy.target-epsilon": 8.0, "federation.update-bound": 3.0, "federation.rounds": 1,
        "federation.strategy": "ffa-lora"})
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    assert [(r.number, r.accepted) for r in store.rounds(run)] == [(1, 2)]
    assert {kind for kind, _ in recording.reports} == {"query", "train"}
    assert all(set(report) <= {"max-rank"} for _, report in recording.reports), recording.reports
    assert [e.node_id for _, e in store.privacy_ledger(run)] == [None]  # the server's release, and only it
    _assert_nothing_unreleased(store, run)
