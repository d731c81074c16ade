"""docker-compose.yml: `docker compose config` when Docker is here; our own invariants always."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from pollinate.cli import build_parser
from tests.support.paths import REPO

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _args(service: dict):
    command = service["command"]
    assert command[0] == "pollinate"
    return build_parser().parse_args(command[1:])  # the real parser: exits (fails the test) on a bad flag


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose here; the invariants below still check the file")
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_coordinator_runs_pollinate_server_on_postgres_once_it_is_healthy(services: dict) -> None:
    coordinator, postgres = services["coordinator"], services["postgres"]
    args = _args(coordinator)
    assert args.command == "server" and args.host == "0.0.0.0"
    assert coordinator["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    db = urlsplit(args.db)
    env = postgres["environment"]
    assert db.scheme.startswith("postgresql") and db.hostname == "postgres"
    assert (db.username, db.password, db.path.lstrip("/")) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"],
                                                               env["POSTGRES_DB"])
    assert f"{args.port}:{args.port}" in coordinator["ports"]


def test_each_node_runs_pollinate_client_on_its_own_data_volume(services: dict) -> None:
    coordinator = _args(services["coordinator"])
    nodes = {name: s for name, s in services.items() if name.startswith("node-")}
    assert len(nodes) == 2
    sources = []
    for name, node in nodes.items():
        args = _args(node)
        assert args.command == "client" and args.superlink == f"coordinator:{coordinator.port}", name
        mounts = [v.rsplit(":", 2) for v in node["volumes"]]
        data_dir = str(Path(args.data).parent)
        [(source, *mode)] = [(m[0], *m[2:]) for m in mounts if m[1] == data_dir]
        assert mode == ["ro"], f"{name}: its data is mounted read-only"
        sources.append(source)
        assert "coordinator" in node["depends_on"]
    assert len(set(sources)) == len(sources), "every node has its own data volume"
    assert not any(m.startswith(tuple(sources)) for s in ("coordinator", "postgres")
                   for m in services[s].get("volumes", [])), "no other service sees a node's data"
