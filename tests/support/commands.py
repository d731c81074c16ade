"""The `pollinate` command as a user runs it: in this process (refusals) or as a real process (simulations)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import SCENARIOS


def pollinate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``pollinate ARGS`` in this process: its exit code and its output with white space folded."""
    from pollinate.cli import main

    code = main(list(args))
    return code, " ".join(capsys.readouterr().out.split())


def simulate(scenario: str, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``pollinate simulate`` on a test scenario, as a real process storing into ``workdir``."""
    cmd = [sys.executable, "-m", "pollinate.cli", "simulate", str(SCENARIOS / scenario),
           "--db", f"sqlite:///{workdir / 'store.db'}", "--output", str(workdir / "out"), *extra]
    return subprocess.run(cmd, cwd=workdir, env=os.environ.copy(), capture_output=True, text=True, timeout=600)


def simulated_run(scenario: str, workdir: Path, *extra: str):  # -> (CompletedProcess, RoundStore, RunSummary)
    """``simulate`` that must succeed, with the store it wrote and the one run in it."""
    from pollinate.server.store import RoundStore

    done = simulate(scenario, workdir, *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = RoundStore(f"sqlite:///{workdir / 'store.db'}")
    [run] = store.runs()
    return done, store, run
