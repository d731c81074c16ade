"""``pollinate server``: the coordinator of a real deployment (Flower SuperLink + the pollinate ServerApp).

A new run takes its config from a scenario TOML (its ``[simulation]`` table is ignored) plus ``--set``;
``--resume RUN_ID`` continues a stored run from its last completed round with the config it was started
with: only ``server.resume.RESUMABLE_KEYS`` (more rounds, longer waits, the store's location) may change.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from pollinate.flags import (RENAMED_TLS_SERVER, absolute_locations, add_certs_argument, add_insecure_argument,
                             add_run_config_arguments, add_scenario_arguments, certs_of, overrides_from_args,
                             port_number, refuse_renamed, scenario_of, store_url)
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.runtime.processes import stop_on_sigterm
from pollinate.security.exposure import check_exposure
from pollinate.simulations.scenario import DEFAULT_SCENARIO, load_scenario

if TYPE_CHECKING:
    from pollinate.server.launch import SuperLinkSecurity
    from pollinate.server.status_service import StatusServer

DEFAULT_PORT = 9092
STATUS_PORT = 9095  # server.status_service.DEFAULT_PORT (not imported here: it loads grpc for --help)
SERVES = "the SuperLink (its Control API accepts runs, i.e. code to run here) and the status service"
console = Console(highlight=False, width=max(100, Console().width))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scenario_arguments(parser, "default: the default scenario (its [simulation] table is ignored). "
                           "Not with --resume")
    parser.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on (0.0.0.0: all)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="the SuperLink's port: nodes connect to "
                        "it (`pollinate client --superlink HOST:PORT`)")
    add_run_config_arguments(parser, "federation.min-nodes=3")
    parser.add_argument("--resume", type=int, metavar="RUN_ID",
                        help="continue this stored run from its last completed round (`pollinate runs` lists runs); "
                             "--rounds is then the new total")
    parser.add_argument("--state-dir", help="the SuperLink's state and log (default: <output>/superlink)")
    add_certs_argument(parser, "the SuperLink and the status service present server.crt/server.key, and trust "
                       "ca.crt")
    parser.add_argument("--enable-supernode-auth", action="store_true",
                        help="with --certs: accept only SuperNodes whose public keys were registered")
    parser.add_argument("--register-node", type=Path, action="append", default=[], metavar="PUBLIC_KEY",
                        help="with --enable-supernode-auth: register this SuperNode public key (nodes/node-<i>.pub "
                             "from `pollinate certs`) when the SuperLink is up; repeat per node")
    parser.add_argument("--status-port", type=port_number, default=STATUS_PORT,
                        help="pollinate's status service (`pollinate status`, `pollinate download`) on --host; "
                             "with --certs it requires an operator certificate from the same CA")
    parser.add_argument("--no-status", action="store_true", help="do not start the status service")
    add_insecure_argument(parser, SERVES)
    refuse_renamed(parser, RENAMED_TLS_SERVER)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The config of a new run (scenario + overrides), or of the resumed one (stored + harmless overrides)."""
    from pollinate import strategies  # here, not at the top: they pull in torch, and `pollinate --help` should not wait for it
    from pollinate.models import check_model_config
    from pollinate.server.resume import check_resumable, resumed_config
    from pollinate.server.store import RoundStore, keep_password, withhold_password

    overrides = overrides_from_args(args, "federation.min-nodes=3")
    scenario = scenario_of(args)
    if args.resume is None:
        cfg, _ = load_scenario(scenario or DEFAULT_SCENARIO, overrides)
        cfg = absolute_locations(cfg)
        url, password = withhold_password(cfg.store.db)  # every node gets the run config
        keep_password(url, password)  # this process opens the store; the SuperLink gets it from launch.coordinate
        cfg = cfg.replace(**{"store.db": url})
        strategies.build(cfg)  # fail fast: an unknown or incompatible strategy
        check_model_config(cfg.model)
        RoundStore(cfg.store.db)  # fail fast: an unreachable database
        return cfg
    if scenario:
        raise ConfigError("--resume continues a stored run with the config it was started with; drop --scenario "
                          "(change only what a resume may change, e.g. --rounds)")
    url, password = withhold_password(str(overrides.get("store.db", store_url(None))))
    keep_password(url, password)
    run = RoundStore(url).run(args.resume)
    check_resumable(run)
    return resumed_config(run.config, {**overrides, "store.db": url, "store.resume-run": args.resume})


