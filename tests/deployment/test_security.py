"""TLS and SuperNode authentication with real processes on 127.0.0.1: `pollinate certs`, a Flower 1.42
SuperLink with node auth, SuperNodes with the right / a wrong CA and registered / unregistered keys,
and the status service over mutual TLS."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from pollinate.cli import main
from pollinate.proto import pollinate_status_pb2 as pb
from pollinate.proto import pollinate_status_pb2_grpc as pb_grpc
from pollinate.security.certs import create_cert_dir
from pollinate.security.flower_flags import node_flags, register_command, superlink_flags, supernode_flags, write_flwr_connection
from pollinate.server.status_client import connect
from pollinate.server.status_service import serve_status
from pollinate.server.store import RoundStore

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr (the SuperLink spawns flower-superexec)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; each is stopped by its pid (and its children: flower-superexec) afterwards."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        children = _children(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_certs_are_a_ca_a_server_certificate_for_the_hosts_and_flower_node_keys(tmp_path: Path) -> None:
    certs = create_cert_dir(tmp_path / "certs", hosts=["coordinator.example.org", "10.1.2.3"], nodes=2)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    x509.load_pem_x509_certificate(certs.operator_cert.read_bytes()).verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    for node in (1, 2):  # the formats flower-supernode and `flwr supernode register` read
        private = load_ssh_private_key(certs.node_key(node).read_bytes(), None)
        public = load_ssh_public_key(certs.node_public_key(node).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert public.public_numbers() == private.public_key().public_numbers()
    for key in (certs.ca_key, certs.server_key, certs.operator_key, certs.node_key(1), certs.node_key(2)):
        assert key.stat().st_mode & 0o777 == 0o600


def test_certs_refuse_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "certs"
    assert main(["certs", str(out), "--nodes", "1"]) == 0
    ca = (out / "ca.crt").read_bytes()
    assert main(["certs", str(out), "--nodes", "1"]) == 2
    assert "pass --force" in capsys.readouterr().out and (out / "ca.crt").read_bytes() == ca
    assert main(["certs", str(out), "--nodes", "1", "--force"]) == 0
    assert (out / "ca.crt").read_bytes() != ca


def test_the_status_service_over_tls_requires_the_ca_and_an_operator_certificate(tmp_path: Path) -> None:
    certs = create_cert_dir(tmp_path / "certs", nodes=0)
    other = create_cert_dir(tmp_path / "other", nodes=0)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    run_id = RoundStore(url).start_run({"adapter.r": 4}, "fedavg", "tiny-bert")
    server = serve_status(url, "127.0.0.1", 0, tls=certs)
    try:
        address = f"localhost:{server.port}"
        runs = connect(address, certs).ListRuns(pb.ListRunsRequest(), timeout=30).runs
        assert [r.id for r in runs] == [run_id]
        refused = {
            "plaintext": grpc.insecure_channel(address),
            "no client certificate": grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes())),
            "another CA": grpc.secure_channel(address, other.status_client_credentials()),
        }
        for why, channel in refused.items():
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.PollinateStatusStub(channel).ListRuns(pb.ListRunsRequest(), timeout=15)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, why
    finally:
        server.stop()


def _flwr(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on {port} after {timeout_s} s: {log.read_text()}")


def test_a_tls_superlink_with_node_auth_admits_only_registered_nodes_that_trust_its_ca(
        tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    certs = create_cert_dir(tmp_path / "certs", nodes=2)
    other = create_cert_dir(tmp_path / "other", nodes=0)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "flwr"),
           "FLWR_TELEMETRY_ENABLED": "0"}

    def start(name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with log.open("w") as out:
            processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path))
        return processes[-1], log

    port = _free_port()
    link, link_log = start("superlink", [str(BIN / "flower-superlink"), *superlink_flags(certs),
                                         "--host", "127.0.0.1", "--port", str(port)])
    _wait_for_port(port, link, link_log)
    write_flwr_connection(env["FLWR_HOME"], "pollinate-test", certs, f"127.0.0.1:{port}")
    node_id = str(_flwr(register_command(certs, 1, "pollinate-test")[1:], env)["node-id"])

    def node(name: str, flags: list[str]) -> tuple[subprocess.Popen, Path]:
        return start(name, [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", *flags,
                            "--port", str(_free_port()), "--max-retries", "2", "--max-wait-time", "30"])

    registered, registered_log = node("registered", node_flags(certs, 1))
    unregistered, unregistered_log = node("unregistered", node_flags(certs, 2))
    wrong_ca, wrong_ca_log = node("wrong-ca", supernode_flags(other.ca_cert, certs.node_key(1)))

    deadline, status = time.monotonic() + 180, None
    while time.monotonic() < deadline and status != "online":
        assert registered.poll() is None, registered_log.read_text()
        nodes = {n["node-id"]: n["status"] for n in _flwr(["supernode", "list", "pollinate-test"], env)["nodes"]}
        status = nodes.get(node_id)
        time.sleep(1)
    assert status == "online", registered_log.read_text()

    assert unregistered.wait(timeout=180) != 0 and wrong_ca.wait(timeout=180) != 0
    assert "Failed to activate SuperNode" in unregistered_log.read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca_log.read_text()
    nodes = _flwr(["supernode", "list", "pollinate-test"], env)["nodes"]
    assert [(n["node-id"], n["status"]) for n in nodes] == [(node_id, "online")]  # no one else got in
