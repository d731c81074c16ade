"""Every registered strategy runs by name end to end, with its defining property checked.

Each runs the real coordinator loop against the real ClientApp over Flower messages in this process
(tests/support/inprocess.py): a few seconds a strategy instead of half a minute on the Simulation Engine. One
strategy, hetlora with self-pruning, runs on the Simulation Engine too, through `pollinate simulate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from safetensors.numpy import load_file as safetensors_load

from pollinate import strategies
from pollinate.server.store import RoundStore
from pollinate.strategies.base import lora_pairs
from tests.support.inprocess import run_in_process
from tests.support.commands import simulate


def _run(tmp_path: Path, name: str, rounds: int = 2, scenario: str = "tiny.toml",
         **overrides: object) -> tuple[RoundStore, int]:
    run_in_process(scenario, tmp_path, 3, **{"federation.strategy": name, "federation.rounds": rounds,
                                             **overrides})
    return _completed(tmp_path, name, rounds)


def _completed(tmp_path: Path, name: str, rounds: int) -> tuple[RoundStore, int]:
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    [run] = store.runs()
    assert run.status == "completed" and run.strategy == name, run.error
    assert [(r.number, r.accepted) for r in store.rounds(run.id)] == [(n, 3) for n in range(1, rounds + 1)]
    return store, run.id


def _factor(store: RoundStore, run_id: int, number: int, which: int) -> dict[str, np.ndarray]:
    adapter = store.adapter(run_id, number).tensors()
    return {pair[which]: adapter[pair[which]] for pair in lora_pairs(adapter).values()}


# Every strategy on whole adapter tensors at one rank (fedavg, fedprox, fedadam, fedyogi, fedavgm, ...).
HOMOGENEOUS = sorted(n for n, c in strategies.registry().items() if not c.heterogeneous_ranks and not c.lora_factors)


@pytest.mark.parametrize("name", HOMOGENEOUS)
def test_homogeneous_strategy_runs_and_moves_both_factors(name: str, tmp_path: Path) -> None:
    store, run_id = _run(tmp_path, name)
    for which in (0, 1):
        one, two = _factor(store, run_id, 1, which), _factor(store, run_id, 2, which)
        assert any(not np.array_equal(one[k], two[k]) for k in one)


def test_ffa_lora_never_changes_a(tmp_path: Path) -> None:
    store, run_id = _run(tmp_path, "ffa-lora")
    a1, a2 = _factor(store, run_id, 1, 0), _factor(store, run_id, 2, 0)
    b1, b2 = _factor(store, run_id, 1, 1), _factor(store, run_id, 2, 1)
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)
    assert all(not np.array_equal(b1[k], b2[k]) for k in b1)


def test_rolora_alternates_the_trained_factor(tmp_path: Path) -> None:
    store, run_id = _run(tmp_path, "rolora", rounds=3)
    a = [_factor(store, run_id, n, 0) for n in (1, 2, 3)]
    b = [_factor(store, run_id, n, 1) for n in (1, 2, 3)]
    # Round 2 trains A (B frozen), round 3 trains B (A frozen).
    assert all(np.array_equal(b[0][k], b[1][k]) for k in b[0]) and any(not np.array_equal(a[0][k], a[1][k]) for k in a[0])
    assert all(np.array_equal(a[1][k], a[2][k]) for k in a[1]) and any(not np.array_equal(b[1][k], b[2][k]) for k in b[1])


def test_fedex_lora_exports_the_exact_mean_model_as_a_larger_lora(tmp_path: Path) -> None:
    store, run_id = _run(tmp_path, "fedex-lora")
    run = store.run(run_id)
    exported = safetensors_load(Path(run.adapter_dir) / "adapter_model.safetensors")
    # the residual folded into the base travels in the exported LoRA: its rank grows past adapter.r = 4
    assert {v.shape[0] for k, v in exported.items() if ".lora_A." in k} != {4}
    assert json.loads((Path(run.adapter_dir) / "adapter_config.json").read_text())["r"] > 4


def test_sketch_merges_what_the_global_rank_cannot_hold_and_exports_the_whole_mean(tmp_path: Path) -> None:
    # Nodes of ranks 2, 4 and 8 sum past the global rank 8: the rest of their mean goes into the base deltas,
    # which travel to the nodes and are folded into the exported LoRA (rank > 8), so nothing is truncated.
    store, run_id = _run(tmp_path, "sketch", scenario="tiny-hetero.toml")
    stored = store.adapter(run_id, 1).tensors()  # the round's global model, exported: base deltas folded in
    assert {v.shape[0] for k, v in stored.items() if ".lora_A." in k} != {8}
    run = store.run(run_id)
    assert json.loads((Path(run.adapter_dir) / "adapter_config.json").read_text())["r"] > 8


HETEROGENEOUS = ["hetlora", "flexlora", "flora", "sketch", "robust-clip", "trimmed-mean", "median", "multi-krum"]


def test_fedsa_lora_never_uploads_b_and_nodes_keep_their_own(tmp_path: Path) -> None:
    store, run_id = _run(tmp_path, "fedsa-lora")
    b1, b2 = _factor(store, run_id, 1, 1), _factor(store, run_id, 2, 1)
    assert all(not v.any() for v in b2.values()) and all(not v.any() for v in b1.values())  # the server never had B
    a1, a2 = _factor(store, run_id, 1, 0), _factor(store, run_id, 2, 0)
    assert any(not np.array_equal(a1[k], a2[k]) for k in a1)
    train = [u for u in store.client_updates(run_id) if u.phase == "train"]
    full = sum(v.size for v in store.adapter(run_id, 1).tensors().values()) * 4
    b_bytes = sum(v.size for v in b1.values()) * 4
    assert all(u.bytes_up < full - b_bytes + 2000 for u in train)  # uploads carry no B
    # personalised evaluation: nodes evaluate with their own B, which moves the loss off the B = 0 model
    assert store.rounds(run_id)[-1].eval_loss != store.run(run_id).initial_metrics["eval-loss"]


def test_hetlora_nodes_prune_their_rank_and_train_the_smaller_rank_next_round(tmp_path: Path) -> None:
    # On the Simulation Engine: `pollinate simulate`, Ray actors, each node's max-rank from its settings file.
    done = simulate("tiny-hetero.toml", tmp_path, "--strategy", "hetlora", "--rounds", "2", "--clients", "3",
                    "--set", "strategy.hetlora.prune=0.5")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store, run_id = _completed(tmp_path, "hetlora", 2)
    ranks = {n: {u.node_id: u.rank for u in store.client_updates(run_id, n) if u.phase == "train"} for n in (1, 2)}
    assert all(ranks[2][node] <= ranks[1][node] for node in ranks[1])
    assert any(ranks[2][node] < ranks[1][node] for node in ranks[1])


@pytest.mark.parametrize("name", HETEROGENEOUS)
def test_heterogeneous_strategy_trains_each_node_at_its_own_rank(name: str, tmp_path: Path) -> None:
    store, run_id = _run(tmp_path, name, scenario="tiny-hetero.toml")
    train = [u for u in store.client_updates(run_id, 1) if u.phase == "train" and u.status == "accepted"]
    assert sorted({u.rank for u in train}) == [2, 4, 8]
    run = store.run(run_id)
    assert Path(run.adapter_dir, "adapter_model.safetensors").is_file()
    rounds = store.rounds(run_id)
    assert rounds[-1].eval_loss is not None and np.isfinite(rounds[-1].eval_loss)
    assert all(r.train_loss is not None and np.isfinite(r.train_loss) for r in rounds), "every round has a train loss"


def test_every_registered_strategy_is_covered_here() -> None:
    covered = set(HOMOGENEOUS) | set(HETEROGENEOUS) | {"ffa-lora", "rolora", "fedex-lora", "fedsa-lora"}
    assert set(strategies.names()) <= covered, f"add a simulation test for {set(strategies.names()) - covered}"
