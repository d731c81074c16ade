"""The `pollinate` command: bad config fails fast with a message that says what to fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TINY = str(REPO / "tests" / "scenarios" / "tiny.toml")


def pollinate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pollinate.cli", *args], cwd=cwd, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, says", [
    (["--strategy", "fedmagic"], "unknown strategy 'fedmagic'; choose one of"),
    (["--rank", "0"], "adapter.r = 0 is invalid: the LoRA rank must be a positive integer"),
    (["--data", "no/such/file.csv"], "is neither a bundled corpus"),
    (["--db", "postgresql+psycopg://nobody@127.0.0.1:1/none"], "cannot open the round store"),
    (["--set", "train.lr"], "must look like KEY=VALUE"),
    (["--set", "federation.round=3"], "unknown run config key(s) ['federation.round']"),
    (["--clients", "1"], "1 clients cannot satisfy federation.min-nodes = 2"),
    (["--set", "model.name=gpt-17"], "neither a known base model"),
])
def test_bad_config_fails_fast_with_a_fix(args: list[str], says: str, tmp_path: Path) -> None:
    done = pollinate("simulate", TINY, "--db", f"sqlite:///{tmp_path / 's.db'}", "--output", str(tmp_path), *args,
                     cwd=tmp_path)
    assert done.returncode != 0
    assert says in " ".join((done.stdout + done.stderr).split()), done.stdout + done.stderr


def test_a_missing_scenario_file_is_named(tmp_path: Path) -> None:
    done = pollinate("simulate", "nowhere.toml", cwd=tmp_path)
    assert done.returncode == 2 and "scenario file nowhere.toml does not exist" in done.stdout


def test_strategies_lists_properties_as_json(tmp_path: Path) -> None:
    done = pollinate("strategies", "--json", cwd=tmp_path)
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["fedavg"]["linear"] is True and rows["fedavg"]["exact"] is False
