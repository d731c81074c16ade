"""A certificate directory -> the exact Flower 1.42 flags and CLI config that use it.

Flower 1.42 serves the SuperLink's Fleet, Control and Runtime APIs over one HTTPS port
(``--host``/``--port``). TLS: ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` on the SuperLink,
``--root-certificates`` on a SuperNode and ``root-certificates`` in the ``flwr`` CLI's connection.
SuperNode authentication: the SuperLink runs with ``--enable-supernode-auth`` (it refuses it
without TLS); each node's public key is registered with ``flwr supernode register KEY.pub``; the
node signs its requests with the private key (``--auth-supernode-private-key``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from pollinate.security.certs import CertDir, CertError


def superlink_flags(certs: CertDir, node_auth: bool = True) -> list[str]:
    """TLS for every SuperLink API, and (by default) only registered SuperNodes may connect."""
    certs.require(certs.ca_cert, certs.server_cert, certs.server_key)
    flags = ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
             "--ssl-keyfile", str(certs.server_key)]
    return flags + (["--enable-supernode-auth"] if node_auth else [])


def supernode_flags(ca_cert: str | Path, private_key: str | Path | None) -> list[str]:
    """Verify the SuperLink against ``ca_cert``; authenticate with ``private_key`` (an OpenSSH EC key)."""
    paths = [Path(p).expanduser().resolve() for p in (ca_cert, private_key) if p is not None]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CertError(f"{', '.join(missing)} missing: a node needs the deployment's ca.crt and its own key "
                        f"(nodes/node-<i> from `pollinate certs`)")
    flags = ["--root-certificates", str(paths[0])]
    return flags + (["--auth-supernode-private-key", str(paths[1])] if len(paths) > 1 else [])


def node_flags(certs: CertDir, node: int) -> list[str]:
    """``supernode_flags`` for node ``node`` of a directory written by ``pollinate certs``."""
    return supernode_flags(certs.ca_cert, certs.node_key(node))


def flwr_connection(certs: CertDir, address: str) -> dict[str, str]:
    """The ``[superlink.<name>]`` table of the flwr CLI's config.toml for a TLS SuperLink at HOST:PORT."""
    certs.require(certs.ca_cert)
    return {"address": address, "root-certificates": str(certs.ca_cert)}


def write_flwr_connection(flwr_home: str | Path, name: str, certs: CertDir, address: str,
                          default: bool = True) -> Path:
    """Add (or replace) connection ``name`` in ``$FLWR_HOME/config.toml``, keeping the file's other entries."""
    path = Path(flwr_home).expanduser() / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    superlink[name] = flwr_connection(certs, address)
    if default:
        superlink["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def register_command(certs: CertDir, node: int, connection: str) -> list[str]:
    """The flwr command that allows node ``node`` to connect (run once per node, by the coordinator's operator)."""
    certs.require(certs.node_public_key(node))
    return ["flwr", "supernode", "register", str(certs.node_public_key(node)), connection]
