"""A scenario of tests/support/scenarios run end to end in this process (``run_in_process``), for tests.

The driver itself (``InProcessGrid``, ``serverapp_identity``) is pollinate's own, in simulations/inprocess.py, which
the robustness bench shares; this module adds the tests' scenarios and store paths. The nodes' data and settings are
written by the same code ``pollinate simulate`` uses.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from flwr.clientapp import ClientApp

from pollinate.server.app import run_federation
from pollinate.simulations.cli import write_node_data
from pollinate.simulations.inprocess import InProcessGrid, NodeConfigOf, serverapp_identity
from pollinate.simulations.scenario import load_scenario
from tests.support.paths import SCENARIOS

__all__ = ["InProcessGrid", "run_in_process", "serverapp_identity"]


def run_in_process(scenario: str, workdir: Path, clients: int | None = None, node_config: NodeConfigOf | None = None,
                   client_app: ClientApp | None = None, lease_ttl_s: float | None = None, node_id_seed: int = 0,
                   **overrides: object) -> int:
    """A scenario of tests/scenarios run end to end in this process, stored in ``workdir/store.db``; the run id.

    ``node_config``: extra node config per partition id (e.g. a node's privacy policy); a new call is a
    restart of every node (fresh contexts). ``client_app``: instead of the scenario's (e.g. one that records).
    ``lease_ttl_s``: the coordinator's run lease (default store.lease-ttl). ``node_id_seed``: draws the nodes' Flower
    ids, as the Simulation Engine draws them afresh per run."""
    cfg, sim = load_scenario(SCENARIOS / scenario, {
        "store.db": f"sqlite:///{workdir / 'store.db'}", "store.output-dir": str(workdir / "out"), **overrides},
        clients)
    cfg, _ = write_node_data(cfg, sim, workdir / "partitions")
    module, _, name = sim.client_app.partition(":")  # e.g. tests.support.apps.faulty_client:app
    app = client_app or getattr(importlib.import_module(module), name)
    grid = InProcessGrid.of_scenario(cfg, sim.clients, app, seed=node_id_seed, node_config=node_config)
    with serverapp_identity():
        return run_federation(grid, cfg, lease_ttl_s=lease_ttl_s)  # type: ignore[arg-type]


def run_in_process_with_events(scenario: str, workdir: Path, **overrides: object) -> tuple[int, list]:
    """``run_in_process`` that also keeps every round event the run emitted, in order: (run id, events)."""
    from pollinate.server.round_events import listen

    events: list = []
    with listen(events.append):
        run_id = run_in_process(scenario, workdir, **overrides)
    return run_id, events