def serve(args: argparse.Namespace) -> int:
    from pollinate.server.launch import SuperLinkSecurity, coordinate
    from pollinate.server.progress_view import ProgressView
    from pollinate.server.report import rounds_table
    from pollinate.server.store import RoundStore

    security = SuperLinkSecurity(certs_of(args), args.enable_supernode_auth, tuple(args.register_node))
    # Before anything else: Flower 1.42 serves its unauthenticated Control API on --host:--port too.
    warning = check_exposure(args.host, security.tls, args.insecure, SERVES)
    security.flags()  # fail fast: inconsistent TLS / node-auth flags, missing key files
    if warning:
        console.print(f"[yellow]{warning}[/]", soft_wrap=True)
    stop_on_sigterm()  # `docker stop`, systemd: stop the SuperLink and its runs too
    cfg = run_config(args)
    state_dir = Path(args.state_dir or Path(cfg.store.output_dir) / "superlink")
    console.print(f"SuperLink on {args.host}:{args.port} ({'TLS' if security.tls else 'insecure'}); nodes join with "
                  f"`pollinate client --superlink HOST:{args.port} --data PATH"
                  f"{' --certs DIR' if security.tls else ''}`", soft_wrap=True)
    store = RoundStore(cfg.store.db)
    stale = [int(a.flower_run_id) for a in store.attempts(cfg.store.resume_run)] if cfg.store.resume_run else []
    status = None if args.no_status else _start_status(cfg.store.db, args.host, args.status_port, security,
                                                       args.insecure)
    try:
        with ProgressView(console) as view:  # the ServerApp's round events, through `flwr log`
            result = coordinate(cfg, args.host, args.port, state_dir, security, stale_runs=stale, output=view.line)
    finally:
        if status is not None:
            status.stop()
    run_id = store.run_of_flower_run(result.flower_run_id) if result.flower_run_id is not None else None
    if run_id is None:
        console.print(f"[red]no run was recorded (Flower run {result.flower_run_id}); see {result.log}[/]",
                      soft_wrap=True)
        return 1
    run = store.run(run_id)
    if run.status == "running":  # the ServerApp was stopped before it could say so
        store.finish_run(run_id, "interrupted", error="the coordinator was stopped; "
                         f"`pollinate server --resume {run_id}` continues it")
        run = store.run(run_id)
    console.print(rounds_table(store, run_id))
    console.print(f"round store: {store.url} (run {run_id}, status {run.status})", soft_wrap=True)
    if run.status == "completed":
        console.print(f"PEFT adapter: {run.adapter_dir}", soft_wrap=True)
        return 0
    if result.superlink_exit is not None:
        console.print(f"[red]the SuperLink exited with code {result.superlink_exit}; see {result.log}[/]",
                      soft_wrap=True)
    console.print(f"[red]run {run_id} {run.status}: {run.error}[/]\nresume it: pollinate server --resume {run_id} "
                  f"--db {store.url}", soft_wrap=True)
    return 130 if result.interrupted else 1


def _start_status(store_url: str, host: str, port: int, security: SuperLinkSecurity, insecure: bool) -> StatusServer:
    from pollinate.runtime.processes import require_free_port
    from pollinate.server.status_service import serve_status

    require_free_port(host, port, "status service", "--status-port (or --no-status)")
    status = serve_status(store_url, host, port, tls=security if security.tls else None, insecure=insecure)
    console.print(f"status service on {host}:{status.port} ({'mutual TLS' if security.tls else 'insecure'}): "
                  f"`pollinate status --coordinator HOST:{status.port}`", soft_wrap=True)
    return status

