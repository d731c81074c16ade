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


def _privacy(args: argparse.Namespace) -> int:
    from server.report import privacy_json, privacy_table
    from server.store import RoundStore

    store = RoundStore(args.db)
    if args.json:
        print(json.dumps(privacy_json(store, args.run), indent=2))
    else:
        console.print(privacy_table(store, args.run))
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
    from simulations.cli import add_arguments

    parser = argparse.ArgumentParser(prog="pollinate", description="federated fine-tuning of adapters (LoRA) "
                                     "where only adapter tensors leave a node")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a scenario on Flower's Simulation Engine")
    add_arguments(sim)
    sim.set_defaults(func=_simulate)
    runs = sub.add_parser("runs", help="list runs and their rounds from the round store")
    runs.add_argument("run", nargs="?", type=int, help="show this run's rounds")
    runs.add_argument("--db", default="sqlite:///pollinate.db", help="round store URL")
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    runs.set_defaults(func=_runs)
    priv = sub.add_parser("privacy", help="a run's privacy report: guarantee, epsilon spent, the privacy ledger")
    priv.add_argument("run", type=int, help="the run id (`pollinate runs`)")
    priv.add_argument("--db", default="sqlite:///pollinate.db", help="round store URL")
    priv.add_argument("--json", action="store_true", help="machine-readable output")
    priv.set_defaults(func=_privacy)
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
