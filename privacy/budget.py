"""A node's own privacy budget, kept in a node-local JSON file across ClientApp processes and rounds.

Keyed by the pollinate run key the server sends (``Instructions.privacy_run_key``), not by
Flower's run id: a resumed run gets a new Flower run id but spends the same budget. The
file holds the node's accountant history for each run; epsilon is recomputed from it.
A release is recorded after training and before the reply is sent: an update that never
left the node cost nothing, one that left is always counted.
"""

from __future__ import annotations

import json
import os
import tempfile
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


class BudgetFile:
    """The node's budget file; ``path`` is node config ``privacy-state`` (default: beside its data)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def history(self, run_key: str) -> list[SpentRound]:
        return [SpentRound(**row) for row in self._read().get(run_key, [])]

    def spent(self, run_key: str, delta: float) -> float:
        return epsilon([r.release for r in self.history(run_key)], delta)

    def epsilon_after(self, run_key: str, delta: float, release: Release) -> float:
        """Epsilon if ``release`` were added to this run's history."""
        return epsilon([*(r.release for r in self.history(run_key)), release], delta)

    def record(self, run_key: str, spent: SpentRound) -> None:
        runs = self._read()
        runs.setdefault(run_key, []).append(asdict(spent))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a crash leaves the old file or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(runs, f, indent=1)
        os.replace(tmp, self.path)

    def _read(self) -> dict[str, list[dict]]:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            # Never guess a budget: refuse until a person looks at the file.
            raise ValueError(f"the privacy budget file {self.path} is corrupt ({e}); restore it from a backup "
                             f"(deleting it forgets every epsilon this node has spent)") from e
