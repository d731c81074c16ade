"""The ``pollinate`` command: one entry point; each subcommand lives with the code it drives."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from proto.run_config import ConfigError
from server.store import StoreError

console = Console(highlight=False, width=max(100, Console().width))


def _simulate(args: argparse.Namespace) -> int:
    from simulations.cli import simulate

    return simulate(args)


def _server(args: argparse.Namespace) -> int:
    from server.cli import serve

    return serve(args)


def _client(args: argparse.Namespace) -> int:
    from client.node import run_node

    return run_node(args)


def _runs(args: argparse.Namespace) -> int:
    from server.report import rounds_table, runs_json, runs_table
    from server.store import RoundStore

    store = RoundStore(args.db)
    if args.json:
        print(json.dumps(runs_json(store), indent=2))
    elif args.run is not None:
        console.print(rounds_table(store, args.run))
    else:
        console.print(runs_table(store))
    return 0


def _strategies(args: argparse.Namespace) -> int:
    import strategies

    rows = [{"name": name, "exact": cls.exact, "heterogeneous_ranks": cls.heterogeneous_ranks,
             "linear": cls.linear, "summary": cls.summary} for name, cls in sorted(strategies.registry().items())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="aggregation strategies")
    for col in ("name", "exact", "heterogeneous ranks", "linear (secure aggregation)", "what it does"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], *("yes" if r[k] else "no" for k in ("exact", "heterogeneous_ranks", "linear")),
                      r["summary"])
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from client.node import add_arguments as add_client_arguments
    from server.cli import add_arguments as add_server_arguments
    from simulations.cli import add_arguments

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
    runs.add_argument("--db", default="sqlite:///pollinate.db", help="round store URL")
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    runs.set_defaults(func=_runs)
    strat = sub.add_parser("strategies", help="list aggregation strategies and their properties")
    strat.add_argument("--json", action="store_true", help="machine-readable output")
    strat.set_defaults(func=_strategies)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, StoreError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
