"""``pollinate certs``: a self-signed CA, the coordinator's TLS certificate, an operator client
certificate and per-node authentication keys, in the formats Flower 1.42 reads.

Layout of the directory (``CertDir``)::

    ca.crt  ca.key                 the CA (keep ca.key off the coordinator once certificates are issued)
    server.crt  server.key         SuperLink + status service TLS, SANs = the --host names/IPs
    operator.crt  operator.key     client certificate for the status service (mutual TLS)
    nodes/node-<i>  nodes/node-<i>.pub   SuperNode auth keys: EC P-384 in OpenSSH format
                                   (what `flower-supernode --auth-supernode-private-key` and
                                   `flwr supernode register` read)

Private keys are written 0600. Nothing is overwritten without ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_DAYS, LEAF_DAYS = 3650, 397  # leaves are rotated yearly (docs/deployment-security.md)


class CertError(ValueError):
    """A certificate directory is missing files, or would be overwritten; the message says what to do."""


def mutual_tls_server_credentials(cert: Path, key: Path, ca_cert: Path):  # -> grpc.ServerCredentials
    """gRPC server credentials presenting ``cert``, requiring a client certificate signed by ``ca_cert``."""
    import grpc

    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())], root_certificates=ca_cert.read_bytes(),
                                       require_client_auth=True)


@dataclass(frozen=True)
class CertDir:
    """The files ``pollinate certs`` writes, by role."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    ca_cert = property(lambda self: self.root / "ca.crt")
    ca_key = property(lambda self: self.root / "ca.key")
    server_cert = property(lambda self: self.root / "server.crt")
    server_key = property(lambda self: self.root / "server.key")
    operator_cert = property(lambda self: self.root / "operator.crt")
    operator_key = property(lambda self: self.root / "operator.key")

    def node_key(self, node: int) -> Path:
        return self.root / "nodes" / f"node-{node}"

    def node_public_key(self, node: int) -> Path:
        return self.root / "nodes" / f"node-{node}.pub"

    def require(self, *paths: Path) -> None:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise CertError(f"{', '.join(missing)} missing; create the directory with `pollinate certs {self.root}` "
                            f"or copy the files there")

    def status_server_credentials(self):
        """gRPC server credentials for the status service: server certificate, client certificates from the CA required."""
        self.require(self.server_cert, self.server_key, self.ca_cert)
        return mutual_tls_server_credentials(self.server_cert, self.server_key, self.ca_cert)

    def status_client_credentials(self):
        """gRPC channel credentials for `pollinate status/download`: trust the CA, present the operator certificate."""
        import grpc

        self.require(self.ca_cert, self.operator_cert, self.operator_key)
        return grpc.ssl_channel_credentials(root_certificates=self.ca_cert.read_bytes(),
                                            private_key=self.operator_key.read_bytes(),
                                            certificate_chain=self.operator_cert.read_bytes())


def create_cert_dir(out_dir: str | Path, hosts: list[str] | None = None, nodes: int = 2,
                    force: bool = False) -> CertDir:
    """Write a CA, server and operator certificates and ``nodes`` node key pairs into ``out_dir``."""
    certs = CertDir(Path(out_dir))
    hosts = [_checked_host(h) for h in hosts or DEFAULT_HOSTS]
    if nodes < 0:
        raise CertError(f"--nodes {nodes}: use 0 or more")
    targets = [certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key, certs.operator_cert,
               certs.operator_key] + [p for i in range(1, nodes + 1) for p in (certs.node_key(i), certs.node_public_key(i))]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise CertError(f"{certs.root} already holds {', '.join(existing[:4])}{' ...' if len(existing) > 4 else ''}; "
                        f"pass --force to replace them (running nodes then need the new CA) or choose another directory")
    (certs.root / "nodes").mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    _write(certs.ca_key, _pem_key(ca_key), private=True)
    _write(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    for cert_path, key_path, cn, usage, sans in (
            (certs.server_cert, certs.server_key, "pollinate coordinator", ExtendedKeyUsageOID.SERVER_AUTH, hosts),
            (certs.operator_cert, certs.operator_key, "pollinate operator", ExtendedKeyUsageOID.CLIENT_AUTH, [])):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(key_path, _pem_key(key), private=True)
        _write(cert_path, _leaf_certificate(key, cn, usage, sans, ca_key, ca_cert).public_bytes(serialization.Encoding.PEM))
    for i in range(1, nodes + 1):
        write_node_key(certs.node_key(i), certs.node_public_key(i), comment=f"pollinate-node-{i}")
    return certs


def write_node_key(private_path: Path, public_path: Path, comment: str) -> None:
    """An EC P-384 key pair in OpenSSH format: Flower 1.42 accepts NIST EC curves for SuperNode auth."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, private, private=True)
    _write(public_path, public + f" {comment}\n".encode())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pollinate"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    # Back-dated a little: a node whose clock lags the CA's must not see a not-yet-valid certificate.
    return builder.not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name("pollinate CA")).issuer_name(_name("pollinate CA"))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    return _validity(builder, CA_DAYS).sign(key, hashes.SHA384())


def _leaf_certificate(key: ec.EllipticCurvePrivateKey, cn: str, usage: x509.ObjectIdentifier, hosts: list[str],
                      ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return _validity(builder, LEAF_DAYS).sign(ca_key, hashes.SHA384())


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _checked_host(host: str) -> str:
    """A SAN the nodes can match: an IP address (``ipaddress``), or a DNS name of RFC 1123 labels.

    A dotted all-numeric name (``999.1.1.1``) is an IP address with an octet out of range, not a host name."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        raise CertError(f"--host {host} is not a valid IP address (each IPv4 part is 0..255); give the coordinator's "
                        f"real address or DNS name")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise CertError(f"--host {host!r} is neither an IP address nor a DNS name (letters, digits and '-' between "
                        f"dots); give the name or address the nodes use to reach the coordinator")
    return host


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data``; private keys are created 0600 (never briefly world-readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
