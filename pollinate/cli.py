"""The ``pollinate`` command: one entry point; each subcommand lives with the code it drives."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from pollinate.flags import add_db_argument, store_url
from pollinate.proto.run_config import ConfigError
from pollinate.server.store import StoreError

console = Console(highlight=False, width=max(100, Console().width))


def _simulate(args: argparse.Namespace) -> int:
    from pollinate.simulations.cli import simulate

    return simulate(args)


def _server(args: argparse.Namespace) -> int:
    from pollinate.server.cli import serve

    return serve(args)


def _client(args: argparse.Namespace) -> int:
    from pollinate.client.node import run_node

    return run_node(args)


def _runs(args: argparse.Namespace) -> int:
    from pollinate.server.report import rounds_table, runs_json, runs_table
    from pollinate.server.store import RoundStore

    store = RoundStore(store_url(args.db))
    if args.json:
        print(json.dumps(runs_json(store, args.run), indent=2))
    elif args.run is not None:
        console.print(rounds_table(store, args.run))
    else:
        console.print(runs_table(store))
    return 0


def _privacy(args: argparse.Namespace) -> int:
    from pollinate.server.report import privacy_json, privacy_table
    from pollinate.server.store import RoundStore

    store = RoundStore(store_url(args.db))
    if args.json:
        print(json.dumps(privacy_json(store, args.run), indent=2))
    else:
        console.print(privacy_table(store, args.run))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pollinate.server.report_cli import report_command

    return report_command(args)


def _strategies(args: argparse.Namespace) -> int:
    from pollinate import strategies
    from pollinate.proto.run_config import option_fields

    rows = [{"name": name, "exact": cls.exact, "heterogeneous_ranks": cls.heterogeneous_ranks,
             "linear": cls.linear, "summary": cls.summary,
             "options": {key: {"default": f.default, "help": f.metadata.get("help", "")}
                         for key, f in option_fields(name, cls.Options).items()}}
            for name, cls in sorted(strategies.registry().items())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="aggregation strategies")
    for col in ("name", "exact", "heterogeneous ranks", "linear (secure aggregation)", "what it does", "options"):
        table.add_column(col)
    for r in rows:
        options = "\n".join(f"{key}={o['default']}" for key, o in r["options"].items()) or "-"
        table.add_row(r["name"], *("yes" if r[k] else "no" for k in ("exact", "heterogeneous_ranks", "linear")),
                      r["summary"], options)
    console.print(table)
    return 0


def _status(args: argparse.Namespace) -> int:
    from pollinate.server.status_cli import status_command

    return status_command(args)


def _download(args: argparse.Namespace) -> int:
    from pollinate.server.status_cli import download_command

    return download_command(args)


def _certs(args: argparse.Namespace) -> int:
    from pollinate.security.certs import create_cert_dir
    from pollinate.security.flower_flags import node_flags, register_command, superlink_flags

    certs = create_cert_dir(args.out_dir, args.host, args.nodes, args.force)
    console.print(f"CA, server ({', '.join(args.host or ['localhost', '127.0.0.1', '::1'])}), operator certificates "
                  f"and {args.nodes} node key pair(s) in {certs.root}; private keys are 0600, keep ca.key offline")
    console.print(f"SuperLink:  flower-superlink {' '.join(superlink_flags(certs))} ...")
    for node in range(1, args.nodes + 1):
        console.print(f"node {node}:     {' '.join(register_command(certs, node, '<connection>'))}")
        console.print(f"            flower-supernode {' '.join(node_flags(certs, node))} ...")
    console.print(f"status:     pollinate status --certs {certs.root} --coordinator HOST:PORT")
    keys = " ".join(f"--register-node {certs.node_public_key(node)}" for node in range(1, args.nodes + 1))
    console.print(f"pollinate:  pollinate server --certs {certs.root}"
                  + (f" --enable-supernode-auth {keys}" if args.nodes else "") + " ...")
    for node in range(1, args.nodes + 1):
        console.print(f"            pollinate client --certs {certs.root} --node-key {certs.node_key(node)} "
                      f"--superlink HOST:PORT --data PATH   (node {node})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pollinate.client.node import add_arguments as add_client_arguments
    from pollinate.server.cli import add_arguments as add_server_arguments
    from pollinate.simulations.cli import add_arguments

    parser = argparse.ArgumentParser(prog="pollinate", description="federated fine-tuning of adapters (LoRA) "
                                     "where only adapter tensors leave a node")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a scenario on Flower's Simulation Engine")
    add_arguments(sim)
    sim.set_defaults(func=_simulate)
    server = sub.add_parser("server", help="coordinate a real deployment: a Flower SuperLink + the pollinate "
                            "ServerApp (or --resume a run whose coordinator died)")
    add_server_arguments(server)
    server.set_defaults(func=_server)
    client = sub.add_parser("client", help="join a deployment as a node: a Flower SuperNode + the pollinate "
                            "ClientApp, training on --data that never leaves this machine")
    add_client_arguments(client)
    client.set_defaults(func=_client)
    runs = sub.add_parser("runs", help="list runs and their rounds from the round store")
    runs.add_argument("run", nargs="?", type=int, help="show this run's rounds")
    add_db_argument(runs)
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    runs.set_defaults(func=_runs)
    priv = sub.add_parser("privacy", help="a run's privacy report: guarantee, epsilon spent, the privacy ledger")
    priv.add_argument("run", type=int, help="the run id (`pollinate runs`)")
    add_db_argument(priv)
    priv.add_argument("--json", action="store_true", help="machine-readable output")
    priv.set_defaults(func=_privacy)
    from pollinate.server.report_cli import add_arguments as add_report_arguments

    report = sub.add_parser("report", help="a run's plots (loss, accuracy, bytes, participation, epsilon) and a "
                            "Markdown page with its config and summary")
    add_report_arguments(report)
    report.set_defaults(func=_report)
    strat = sub.add_parser("strategies", help="list aggregation strategies and their properties")
    strat.add_argument("--json", action="store_true", help="machine-readable output")
    strat.set_defaults(func=_strategies)
    from pollinate.server.status_cli import add_download_arguments, add_status_arguments

    status = sub.add_parser("status", help="runs, rounds and the client ledger from a running coordinator")
    add_status_arguments(status)
    status.set_defaults(func=_status)
    down = sub.add_parser("download", help="fetch a round's global adapter (sha256-checked) as a PEFT directory")
    add_download_arguments(down)
    down.set_defaults(func=_download)
    certs = sub.add_parser("certs", help="a CA, TLS certificates and SuperNode auth keys for a deployment")
    certs.add_argument("out_dir", help="directory to write (see docs/deployment-security.md)")
    certs.add_argument("--host", action="append", default=None,
                       help="a DNS name or IP the coordinator is reached at; repeat (default: localhost, 127.0.0.1, ::1)")
    certs.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to create (nodes/node-<i>)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(func=_certs)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says what to fix: printed without a traceback."""
    from pollinate.security.certs import CertError
    from pollinate.server.status_client import DownloadError

    return ConfigError, StoreError, CertError, DownloadError, FileExistsError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _user_errors() as e:
        console.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
