"""End to end through `pollinate simulate --dp ...`: the ledger, the budget stop and the privacy report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pollinate.privacy.accountant import Release, epsilon
from pollinate.server.store import RoundStore
from tests.support.paths import SCENARIOS
from tests.support.inprocess import run_in_process
from tests.support.commands import pollinate, simulated_run


def _report(store: RoundStore, run_id: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "pollinate.cli", "privacy", str(run_id), "--db", store.url, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _simulate_here(capsys: pytest.CaptureFixture[str], workdir: Path, *args: str) -> tuple[int, str]:
    """`pollinate simulate` in this process, for what is refused before any node starts: (exit code, output)."""
    return pollinate(capsys, "simulate", str(SCENARIOS / "tiny.toml"), "--db",
                     f"sqlite:///{workdir / 'store.db'}", "--output", str(workdir / "out"), *args)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("dp-sample")
    # z = 0.5 and 4 steps at q = 8 / n per round: epsilon 3.80, 3.99, then 4.10 > 4.05 in round 3.
    return simulated_run("tiny.toml", workdir, "--dp", "sample", "--noise-multiplier", "0.5", "--epsilon", "4.05",
                         "--clip-norm", "1.0")


def test_dp_runs_default_to_ffa_lora_and_say_so(sample_run) -> None:
    done, _, run = sample_run
    assert run.strategy == "ffa-lora"
    assert "--dp sample: federation.strategy = ffa-lora" in done.stdout


def test_sample_dp_ledger_has_every_node_every_round_with_growing_epsilon(sample_run) -> None:
    _, store, run = sample_run
    ledger = store.privacy_ledger(run.id)
    spent = [(n, e) for n, e in ledger if e.status == "spent"]
    assert sorted({n for n, _ in spent}) == [1, 2] and len(spent) == 8
    nodes = {e.node_id for _, e in spent}
    assert len(nodes) == 4
    for node in nodes:
        eps = [e.epsilon for _, e in spent if e.node_id == node]
        history = [e.release for _, e in spent if e.node_id == node]
        assert eps == sorted(eps) and eps[-1] <= 4.05
        assert eps[-1] == pytest.approx(epsilon(history, 1e-5), rel=1e-9)  # the ledger is the accountant history
    entry = spent[0][1]
    assert (entry.mechanism, entry.noise_multiplier, entry.clip_norm, entry.steps, entry.delta) == \
        ("dp-sgd", 0.5, 1.0, 4, 1e-5)
    assert 0 < entry.sample_rate < 0.01  # batch 8 over a node's ~2560 training examples


def test_sample_dp_refuses_round_3_records_why_and_ends_cleanly(sample_run) -> None:
    done, store, run = sample_run
    assert run.status == "completed" and run.adapter_dir
    rounds = store.rounds(run.id)
    assert [(r.number, r.accepted) for r in rounds] == [(1, 4), (2, 4), (3, 0)]
    refused = [u for u in store.client_updates(run.id, 3) if u.phase == "train"]
    assert len(refused) == 4 and {u.status for u in refused} == {"failed"}
    assert all("privacy budget: round 3 would raise this node's epsilon from 3.991 to 4.103" in u.reason
               for u in refused)
    assert [e.status for n, e in store.privacy_ledger(run.id) if n == 3] == ["refused"] * 4
    assert "privacy budget spent" in done.stdout
    report = _report(store, run.id)
    assert report["stopped_by_budget"] and report["mode"] == "sample"
    assert report["epsilon"] == pytest.approx(3.991, abs=1e-3) and len(report["epsilon_by_node"]) == 4


def test_each_node_keeps_its_budget_in_a_file_beside_its_data(sample_run) -> None:
    _, _, run = sample_run
    partitions = Path(run.config["data.partition-dir"])
    budgets = sorted(partitions.glob("partition-*.privacy.json"))
    assert len(budgets) == 4
    [history] = json.loads(budgets[0].read_text()).values()
    assert [h["round"] for h in history] == [1, 2]


def test_central_dp_spends_the_run_budget_then_stops_cleanly(tmp_path: Path) -> None:
    # z = 1 with every node in every round: epsilon 4.73, 7.08, then 9.01 > 8 in round 3.
    done, store, run = simulated_run("tiny.toml", tmp_path, "--dp", "central", "--noise-multiplier", "1.0",
                                     "--epsilon", "8", "--clip-norm", "0.5", "--adaptive-clipping")
    assert run.status == "completed" and run.adapter_dir
    # --dp central's default strategy (docs/privacy-bench.md: ffa-lora does not learn there), and it says so
    assert run.strategy == "fedavg"
    assert "--dp central: federation.strategy = fedavg" in done.stdout
    assert [r.number for r in store.rounds(run.id)] == [1, 2]
    ledger = store.privacy_ledger(run.id)
    assert [(n, e.node_id, e.mechanism) for n, e in ledger] == [(1, None, "central-gaussian"),
                                                                (2, None, "central-gaussian")]
    first, second = ledger[0][1], ledger[1][1]
    assert first.epsilon == pytest.approx(epsilon([Release(1.0, 1.0, 1)], 1e-5))
    assert second.epsilon == pytest.approx(epsilon([Release(1.0, 1.0, 1)] * 2, 1e-5))
    assert second.epsilon <= 8
    assert first.clip_norm == 0.5 and second.clip_norm == pytest.approx(first.metrics["next-clip-norm"])
    assert 0 <= first.metrics["count-stddev"] and "unclipped-fraction" in first.metrics
    assert "round 3 would take the run's epsilon from 7.077 to 9.01" in done.stdout.replace("\n", "")
    report = _report(store, run.id)
    assert report["stopped_by_budget"] and report["epsilon"] == pytest.approx(second.epsilon)


def test_central_dp_composes_with_secure_aggregation(tmp_path: Path) -> None:
    # Nodes clip their own deltas (the server sees only the masked sum), the server noises the unmasked mean.
    # The coordinator loop and the ClientApp in this process (tests/support/inprocess.py): the four exchanges of each
    # round as Flower messages; the Simulation Engine runs secagg in tests/server/test_secure_rounds.py.
    run_in_process("tiny.toml", tmp_path, **{"privacy.mode": "central", "secagg.enabled": True,
                                             "privacy.noise-multiplier": 1.0, "privacy.target-epsilon": 8,
                                             "privacy.clip-norm": 0.5, "federation.rounds": 2,
                                             "federation.strategy": "ffa-lora"})
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    [run] = store.runs()
    assert run.status == "completed" and run.strategy == "ffa-lora"
    ledger = store.privacy_ledger(run.id)
    assert [(n, e.node_id, e.mechanism) for n, e in ledger] == [(1, None, "central-gaussian"),
                                                                (2, None, "central-gaussian")]
    assert all(e.metrics["secure-aggregation"] == 1.0 and e.metrics["noise-std"] == pytest.approx(1.0 * 0.5 / 4)
               for _, e in ledger)
    updates = store.client_updates(run.id)
    assert all(u.bytes_up < 1024 for u in updates if u.phase == "train")  # keys and a report, never an adapter
    # No evaluation under DP: a node's loss and accuracy are not covered by the mechanism (docs/privacy.md).
    assert sorted({u.phase for u in updates if u.status == "accepted"}) == [
        "query", "train", "train.secagg_mask", "train.secagg_share", "train.secagg_unmask"]
    assert all(u.num_examples == 0 and not u.metrics for u in updates)  # nodes sent no count, no loss



def test_local_dp_noises_every_upload_on_the_node_and_each_node_stops_at_its_budget(tmp_path: Path) -> None:
    # One Gaussian release per node and round, z = 1: epsilon 4.73, 7.08, then 9.01 > 8 in round 3.
    # In this process (tests/support/inprocess.py): `--dp sample` and `--dp central` run on the Simulation Engine above.
    run_in_process("tiny.toml", tmp_path, **{"privacy.mode": "local", "privacy.noise-multiplier": 1.0,
                                             "privacy.target-epsilon": 8, "privacy.clip-norm": 0.5,
                                             "federation.strategy": "ffa-lora"})
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    [run] = store.runs()
    assert run.status == "completed" and run.strategy == "ffa-lora" and run.adapter_dir
    assert [(r.number, r.accepted) for r in store.rounds(run.id)] == [(1, 4), (2, 4), (3, 0)]
    ledger = store.privacy_ledger(run.id)
    spent = [(n, e) for n, e in ledger if e.status == "spent"]
    assert len(spent) == 8 and {e.mechanism for _, e in spent} == {"local-gaussian"}
    assert all((e.noise_multiplier, e.clip_norm, e.sample_rate, e.steps) == (1.0, 0.5, 1.0, 1) for _, e in spent)
    assert sorted({round(e.epsilon, 6) for _, e in spent}) == [
        round(epsilon([Release(1.0, 1.0, 1)] * k, 1e-5), 6) for k in (1, 2)]
    assert [e.status for n, e in ledger if n == 3] == ["refused"] * 4
    # The noise is the node's, before upload: each B holds clip(delta, C) + N(0, (2 z C)^2), and the weighted
    # mean of 4 nearly equal nodes has std 2 z C / 2 = 0.5 per value. Training alone (clipped to 0.5 in
    # norm over ~1,200 values) would move each value by ~0.015.
    before: dict[str, np.ndarray] = {}
    for number in (1, 2):
        adapter = store.adapter(run.id, number).tensors()
        moved = np.concatenate([(v - before.get(k, 0.0)).ravel() for k, v in adapter.items() if "lora_B" in k])
        assert moved.size >= 1000 and 0.45 < float(moved.std()) < 0.55, (number, moved.std())
        before = adapter
    assert _report(store, run.id)["stopped_by_budget"]


def test_adaptive_clipping_is_refused_under_secure_aggregation(tiny_cfg) -> None:
    from pollinate import strategies
    from pollinate.proto.run_config import ConfigError
    from pollinate.server.privacy_rounds import check_privacy_config

    cfg = tiny_cfg.replace(**{"privacy.mode": "central", "privacy.noise-multiplier": 1.0, "privacy.clip-norm": 0.5,
                              "privacy.adaptive-clipping": True, "secagg.enabled": True,
                              "federation.strategy": "ffa-lora"})
    with pytest.raises(ConfigError, match="use fixed clipping"):
        check_privacy_config(cfg, strategies.build(cfg))
@pytest.mark.parametrize("args, says", [
    (["--dp", "sample"], "privacy.mode = 'sample' needs a clip norm C (missing): the bound on each per-example "
                         "gradient, e.g. --clip-norm 1.0"),
    (["--dp", "central", "--clip-norm", "1", "--epsilon", "0"], "privacy.target-epsilon = 0.0 is invalid"),
    (["--dp", "central", "--clip-norm", "1", "--strategy", "flexlora"],
     "'flexlora' does not aggregate a plain mean of deltas"),
    (["--dp", "central", "--clip-norm", "1", "--secagg", "--adaptive-clipping"], "use fixed clipping"),
])
def test_simulate_refuses_bad_dp_settings_before_any_round(tmp_path: Path, args: list[str], says: str,
                                                           capsys) -> None:
    code, said = _simulate_here(capsys, tmp_path, *args)
    assert code == 2
    assert says in said
    assert not (tmp_path / "out").exists()  # nothing was partitioned or run


def test_simulate_refuses_a_delta_not_below_one_over_n_before_any_round(tmp_path: Path, capsys) -> None:
    # The smallest of tiny.toml's 4 nodes trains on 2,562 examples, so delta must be below 1/2562.
    code, said = _simulate_here(capsys, tmp_path, "--dp", "sample", "--clip-norm", "1", "--delta", "0.001")
    assert code == 2
    assert "privacy.delta = 0.001 is not below 1/n = 1/2562 for the smallest node" in said
    assert "use --delta below 0.00039" in said
    assert RoundStore(f"sqlite:///{tmp_path / 'store.db'}").runs() == []  # no round ran
