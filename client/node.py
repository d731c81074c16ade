"""``pollinate client``: a node of a real deployment, a Flower SuperNode running the pollinate ClientApp.

The node's settings reach the ClientApp as Flower node config (``client.app``: ``data-path``,
``max-rank``, ``device``, and its own privacy policy ``max-epsilon`` / ``max-delta`` / ``budget-scope``,
``privacy/node_policy.py``); its data never leaves it. The SuperNode keeps reconnecting when the
coordinator restarts (a resumed run finds the same nodes). It runs with ``--isolation process``:
it launches nothing itself, and one warm worker (``client/warm.py``) beside it serves every message
from its Runtime API on 127.0.0.1, so the base model and the data load once per run. This command
supervises both: a worker that dies is restarted (bounded, with backoff) and serves the next round;
stopping the command stops both process trees by PID.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pollinate.flags import RENAMED_TLS_CLIENT, add_certs_argument, certs_of, host_port, port_number, refuse_renamed
from pollinate.client.warm import CRASH_AT_TASK
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
    if not data.exists():
        raise ConfigError(f"--data {data}: no such file on this node; pass the node's CSV, JSONL, Parquet or Arrow "
                          f"file or `datasets` save_to_disk directory (`pollinate data check PATH` checks it)")
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




def check_data(path: Path) -> int:
    """Refuse a bad ``--data`` file before the node connects: its format, every row, at least 2 examples.

    The rows are read and checked by ``client/data.py`` (the ClientApp's own reader), against the task the
    columns name. Field names other than the defaults are the run's choice (``data.text-field``): those rows
    are checked when the first message arrives. Returns how many examples the file holds.
    """
    from pollinate.client.data import read_rows, split
    from pollinate.client.data_check import infer_labels, summarise
    from pollinate.proto.run_config import RunConfig

    rows = read_rows(path)  # a DataError with the file and line when the format is wrong
    cfg = RunConfig()
    if rows and "instruction" in rows[0]:
        cfg = cfg.replace(**{"model.task": "causal-lm"})
    elif rows and not (cfg.data.text_field in rows[0] and cfg.data.label_field in rows[0]):
        return len(rows)
    else:  # class names are fine here: the run's data.labels maps them, checked when the first message arrives
        cfg = cfg.replace(**infer_labels(rows, cfg.data, cfg.model))
    summary = summarise(rows, path, cfg.data, cfg.model)  # every row, as the ClientApp reads it
    split([None] * summary.examples, cfg.data.eval_fraction, 0)  # at least one to train, one to evaluate
    return summary.examples


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
            "--isolation", "process", "--port", str(runtime_port)]


def worker_command(runtime_port: int, threads: int = 0) -> list[str]:
    """The warm worker that serves the SuperNode's ClientApp tasks (``client/warm.py``)."""
    return [sys.executable, "-m", "pollinate.client.warm", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--threads", str(threads), "--parent-pid", str(os.getpid())]


MAX_RESTARTS = 5  # worker crashes in a row (each within STABLE_S of its start) before the node gives up
STABLE_S = 300.0  # a worker that served this long has recovered: its crash count starts again
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)


def supervise(node: Daemon, start_worker: Callable[[bool], Daemon], check_s: float = 0.5) -> int:
    """Run until the SuperNode exits (its exit code), restarting a dead worker with backoff; both stopped by PID."""
    worker, started, crashes = start_worker(False), time.monotonic(), 0
    try:
        while node.running():
            if not worker.running():
                crashes = 0 if time.monotonic() - started > STABLE_S else crashes + 1
                if crashes > MAX_RESTARTS:
                    print(f"the warm worker died {crashes} times in a row (last exit code {worker.process.returncode});"
                          f" stopping the node: see the worker's error above, fix it and start the node again",
                          file=sys.stderr, flush=True)
                    return 1
                wait = BACKOFF_S[min(crashes, len(BACKOFF_S)) - 1] if crashes else 0.0
                print(f"the warm worker (pid {worker.pid}) exited with code {worker.process.returncode}; a message "
                      f"it was serving is recorded as this node's failure; restarting it in {wait:.0f} s", file=sys.stderr, flush=True)
                time.sleep(wait)
                worker, started = start_worker(True), time.monotonic()
                print(f"warm worker restarted, pid {worker.pid}", flush=True)
            time.sleep(check_s)
        return node.process.returncode
    finally:
        worker.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", type=host_port,
                        help="the coordinator's SuperLink (`pollinate server --port`)")
    parser.add_argument("--data", required=True, type=Path, help="this node's examples (stay here): CSV, JSONL, "
                        "Parquet, Arrow or a `datasets` save_to_disk directory")
    parser.add_argument("--max-rank", type=int, default=0, help="largest LoRA rank this node can train (0: no limit)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads the node trains with (default 0: torch's default, all cores); give each "
                             "node its share when several run on one machine")
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
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads} is invalid: give the CPU threads this node may use, or 0 for "
                          f"torch's default")
    security = NodeSecurity(certs_of(args), args.node_key)
    security.flags()  # fail fast: a key without TLS, missing files
    examples = check_data(args.data)  # bad data is refused here, with its file and row, not in round 1
    runtime_port = args.runtime_port or free_port()
    require_free_port("127.0.0.1", runtime_port, "SuperNode's Runtime API", "--runtime-port")
    scheme = "https" if security.ca_cert else "http"
    verify: str | bool = str(security.ca_cert) if security.ca_cert else False
    if not wait_healthy(f"{scheme}://{args.superlink}", args.wait, verify):
        raise ConfigError(f"the SuperLink at {args.superlink} did not answer within {args.wait:.0f} s; start the "
                          f"coordinator first (`pollinate server --port ...`), check --superlink HOST:PORT and the "
                          f"firewall, or wait longer with --wait")
    with tempfile.TemporaryDirectory(prefix="pollinate-node-") as home:
        env = flower_env(Path(home))

        def start_worker(restart: bool) -> Daemon:
            # A restarted worker drops the fault-test hook, so a test's one crash stays one crash.
            return Daemon("warm worker", worker_command(runtime_port, args.threads),
                          {k: v for k, v in env.items() if k != CRASH_AT_TASK} if restart else env)

        def serve() -> int:
            node = Daemon("SuperNode", supernode_command(args.superlink, config, runtime_port, security), env)
            try:
                if not wait_healthy(f"http://127.0.0.1:{runtime_port}", 60.0, alive=node):
                    if not node.running():
                        return node.process.returncode
                    raise ConfigError(f"the SuperNode's Runtime API on 127.0.0.1:{runtime_port} did not come up; "
                                      f"see its error above (a port taken: choose another --runtime-port)")
                print(f"node serving {args.data} ({examples} examples, max-rank {args.max_rank or 'unlimited'}, "
                      f"device {args.device}) for the SuperLink at {args.superlink}; SuperNode pid {node.pid}",
                      flush=True)
                return supervise(node, start_worker)
            finally:
                node.stop()

        try:
            return serve_until_admitted(serve, security.node_key is not None, args.wait)
        except KeyboardInterrupt:
            return 130


def serve_until_admitted(serve: Callable[[], int], authenticated: bool, wait_s: float) -> int:
    """``serve()``; with node authentication, again with backoff while the SuperNode is refused, for ``wait_s``.

    A SuperLink with node authentication refuses a key it has not registered yet, and the SuperNode exits;
    the coordinator may register it a moment later. So nodes and coordinator may start in any order.
    """
    deadline, attempt = time.monotonic() + wait_s, 0
    while True:
        code = serve()
        left = deadline - time.monotonic()
        if code == 0 or not authenticated or left <= 0:
            return code
        attempt += 1
        pause = min(2.0 ** attempt, 30.0, left)
        print(f"the SuperNode exited with code {code} (attempt {attempt}): with node authentication the SuperLink "
              f"refuses a key it has not registered yet; retrying in {pause:.0f} s (--wait {wait_s:.0f} s in all; "
              f"register the key with `pollinate server --register-node`)", file=sys.stderr, flush=True)
        time.sleep(pause)
