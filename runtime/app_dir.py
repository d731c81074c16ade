"""A Flower App directory whose ``[tool.flwr.app.config]`` is a typed run config: what both launchers hand Flower.

``pollinate simulate`` gives it to the Simulation Engine and ``pollinate server`` submits it with ``flwr run``, so
the run config reaches the ServerApp and every ClientApp the same way in both (as Flower's run config).
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from pollinate.proto.run_config import RunConfig

SERVER_APP = "pollinate.server.app:app"
CLIENT_APP = "pollinate.client.app:app"


def write_app_dir(cfg: RunConfig, directory: Path, server_app: str = SERVER_APP, client_app: str = CLIENT_APP) -> Path:
    """A Flower App directory whose run config is ``cfg`` (what ``flwr run`` would ship as a FAB)."""
    directory.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": "pollinate-run", "version": "0.1.0", "description": "pollinate simulation",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {"publisher": "pollinate",
                                  "components": {"serverapp": server_app, "clientapp": client_app},
                                  "config": cfg.to_flat()}}},
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(project))
    return directory
