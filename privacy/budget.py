"""A node's own privacy budget, kept in a node-local JSON file across ClientApp processes, rounds and runs.

The file holds the node's accountant history, grouped by the pollinate run key the server sends
(``Instructions.privacy_run_key``; a resumed run keeps it). Epsilon is recomputed from the history:
for one run (``spent(run_key)``, the run's own budget) or for every run this node ever trained in
(``spent(None)``, the node-wide budget of a node policy, ``privacy/node_policy.py``), which no
coordinator can reset by sending another key.

A release is recorded after training and before the reply is sent: an update that never left the
node cost nothing, one that left is always counted. ``record`` holds an exclusive lock (``fcntl.flock``
on ``<file>.lock``) across read, check and write, and writes through a temporary file and
``os.replace``: two ClientApps of one node (two runs at once) cannot both spend the last of a budget,
and a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from pollinate.privacy.accountant import Release, epsilon


@dataclass(frozen=True)
class SpentRound:
    round: int
    mechanism: str  # dp-sgd | local-gaussian
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float

    @property
    def release(self) -> Release:
        return Release(self.noise_multiplier, self.sample_rate, self.steps)


class BudgetExceeded(RuntimeError):
    """Recording this release would take the node over a limit: it must not leave the node."""


@dataclass(frozen=True)
class Limit:
    """Epsilon at ``delta`` over one run's history (``run_key``) or every run's (None) must stay <= ``epsilon``."""

    epsilon: float
    delta: float
    run_key: str | None

    def describe(self) -> str:
        where = "across every run" if self.run_key is None else "in this run"
        return f"epsilon {self.epsilon:g} at delta {self.delta:g} {where}"


class BudgetFile:
    """The node's budget file; ``path`` is node config ``privacy-state`` (default: beside its data)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def history(self, run_key: str | None) -> list[SpentRound]:
        """One run's releases, or (``None``) every release this node recorded, under any run key."""
        runs = self._read()
        rows = runs.get(run_key, []) if run_key is not None else [r for rows in runs.values() for r in rows]
        return [SpentRound(**row) for row in rows]

    def spent(self, run_key: str | None, delta: float) -> float:
        return epsilon([r.release for r in self.history(run_key)], delta)

    def epsilon_after(self, run_key: str | None, delta: float, release: Release) -> float:
        """Epsilon if ``release`` were added to this run's history (``None``: to the node's whole history)."""
        return epsilon([*(r.release for r in self.history(run_key)), release], delta)

    def record(self, run_key: str, spent: SpentRound, limits: tuple[Limit, ...] = ()) -> None:
        """Add ``spent`` to ``run_key``'s history, atomically checked against ``limits`` (``BudgetExceeded``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            runs = self._read()
            for limit in limits:  # checked again under the lock: another run may have spent since the plan
                rows = (runs.get(limit.run_key, []) if limit.run_key is not None
                        else [r for rows in runs.values() for r in rows])
                after = epsilon([*(SpentRound(**r).release for r in rows), spent.release], limit.delta)
                if after > limit.epsilon * (1 + 1e-9):
                    raise BudgetExceeded(f"this release would take the node to epsilon {after:.4g}, over its "
                                         f"{limit.describe()}; it was not sent")
            runs.setdefault(run_key, []).append(asdict(spent))
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(runs, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A separate lock file: the budget file itself is replaced on every write, so a lock on it would
        # protect an inode nobody reads any more.
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, list[dict]]:
        if not self.path.is_file():
            return {}
        try:
            runs = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            # Never guess a budget: refuse until a person looks at the file.
            raise ValueError(f"the privacy budget file {self.path} is corrupt ({e}); restore it from a backup "
                             f"(deleting it forgets every epsilon this node has spent)") from e
        if not isinstance(runs, dict) or not all(isinstance(rows, list) for rows in runs.values()):
            raise ValueError(f"the privacy budget file {self.path} is not a budget file (a JSON object of run "
                             f"key -> list of releases); restore it from a backup or point --privacy-state "
                             f"elsewhere")
        return runs
