"""Where the repository and the test scenarios are."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
TINY = str(SCENARIOS / "tiny.toml")
