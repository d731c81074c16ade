"""Generate ``[tool.flwr.app.config]`` in pyproject.toml from the run config schema.

``flwr run .`` takes the run config's keys from that table, and Flower refuses or drops any
``--run-config`` key not listed there, so it must list every settable key: each section's and
every built-in strategy's options (``run_config.schema_defaults``). Hand-kept, it drifted; so it
is generated, and a test checks that the checked-in table is current.

    python -m pollinate.proto.pyproject_mirror pyproject.toml          # rewrite the table
    python -m pollinate.proto.pyproject_mirror --check pyproject.toml  # exit 1 when stale
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from pollinate.proto.run_config import Scalar, options_class, option_fields, schema_defaults

HEADER = "[tool.flwr.app.config]"
COMMAND = "python -m pollinate.proto.pyproject_mirror pyproject.toml"
_PREAMBLE = ("# Generated from the run config schema (proto/run_config.py and each strategy's Options) by\n"
             f"# `{COMMAND}`; a test checks it is current.\n"
             "# Flower passes on only the keys listed here, so every settable key is here;\n"
             "# strategy.<name>.* apply when federation.strategy = <name>.\n")


def mirror_table(defaults: Mapping[str, Scalar] | None = None) -> str:
    """The ``[tool.flwr.app.config]`` table (with its comment lines) for the schema's defaults."""
    defaults = schema_defaults() if defaults is None else defaults
    lines = [_PREAMBLE + HEADER]
    for key, value in defaults.items():
        line = tomli_w.dumps({"k": value}).strip().removeprefix("k = ")
        lines.append(f"{key} = {line}{_help(key)}")
    return "\n".join(lines) + "\n"


def current_table(pyproject: str) -> str:
    """The table as it stands in ``pyproject``, from its generated comment (or header) to the next table."""
    match = _TABLE.search(pyproject)
    if match is None:
        raise SystemExit(f"pyproject.toml has no {HEADER} table")
    return match.group(0)


def write(path: Path) -> bool:
    """Rewrite the table in ``path``; True when it changed."""
    text = path.read_text()
    new = text.replace(current_table(text), mirror_table(), 1)
    path.write_text(new)
    return new != text


def _help(key: str) -> str:
    if not key.startswith("strategy."):
        return ""
    strategy = key.split(".")[1]
    help_text = option_fields(strategy, options_class(strategy))[key].metadata.get("help", "")
    return f"  # {help_text}" if help_text else ""


# The generated block: its comment lines (if any), the header and its lines, up to a blank line or the next table.
_TABLE = re.compile(r"(?:^# Generated from the run config schema.*\n(?:#.*\n)*)?^\[tool\.flwr\.app\.config\]\n"
                    r"(?:[^\[\n].*(?:\n|$))*", re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path, nargs="?", default=Path("pyproject.toml"))
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is stale; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = current_table(args.pyproject.read_text()) != mirror_table()
        print(f"{args.pyproject}: {HEADER} is {'stale; run ' + COMMAND if stale else 'current'}")
        return 1 if stale else 0
    print(f"{args.pyproject}: {HEADER} {'rewritten' if write(args.pyproject) else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
