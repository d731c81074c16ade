"""Real processes on 127.0.0.1 for the deployment tests: `pollinate server` / `pollinate client`, node data,
bounded polling of the round store, and teardown of every process tree started (by PID)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar


from pollinate.runtime.processes import end_tree
from pollinate.simulations.datasets import load_corpus
from tests.support.paths import REPO

T = TypeVar("T")


def write_node_data(directory: Path, nodes: int, per_node: int = 40) -> list[Path]:
    """One JSONL file per node (``text`` + ``label``, as client/data.py reads), disjoint slices of the corpus."""
    rows = load_corpus("rotten-tomatoes")
    paths = []
    for i in range(nodes):
        path = directory / f"node-{i}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in rows[i * per_node:(i + 1) * per_node]:
                f.write(json.dumps({"text": row["text"], "label": row["label"]}) + "\n")
        paths.append(path)
    return paths


class Processes:
    """Starts `pollinate ...` commands in their own sessions and kills each one's whole tree at teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.started = logs, []  # type: list[subprocess.Popen[bytes]]
        logs.mkdir(parents=True, exist_ok=True)

    def pollinate(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "pollinate.cli", *args], cwd=REPO, env=os.environ.copy(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    @staticmethod
    def kill_tree(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a process and every descendant at once: a crash (Flower's SuperExec and apps have sessions
        of their own)."""
        end_tree(proc.pid, grace_s=0)
        proc.poll()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.kill_tree(proc)


def poll(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 0.5) -> T:
    """``probe()`` once it returns something, polled every ``every_s``; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
