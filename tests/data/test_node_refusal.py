"""A node whose own data does not fit the run refuses in one line, and that line is what the run stores.

The real ServerApp loop against the real ClientApp in this process (tests/support/inprocess.py): the class names
come from the run config, so a node whose file holds a class the run does not know refuses with the row; it
answers an error reply rather than raising, so no traceback is printed and none is stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pollinate.proto.node_config import partition_file
from pollinate.server.app import run_federation
from pollinate.server.rounds import RoundFailed, error_line
from pollinate.server.store import RoundStore
from pollinate.simulations.cli import write_node_data
from pollinate.simulations.scenario import load_scenario
from tests.support.inprocess import InProcessGrid, serverapp_identity
from tests.support.paths import SCENARIOS


def test_an_unknown_class_on_a_node_is_refused_with_its_row_in_one_line(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "speeches.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"speech {i}", "label": ("democrat", "republican")[i % 2]}) + "\n"
                              for i in range(24)))
    cfg, sim = load_scenario(SCENARIOS / "tiny.toml", {
        "store.db": f"sqlite:///{tmp_path / 'store.db'}", "store.output-dir": str(tmp_path / "out"),
        "data.dataset": str(corpus), "federation.rounds": 1}, clients=2)
    cfg, _ = write_node_data(cfg, sim, tmp_path / "partitions")
    assert cfg.data.labels == ("democrat", "republican")  # the run's mapping, from the corpus
    part = partition_file(cfg.data.partition_dir, 0)
    rows = len(part.read_text().splitlines())
    with part.open("a") as f:  # this node's own file gains a class the run does not know
        f.write(json.dumps({"text": "a speech", "label": "green"}) + "\n")
    with serverapp_identity(), pytest.raises(RoundFailed):
        run_federation(InProcessGrid.of_scenario(cfg, sim.clients), cfg)
    line = (f"{part} row {rows + 1}: label 'green' is not one of the run's classes ['democrat', 'republican'] "
            f"(data.labels); fix the row, or add the class to data.labels on the coordinator")
    store = RoundStore(cfg.store.db)
    [run] = store.runs()
    assert run.status == "failed" and line in run.error and "Traceback" not in run.error
    refusals = [c for c in store.client_updates(run.id) if c.status == "failed"]  # round 0's evaluation, round 1's
    assert refusals and all(c.reason == f"client error: {line}" for c in refusals)
    printed = capsys.readouterr().out
    assert line in " ".join(printed.split()) and "Traceback" not in printed


@pytest.mark.parametrize("reason, line", [
    ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. Message: "
     "label 'x' is not an integer in [0, 2)\nTraceback (most recent call last):\n  File \"a.py\", line 1\n'>",
     "label 'x' is not an integer in [0, 2)"),
    ("Traceback (most recent call last):\n  File \"a.py\", line 3, in f\n    g()\nValueError: no rows", "ValueError: no rows"),
    ("data.csv row 2: label 'green' is not one of the run's classes", "data.csv row 2: label 'green' is not one of "
     "the run's classes"),
])
def test_a_node_error_reason_is_reduced_to_one_line(reason: str, line: str) -> None:
    assert error_line(reason) == line
