"""The global test set (issue #17 part 7): a held-out slice no node trains on, measured every round and stored.

Macro-F1 is checked against scikit-learn's on random predictions (hypothesis); the rest runs the real ServerApp
against the real ClientApp in this process (tests/support/inprocess.py) on the tiny model, then measures the stored
rounds as ``pollinate simulate`` does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hypothesis import given, settings, strategies as st
from sklearn.metrics import f1_score

from pollinate.proto.node_config import global_test_file, partition_file
from pollinate.proto.run_config import RunConfig
from pollinate.server.report import rounds_table, runs_json
from pollinate.server.store import RoundStore
from pollinate.simulations.global_test import hold_out, macro_f1, measure_rounds
from tests.support.inprocess import run_in_process

labels = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(labels)
def test_macro_f1_is_scikit_learns(pairs: list[tuple[int, int]]) -> None:
    predicted, actual = [p for p, _ in pairs], [a for _, a in pairs]
    assert math.isclose(macro_f1(predicted, actual), f1_score(actual, predicted, average="macro", zero_division=0),
                        abs_tol=1e-12)


def test_the_held_out_slice_is_seeded_disjoint_and_never_empty() -> None:
    rows = [{"text": str(i), "label": i % 2} for i in range(50)]
    train, test = hold_out(rows, 0.1, seed=3)
    assert len(test) == 5 and len(train) == 45 and hold_out(rows, 0.1, seed=3) == (train, test)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert len(hold_out(rows, 0.001, seed=3)[1]) == 1 and hold_out(rows, 0.0, seed=3) == (rows, [])


def test_every_round_is_measured_on_examples_no_node_holds(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.jsonl"  # small: the test is about where examples go, not about learning
    corpus.write_text("".join(json.dumps({"text": f"review {i} {'good' if i % 2 else 'bad'}", "label": i % 2}) + "\n"
                              for i in range(120)))
    run_id = run_in_process("tiny.toml", tmp_path, clients=2, **{"federation.rounds": 2, "data.dataset": str(corpus),
                                                                 "data.test-fraction": 0.1})
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    cfg = RunConfig.from_flat(store.run(run_id).config)
    held = [json.loads(line)["text"] for line in global_test_file(cfg.data.partition_dir).read_text().splitlines()]
    assert len(held) == 12
    nodes = {json.loads(line)["text"] for i in range(2)
             for line in partition_file(cfg.data.partition_dir, i).read_text().splitlines()}
    assert len(nodes) + len(set(held)) == len(nodes | set(held))  # no node holds a test example
    final = measure_rounds(store, run_id, cfg)
    tests = [r.test for r in store.rounds(run_id)]
    assert len(tests) == 2 and all(t is not None for t in tests) and tests[-1] == final
    assert 0.0 <= final.accuracy <= 1.0 and 0.0 <= final.macro_f1 <= 1.0 and final.loss > 0
    assert runs_json(store, run_id)[0]["rounds"][-1]["test"] == {"loss": final.loss, "accuracy": final.accuracy,
                                                                  "macro_f1": final.macro_f1}
    capsys.readouterr()
    from rich.console import Console

    Console(width=200).print(rounds_table(store, run_id))
    shown = capsys.readouterr().out
    assert "test accuracy" in shown and "test macro-F1" in shown and f"{final.macro_f1:.4f}" in shown
