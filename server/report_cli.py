"""``pollinate report RUN``: a stored run's plots (PNG) and one Markdown page that puts them together."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from pollinate.flags import add_db_argument, store_url
from pollinate.proto.run_config import ConfigError

console = Console(highlight=False, soft_wrap=True)
PAGE = "report.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=int, help="the run id (`pollinate runs` lists them)")
    parser.add_argument("--out", metavar="DIR", help="directory for the PNGs and report.md (default: "
                        "<the run's store.output-dir>/run-<RUN>/report)")
    add_db_argument(parser)


def output_dir(out: str | None, config_output_dir: object, run_id: int) -> Path:
    """The report's directory, created; a path that is a file or cannot be created is refused in one line."""
    directory = Path(out) if out else Path(str(config_output_dir or "runs")) / f"run-{run_id}" / "report"
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--out {directory}: is a file, not a directory; give a directory (it is created if absent)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {directory}: cannot create it ({e.strerror}); give a directory you can write to")
    return directory


def report_command(args: argparse.Namespace) -> int:
    from pollinate.server.run_page import render_page  # matplotlib: only when a report is drawn
    from pollinate.server.run_plots import RunData, draw_all
    from pollinate.server.store import RoundStore

    data = RunData.load(RoundStore(store_url(args.db)), args.run)  # StoreError (one line) for an unknown run
    out = output_dir(args.out, data.run.config.get("store.output-dir"), args.run)
    try:
        plots = draw_all(data, out)
        page = out / PAGE
        page.write_text(render_page(data, plots, page))
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write the report there ({e.strerror}); give a directory you can "
                          f"write to") from None
    console.print(f"run {args.run}: {len(plots)} plots ({', '.join(p.name for p in plots.values())}) and {page}")
    return 0
