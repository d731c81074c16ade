"""The coordinator's open surfaces: what listens where, who may reach it, and who holds the store's password
(issue #15, part 6; docs/deployment-security.md, "Open surfaces")."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pollinate.proto.run_config import ConfigError
from pollinate.security.exposure import check_exposure, is_loopback


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LocalHost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("192.168.1.2", False),
    ("coordinator.example.org", False), ("", False),
])
def test_loopback_is_127_8_and_ipv6_1_and_localhost(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plaintext_on_an_open_host_needs_insecure_and_then_warns() -> None:
    with pytest.raises(ConfigError, match="--host 0.0.0.0 without --certs .* or --insecure on a network you trust"):
        check_exposure("0.0.0.0", tls=False, insecure=False, serves="the SuperLink")
    assert check_exposure("0.0.0.0", tls=True, insecure=False, serves="the SuperLink") is None
    assert check_exposure("127.0.0.1", tls=False, insecure=False, serves="the SuperLink") is None
    warning = check_exposure("0.0.0.0", tls=False, insecure=True, serves="the SuperLink")
    assert warning == ("warning: --insecure: 0.0.0.0 serves the SuperLink without TLS or authentication; whoever "
                       "reaches this host can use them")


def test_the_status_service_refuses_an_open_host_without_tls(tmp_path: Path) -> None:
    from pollinate.server.status_service import serve_status

    store = f"sqlite:///{tmp_path / 'store.db'}"
    with pytest.raises(ConfigError, match="without --certs would serve the status service"):
        serve_status(store, "0.0.0.0", 0)
    opened = serve_status(store, "0.0.0.0", 0, insecure=True)  # the operator said so
    try:
        assert opened.port > 0
    finally:
        opened.stop()


def test_flower_serves_the_control_api_on_the_fleet_port_so_it_cannot_be_bound_apart() -> None:
    """Pins Flower 1.42's behaviour the doc relies on. When this fails, Flower can serve the Control API on an
    address of its own: bind it to 127.0.0.1 in server/launch.py and update docs/deployment-security.md."""
    from flwr.superlink.main import create_app

    from pollinate.runtime.processes import executable

    paths = set(create_app().openapi()["paths"])  # the one HTTP app flower-superlink serves on --host:--port
    assert {"/v1/control/start-run", "/v1/control/register-node", "/v1/fleet/pull-messages"} <= paths
    said = " ".join(subprocess.run([executable("flower-superlink"), "--help"], capture_output=True, text=True,
                                   timeout=120).stdout.split())
    assert "--control-api-address CONTROL_API_ADDRESS Deprecated. The Control API now operates over HTTP. Use " \
           "`--host` and `--port` instead." in said


def test_the_superlink_gets_this_runs_store_password_and_no_other_store_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pollinate.runtime.processes import flower_env
    from pollinate.server.launch import STORE_CREDENTIALS, superlink_env, without_store_credentials
    from pollinate.server.store import PASSWORD_ENV, PASSWORD_FILE_ENV, keep_password, withhold_password

    monkeypatch.setenv("POLLINATE_DB", "postgresql+psycopg://admin:admin-pw@elsewhere/db")
    monkeypatch.setenv(PASSWORD_ENV, "a-password-of-the-shell")
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "another-secret"))
    monkeypatch.setenv("UNRELATED_SETTING", "kept")
    url, password = withhold_password("postgresql+psycopg://pollinate:run-pw@db:5432/pollinate")
    keep_password(url, password)

    env = superlink_env(flower_env(tmp_path / "flwr-home"), url)
    assert env[PASSWORD_ENV] == "run-pw"
    assert "POLLINATE_DB" not in env and PASSWORD_FILE_ENV not in env
    assert "admin-pw" not in " ".join(env.values()) and env["UNRELATED_SETTING"] == "kept"
    cli_env = without_store_credentials(flower_env(tmp_path / "flwr-home"))  # what `flwr run/log/...` get
    assert not set(STORE_CREDENTIALS) & set(cli_env)
    assert "run-pw" not in " ".join(cli_env.values())


def test_the_store_password_can_come_from_a_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pollinate.server.store import PASSWORD_ENV, PASSWORD_FILE_ENV, StoreError, password_env

    url = "postgresql+psycopg://pollinate:***@db:5432/file-secret"  # withheld on the command line (compose)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    secret = tmp_path / "db_password"
    secret.write_text("from-the-file\n")
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(secret))
    assert password_env(url) == {PASSWORD_ENV: "from-the-file"}  # what the SuperLink is then given
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(StoreError, match=f"{PASSWORD_FILE_ENV} = .*missing: cannot read the store password"):
        password_env(url)
    monkeypatch.delenv(PASSWORD_FILE_ENV)
    with pytest.raises(StoreError, match=f"{PASSWORD_ENV} is not set; set {PASSWORD_ENV} \\(or {PASSWORD_FILE_ENV}"):
        password_env(url)


def test_server_insecure_is_an_explicit_flag() -> None:
    from pollinate.cli import build_parser

    assert build_parser().parse_args(["server"]).insecure is False
    assert build_parser().parse_args(["server", "--insecure"]).insecure is True
