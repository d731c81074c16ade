"""A scenario of tests/support/scenarios run end to end in this process (``run_in_process``), for tests.

The driver itself (``InProcessGrid``, ``serverapp_identity``) is pollinate's own, in simulations/inprocess.py, which
the robustness bench shares; this module adds the tests' scenarios and store paths. The nodes' data and settings are
written by the same code ``pollinate simulate`` uses.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pollinate.server.app import run_federation
from pollinate.simulations.cli import write_node_data
from pollinate.simulations.inprocess import InProcessGrid, serverapp_identity
from pollinate.simulations.scenario import load_scenario
from tests.support.paths import SCENARIOS

__all__ = ["InProcessGrid", "run_in_process", "serverapp_identity"]


def run_in_process(scenario: str, workdir: Path, clients: int | None = None, **overrides: object) -> int:
    """A scenario of tests/scenarios run end to end in this process, stored in ``workdir/store.db``; the run id."""
    cfg, sim = load_scenario(SCENARIOS / scenario, {
        "store.db": f"sqlite:///{workdir / 'store.db'}", "store.output-dir": str(workdir / "out"), **overrides},
        clients)
    cfg, _ = write_node_data(cfg, sim, workdir / "partitions")
    module, _, name = sim.client_app.partition(":")  # e.g. tests.support.apps.faulty_client:app
    grid = InProcessGrid.of_scenario(cfg, sim.clients, getattr(importlib.import_module(module), name))
    with serverapp_identity():
        return run_federation(grid, cfg)  # type: ignore[arg-type]
