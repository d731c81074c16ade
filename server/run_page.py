"""The Markdown page of ``pollinate report``: a run's summary, its plots, its rounds, what went wrong, its config."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

from pollinate.server.run_plots import RunData, outcome_counts

PLOT_CAPTIONS = {
    "loss-accuracy": "Loss and accuracy per round (round 0: the initial adapter, before training)",
    "bytes": "Bytes each node sent (up) and received (down) per round, over all of the round's exchanges",
    "participation": "Each node's part in each round",
    "outcomes": "Node replies per round: accepted, rejected, failed",
    "epsilon": "Privacy: epsilon spent over the rounds",
}


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


MARKDOWN_SPECIAL = "\\`*_[]|!"


def _cell(text: object) -> str:
    """Text as text on the page: one line, no HTML, no Markdown (links, images, code, table breaks).

    A rejection reason quotes what a node sent, and every node is untrusted: its text must not become an image
    fetched from elsewhere, a link or a script in whatever renders the page.
    """
    line = html.escape(" ".join(str(text).split()), quote=False)
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in line)


def render_page(data: RunData, plots: Mapping[str, Path], page: Path) -> str:
    """The page's Markdown; plots are linked relative to ``page``'s directory, so the directory can be moved."""
    run, rounds = data.run, data.rounds
    last = next((r for r in reversed(rounds) if r.eval_accuracy is not None), None)
    lines = [f"# Run {run.id}: {_cell(run.strategy)} on {_cell(run.model)}", "",
             "| | |", "|---|---|",
             f"| status | {_cell(run.status)} |",
             f"| started | {run.started_at:%Y-%m-%d %H:%M:%S} |",
             f"| ended | {run.ended_at:%Y-%m-%d %H:%M:%S} |" if run.ended_at else "| ended | - |",
             f"| rounds stored | {len(rounds)} of {run.config.get('federation.rounds', '?')} "
             f"({sum(r.status == 'failed' for r in rounds)} failed) |",
             f"| accuracy | {_fmt(run.initial_metrics.get('eval-accuracy'))} before training, "
             f"{_fmt(last.eval_accuracy if last else None)} after round {last.number if last else '-'} |",
             f"| bytes | {sum(r.bytes_up for r in rounds) / 2**20:.2f} MiB up, "
             f"{sum(r.bytes_down for r in rounds) / 2**20:.2f} MiB down |",
             f"| time | {sum(r.duration_s for r in rounds):.1f} s in rounds |",
             f"| adapter | {_cell(run.adapter_dir or '-')} |"]
    if run.error:
        lines.append(f"| error | {_cell(run.error)} |")
    lines.append("")
    for name, path in plots.items():
        lines += [f"## {PLOT_CAPTIONS.get(name, name)}", "", f"![{name}]({path.relative_to(page.parent)})", ""]
    lines += _rounds_table(data) + _problems(data) + _nodes(data) + _config(run.config)
    return "\n".join(lines) + "\n"


def _rounds_table(data: RunData) -> list[str]:
    counts = outcome_counts(data)
    lines = ["## Rounds", "", "| round | status | train loss | eval loss | accuracy | accepted | rejected | failed "
             "| KiB up/client | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(data.rounds):
        lines.append(f"| {r.number} | {r.status} | {_fmt(r.train_loss)} | {_fmt(r.eval_loss)} | "
                     f"{_fmt(r.eval_accuracy)} | {r.accepted}/{r.participants} | {counts['rejected'][i]} | "
                     f"{counts['failed'][i]} | {r.bytes_up / max(1, r.accepted) / 1024:.1f} | {r.duration_s:.1f} |")
    return lines + [""]


def _problems(data: RunData) -> list[str]:
    """Every failed round's reason and every rejected or failed node record, with its reason."""
    labels = data.node_labels
    failed_rounds = [f"- round {r.number} failed: {_cell(r.reason or '')}" for r in data.rounds
                     if r.status == "failed"]
    records = [f"- round {c.round_number}, node {labels[c.node_id]}, {_cell(c.phase)}: {_cell(c.status)}: "
               f"{_cell(c.reason or '')}"
               for c in data.clients if c.status != "accepted"]
    if not failed_rounds and not records:
        return ["## Rejections and failures", "", "None: every node's every reply was accepted.", ""]
    return ["## Rejections and failures", "", *failed_rounds, *records, ""]


def _nodes(data: RunData) -> list[str]:
    lines = ["## Nodes", "", "| node | Flower node id |", "|---|---|"]
    lines += [f"| {label} | {node} |" for node, label in data.node_labels.items()]
    return lines + [""]


def _config(config: Mapping[str, object]) -> list[str]:
    lines = ["## Config", "", "| key | value |", "|---|---|"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in sorted(config.items())]
    return lines + [""]
