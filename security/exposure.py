"""Who can reach a server pollinate starts: a plaintext server is refused on a non-loopback address unless the
operator says ``--insecure`` (docs/deployment-security.md, "Open surfaces")."""

from __future__ import annotations

import ipaddress

from pollinate.proto.run_config import ConfigError

LOOPBACK_NAMES = ("localhost",)  # besides 127.0.0.0/8 and ::1


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a DNS name, or 0.0.0.0 / :: (every interface): reachable from elsewhere


def check_exposure(host: str, tls: bool, insecure: bool, serves: str) -> str | None:
    """Refuse a plaintext server on a non-loopback ``host`` unless ``insecure``; when allowed, the warning to print."""
    if tls or is_loopback(host):
        return None
    if not insecure:
        raise ConfigError(f"--host {host} without --certs would serve {serves} in plaintext and unauthenticated to "
                          f"every machine that reaches this one; pass --certs DIR (`pollinate certs DIR`), or "
                          f"--host 127.0.0.1, or --insecure on a network you trust")
    return (f"warning: --insecure: {host} serves {serves} without TLS or authentication; whoever reaches this "
            f"host can use them")
