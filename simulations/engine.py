"""Run the ServerApp and ClientApps on Flower's Simulation Engine, in this process.

This calls the same entry point Flower's own ``flwr-simulation`` process calls
(``flwr.simulation.run_simulation._run_simulation``) with the app given by its
component strings (``pollinate.server.app:app``, ``pollinate.client.app:app``), so the simulated
coordinator and nodes load exactly the code a deployment loads. We do not use the
public ``run_simulation``: it is deprecated and carries no run config; nor ``flwr run``,
which starts a detached SuperLink. The run config reaches both sides the way it does
in a deployment: as the ``[tool.flwr.app.config]`` of a Flower App directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from pollinate.proto.run_config import RunConfig
from pollinate.runtime.app_dir import CLIENT_APP, SERVER_APP, write_app_dir



def run(cfg: RunConfig, num_clients: int, app_dir: Path, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
        server_app: str = SERVER_APP, client_app: str = CLIENT_APP) -> None:
    """Simulate ``num_clients`` nodes running ``client_app`` against ``server_app``; blocks until the run ends."""
    from flwr.app import Context, RecordDict  # the Simulation Engine (Ray) only when a simulation runs
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # keep Ray from touching CUDA_VISIBLE_DEVICES
    write_app_dir(cfg, app_dir, server_app, client_app)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flat())
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
        "init_args": {"include_dashboard": False, "logging_level": "error", "log_to_driver": True},
    }
    _run_simulation(num_supernodes=num_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    server_app_attr=server_app, client_app_attr=client_app, app_dir=str(app_dir), is_app=True,
                    server_app_context=context, backend_config=backend_config)  # type: ignore[arg-type]
