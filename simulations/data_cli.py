"""``pollinate data check PATH``: the check ``pollinate simulate`` runs on its corpus, alone and in seconds.

It reads the file as a node would (``client.data_check.check_dataset``), with the column names, classes and task
of a scenario (``--scenario``, default: the default scenario) and ``--set`` overrides, and infers the class names
from the file as a simulation does. A bad file is one line naming the file, the row and the fix.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from pollinate.flags import add_scenario_arguments, scenario_of
from pollinate.proto.run_config import ConfigError, parse_assignments
from pollinate.simulations.scenario import DEFAULT_SCENARIO, load_scenario

console = Console(highlight=False, width=max(100, Console().width))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    check = sub.add_parser("check", help="check a data file (or a corpus) as a node and `pollinate simulate` would")
    check.add_argument("path", type=Path, help="a CSV, JSONL, Parquet or Arrow file, or a `datasets` save_to_disk "
                       "directory")
    add_scenario_arguments(check, "default: the default scenario (its [model] and [data] tables are used)")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a run config key, e.g. --set data.text-field=sentence (repeatable)")
    check.set_defaults(data_func=check_command)


def check_command(args: argparse.Namespace) -> int:
    from pollinate.client.data import read_rows
    from pollinate.client.data_check import infer_labels, summarise

    cfg, _ = load_scenario(scenario_of(args) or DEFAULT_SCENARIO, parse_assignments(args.set,
                                                                                    "data.text-field=sentence"))
    if not args.path.exists():
        raise ConfigError(f"{args.path}: no such file or directory; pass the data file to check")
    rows = read_rows(args.path)
    cfg = cfg.replace(**infer_labels(rows, cfg.data, cfg.model))
    summary = summarise(rows, args.path, cfg.data, cfg.model)
    if cfg.data.partitioning == "natural" and not summary.groups:
        raise ConfigError(f"{args.path}: data.partitioning = 'natural' needs a {cfg.data.group_field!r} column; "
                          f"the file has {list(summary.columns)}: set data.group-field to one")
    console.print(f"{summary.path}: {summary.examples} examples, columns {', '.join(summary.columns)}")
    if summary.classes:
        names = "data.labels = " + ",".join(cfg.data.labels) if cfg.data.labels else "integer ids"
        console.print(f"  {cfg.model.num_labels} classes ({names}): "
                      + ", ".join(f"{k} {v}" for k, v in summary.classes.items()))
    if summary.groups:
        console.print(f"  {summary.groups} distinct {cfg.data.group_field!r} values (data.group-field)")
    console.print("  ok: every row is usable")
    return 0
