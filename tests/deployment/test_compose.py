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
    assert (db.username, db.path.lstrip("/")) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    assert f"127.0.0.1:{args.port}:{args.port}" in coordinator["ports"]


def test_the_store_password_is_a_secret_file_on_no_command_line(services: dict) -> None:
    from pollinate.server.store import PASSWORD_FILE_ENV

    compose = yaml.safe_load(COMPOSE.read_text())
    coordinator, postgres = services["coordinator"], services["postgres"]
    assert "file" in compose["secrets"]["db_password"]
    secret = "/run/secrets/db_password"
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == secret and "db_password" in postgres["secrets"]
    assert coordinator["environment"][PASSWORD_FILE_ENV] == secret and "db_password" in coordinator["secrets"]
    assert urlsplit(_args(coordinator).db).password == "***"  # withheld: the store reads the secret file
    for name, service in services.items():
        assert "POSTGRES_PASSWORD" not in service.get("environment", {}), name
        assert "POLLINATE_STORE_PASSWORD" not in service.get("environment", {}), name
    nodes = [name for name in services if name.startswith("node-")]
    assert not any("db_password" in services[n].get("secrets", []) for n in nodes), "no node gets the password"


def test_ports_are_published_on_loopback_and_every_connection_is_tls(services: dict) -> None:
    from pollinate.security.exposure import check_exposure

    for name, service in services.items():
        for published in service.get("ports", []):
            assert str(published).startswith("127.0.0.1:"), f"{name} publishes {published} on every interface"
        if "command" in service and _args(service).command in ("server", "client"):
            assert _args(service).certs is not None, f"{name} runs without TLS"
    coordinator = _args(services["coordinator"])
    assert not coordinator.insecure
    assert check_exposure(coordinator.host, coordinator.certs is not None, coordinator.insecure, "it") is None


def test_each_service_mounts_only_its_own_certificate_files_and_none_the_ca_key(services: dict) -> None:
    mounted = {name: {m.rsplit(":", 2)[1]: m.rsplit(":", 2)[0] for m in s.get("volumes", [])
                      if ":" in m and m.rsplit(":", 2)[1].startswith("/certs")} for name, s in services.items()}
    assert set(mounted["coordinator"]) == {"/certs/ca.crt", "/certs/server.crt", "/certs/server.key"}
    for name in (n for n in services if n.startswith("node-")):
        args = _args(services[name])
        assert set(mounted[name]) == {f"{args.certs}/ca.crt"} | ({str(args.node_key)} if args.node_key else set())
    sources = [source for files in mounted.values() for source in files.values()]
    assert all(Path(source).name != "ca.key" for source in sources), "the CA key is in no container"
    assert all(Path(source).suffix in (".crt", ".key", ".pub") or "nodes/" in source for source in sources), \
        "files are mounted one by one, never a whole certificate directory"


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
        # Under DP the node records its spend before a reply leaves: the budget file needs a writable volume.
        state_dir = str(Path(args.privacy_state).parent)
        [(state_source, *state_mode)] = [(m[0], *m[2:]) for m in mounts if m[1] == state_dir]
        assert state_mode != ["ro"] and state_source in yaml.safe_load(COMPOSE.read_text())["volumes"], f"{name}: its privacy budget is writable"
        assert "coordinator" in node["depends_on"]
    assert len(set(sources)) == len(sources), "every node has its own data volume"
    assert not any(m.startswith(tuple(sources)) for s in ("coordinator", "postgres")
                   for m in services[s].get("volumes", [])), "no other service sees a node's data"
