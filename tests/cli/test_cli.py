"""The `pollinate` command: bad config fails fast with a message that says what to fix.

In this process (`pollinate.cli.main`): nothing here gets as far as starting a simulation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate.cli import main
from tests.support.commands import pollinate
from tests.support.paths import TINY


@pytest.mark.parametrize("args, says", [
    (["--strategy", "fedmagic"], "unknown strategy 'fedmagic'; choose one of"),
    (["--rank", "0"], "adapter.r = 0 is invalid: the LoRA rank must be a positive integer"),
    (["--corpus", "no/such/file.csv"], "is neither a bundled corpus"),
    (["--db", "postgresql+psycopg://nobody@127.0.0.1:1/none"], "cannot open the round store"),
    (["--set", "train.lr"], "must look like KEY=VALUE"),
    (["--set", "federation.round=3"], "unknown run config key(s) ['federation.round']"),
    (["--clients", "1"], "1 clients cannot satisfy federation.min-nodes = 2"),
    (["--set", "model.name=gpt-17"], "neither a known base model"),
])
def test_bad_config_fails_fast_with_a_fix(args: list[str], says: str, tmp_path: Path, capsys) -> None:
    code, said = pollinate(capsys, "simulate", TINY, "--db", f"sqlite:///{tmp_path / 's.db'}", "--output",
                           str(tmp_path), *args)
    assert code == 2
    assert says in said, said
    assert not any(tmp_path.glob("simulation-*"))  # refused before any node data was written


def test_a_missing_scenario_file_is_named(tmp_path: Path, capsys) -> None:
    code, said = pollinate(capsys, "simulate", str(tmp_path / "nowhere.toml"))
    assert code == 2 and f"scenario file {tmp_path / 'nowhere.toml'} does not exist" in said


def test_strategies_lists_properties_as_json(capsys) -> None:
    assert main(["strategies", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fedavg"]["linear"] is True and rows["fedavg"]["exact"] is False
    assert rows["fedavg"]["options"] == {}  # each strategy lists its own options, with default and help
    assert rows["fedprox"]["options"]["strategy.fedprox.proximal-mu"]["default"] == 0.01
    assert set(rows["fedavgm"]["options"]) == {"strategy.fedavgm.momentum", "strategy.fedavgm.server-lr"}


def test_help_answers_without_loading_torch(tmp_path: Path) -> None:
    """`pollinate --help` imports the command table, not the models: torch and Ray load when a command runs."""
    probe = ("import sys; from pollinate.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'ray', 'peft', 'transformers', 'dp_accounting') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=os.environ.copy(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
