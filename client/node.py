"""``pollinate client``: a node of a real deployment, a Flower SuperNode running the pollinate ClientApp.

The node's settings reach the ClientApp as Flower node config (``client.app``: ``data-path``,
``max-rank``, ``device``, and its own privacy policy ``max-epsilon`` / ``max-delta`` / ``budget-scope``,
``privacy/node_policy.py``); its data never leaves it. The SuperNode keeps reconnecting when the
coordinator restarts (a resumed run finds the same nodes), and runs every ClientApp in a
subprocess (``--isolation subprocess``) on its own Runtime API port.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pollinate.flags import RENAMED_TLS_CLIENT, add_certs_argument, certs_of, host_port, port_number, refuse_renamed
from pollinate.privacy.node_policy import SCOPES, NodePolicy, PolicyError
from pollinate.proto.node_config import (BUDGET_SCOPE, DATA_PATH, DEFAULT_MAX_DELTA, DEVICE, MAX_DELTA, MAX_EPSILON,
                                         MAX_RANK, PRIVACY_STATE)
from pollinate.proto.run_config import ConfigError
from pollinate.runtime.processes import (Daemon, executable, flower_env, free_port, require_free_port,
                                         stop_on_sigterm, wait_healthy)
from pollinate.security.certs import CertDir
from pollinate.security.flower_flags import supernode_flags


@dataclass(frozen=True)
class NodeSecurity:
    """TLS and SuperNode authentication, from a `pollinate certs` directory (or this node's copy); none: insecure."""

    certs: CertDir | None = None  # --certs: its ca.crt signed the SuperLink's certificate
    node_key: Path | None = None  # --node-key: this node's private key (its public key is registered)

    @property
    def ca_cert(self) -> Path | None:
        return self.certs.ca_cert if self.certs is not None else None

    def flags(self) -> list[str]:
        if self.certs is None:
            if self.node_key is not None:
                raise ConfigError("--node-key needs --certs DIR: Flower authenticates SuperNodes only over TLS")
            return ["--insecure"]
        return supernode_flags(self.certs.ca_cert, self.node_key)


def node_config(data: Path, max_rank: int, device: str, privacy_state: Path | None = None,
                policy: NodePolicy | None = None) -> str:
    """Flower's ``--node-config`` string (TOML values, space separated)."""
    if not data.is_file():
        raise ConfigError(f"--data {data}: no such file on this node; pass the node's CSV or JSONL file "
                          f"(`text` + integer `label`, or `instruction` + `response`)")
    if max_rank < 0:
        raise ConfigError(f"--max-rank {max_rank} is invalid: use the largest LoRA rank this node can train, "
                          f"or 0 for no limit")
    config = f"{DATA_PATH}='{_plain_path(data, '--data')}' {MAX_RANK}={max_rank} {DEVICE}='{device}'"
    if privacy_state is not None:
        if privacy_state.is_dir() or not os.access(privacy_state.parent, os.W_OK):
            raise ConfigError(f"--privacy-state {privacy_state}: give a file path in an existing, writable "
                              f"directory (the node's DP budget is kept there across runs and restarts)")
        config += f" {PRIVACY_STATE}='{_plain_path(privacy_state, '--privacy-state')}'"
    if policy is not None:  # repr keeps every digit: the ClientApp parses back exactly these floats
        config += (f" {MAX_EPSILON}={policy.max_epsilon!r} {MAX_DELTA}={policy.delta!r} "
                   f"{BUDGET_SCOPE}='{policy.scope}'")
    return config


def node_policy(args: argparse.Namespace) -> NodePolicy | None:
    """The node's privacy policy from --max-epsilon / --delta / --budget-scope (None without --max-epsilon)."""
    if args.max_epsilon is None:
        if args.delta is not None or args.budget_scope is not None:
            raise ConfigError("--delta and --budget-scope belong to this node's privacy policy: give its budget "
                              "too, e.g. --max-epsilon 3 --delta 1e-5")
        return None
    try:
        return NodePolicy(args.max_epsilon, DEFAULT_MAX_DELTA if args.delta is None else args.delta,
                          args.budget_scope or "node")
    except PolicyError as e:
        raise ConfigError(str(e)) from None


def _plain_path(path: Path, flag: str) -> str:
    resolved = str(path.resolve())
    if "'" in resolved or " " in resolved:
        raise ConfigError(f"{flag} {resolved}: Flower's node config cannot carry quotes or spaces in a path; "
                          f"move or link the file to a plain path")
    return resolved


def supernode_command(superlink: str, config: str, runtime_port: int, security: NodeSecurity) -> list[str]:
    return [executable("flower-supernode"), *security.flags(), "--superlink", superlink, "--node-config", config,
            "--isolation", "subprocess", "--port", str(runtime_port)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", type=host_port,
                        help="the coordinator's SuperLink (`pollinate server --port`)")
    parser.add_argument("--data", required=True, type=Path, help="this node's CSV/JSONL examples (stay here)")
    parser.add_argument("--max-rank", type=int, default=0, help="largest LoRA rank this node can train (0: no limit)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--privacy-state", type=Path, metavar="FILE",
                        help="where this node keeps its differential-privacy budget (default: beside --data); "
                             "it must be writable, e.g. when the data is mounted read-only")
    parser.add_argument("--max-epsilon", type=float, metavar="E",
                        help="this node's own privacy budget: it trains only under DP it applies itself (--dp "
                             "sample or local), refuses a run whose target epsilon exceeds what is left of E, and "
                             "stops before any round that would take its spend over E (docs/privacy.md)")
    parser.add_argument("--delta", type=float, metavar="D",
                        help=f"with --max-epsilon: the largest delta this node accepts, and the delta it accounts "
                             f"at (default {DEFAULT_MAX_DELTA:g})")
    parser.add_argument("--budget-scope", choices=SCOPES,
                        help="with --max-epsilon: node (default) = one budget across every run and coordinator; "
                             "run = one budget per pollinate run (a coordinator that starts a new run resets it)")
    parser.add_argument("--runtime-port", type=port_number, help="local port of the SuperNode's Runtime API "
                        "(default: a free one; nodes on one machine need different ports)")
    parser.add_argument("--wait", type=float, default=120.0,
                        help="seconds to wait for the SuperLink to answer before giving up (default 120)")
    add_certs_argument(parser, "the SuperLink is verified against its ca.crt")
    parser.add_argument("--node-key", type=Path, metavar="FILE",
                        help="with --certs: this node's private key for SuperNode authentication (nodes/node-<i> from "
                             "`pollinate certs`; the coordinator registers nodes/node-<i>.pub)")
    refuse_renamed(parser, RENAMED_TLS_CLIENT)


def run_node(args: argparse.Namespace) -> int:
    """Start the SuperNode and serve until stopped (Ctrl-C / SIGTERM) or the SuperNode exits."""
    stop_on_sigterm()
    policy = node_policy(args)
    config = node_config(args.data, args.max_rank, args.device, args.privacy_state, policy)
    security = NodeSecurity(certs_of(args), args.node_key)
    security.flags()  # fail fast: a key without TLS, missing files
    runtime_port = args.runtime_port or free_port()
    require_free_port("127.0.0.1", runtime_port, "SuperNode's Runtime API", "--runtime-port")
    scheme = "https" if security.ca_cert else "http"
    verify: str | bool = str(security.ca_cert) if security.ca_cert else False
    if not wait_healthy(f"{scheme}://{args.superlink}", args.wait, verify):
        raise ConfigError(f"the SuperLink at {args.superlink} did not answer within {args.wait:.0f} s; start the "
                          f"coordinator first (`pollinate server --port ...`), check --superlink HOST:PORT and the "
                          f"firewall, or wait longer with --wait")
    with tempfile.TemporaryDirectory(prefix="pollinate-node-") as home:
        node = Daemon("SuperNode", supernode_command(args.superlink, config, runtime_port, security),
                      flower_env(Path(home)))
        print(f"node serving {args.data} (max-rank {args.max_rank or 'unlimited'}, device {args.device}) for the "
              f"SuperLink at {args.superlink}; SuperNode pid {node.pid}", flush=True)
        try:
            return node.process.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            node.stop()
