"""PNG plots of one stored run (matplotlib, Agg: no display needed), for ``pollinate report``.

Each function reads only what ``RunData`` holds (one load from the round store) and writes one PNG. Node ids are
Flower's 64-bit ids, unreadable on an axis: a plot names nodes by their order of first appearance (node 1, 2, ...)
and the report page lists which id each is (``node_labels``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: a report is drawn on servers and in CI, with no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from pollinate.privacy.ledger import PrivacyEntry  # noqa: E402
from pollinate.server.store import RoundStore, RunSummary, StoredClientUpdate, StoredRound  # noqa: E402

# A node's part in one round, worst first: the colour of its cell in the participation plot.
PARTS = ("failed", "rejected", "trained", "evaluated only", "not in the round")
PART_COLOURS = ("#d62728", "#ff7f0e", "#2ca02c", "#9ecae1", "#f0f0f0")


@dataclass(frozen=True)
class RunData:
    """One run as the report draws it: its summary, rounds, every node's records and its privacy ledger."""

    run: RunSummary
    rounds: list[StoredRound]
    clients: list[StoredClientUpdate]
    ledger: list[tuple[int, PrivacyEntry]]

    @classmethod
    def load(cls, store: RoundStore, run_id: int) -> RunData:
        """Everything the report needs; ``StoreError`` (one line) for a run the store does not hold."""
        return cls(store.run(run_id), store.rounds(run_id), store.client_updates(run_id), store.privacy_ledger(run_id))

    @property
    def node_labels(self) -> dict[int, int]:
        """Flower node id -> its short label (1, 2, ...), in order of first appearance."""
        labels: dict[int, int] = {}
        for c in self.clients:
            labels.setdefault(c.node_id, len(labels) + 1)
        return labels

    @property
    def round_numbers(self) -> list[int]:
        return [r.number for r in self.rounds]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_accuracy(data: RunData, path: Path) -> Path:
    """Train and eval loss, and eval accuracy, per round (round 0: the initial adapter, before training)."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    init = data.run.initial_metrics
    rounds = [0] + data.round_numbers
    eval_loss = [init.get("eval-loss")] + [r.eval_loss for r in data.rounds]
    accuracy = [init.get("eval-accuracy")] + [r.eval_accuracy for r in data.rounds]
    _line(loss_ax, data.round_numbers, [r.train_loss for r in data.rounds], "train loss (nodes' mean)", "o-")
    _line(loss_ax, rounds, eval_loss, "eval loss (global adapter)", "s--")
    _line(acc_ax, rounds, accuracy, "eval accuracy (global adapter)", "s-")
    for r in data.rounds:
        if r.status == "failed":
            for ax in (loss_ax, acc_ax):
                ax.axvline(r.number, color=PART_COLOURS[0], alpha=0.3, lw=6)
    loss_ax.set(title="loss", xlabel="round", ylabel="loss")
    acc_ax.set(title="accuracy", xlabel="round", ylabel="accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(data), fontsize=10)
    return _save(fig, path)


def _line(ax: plt.Axes, xs: list[int], ys: list[float | None], label: str, style: str) -> None:
    points = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], style, label=label)


def plot_bytes(data: RunData, path: Path) -> Path:
    """KiB each node sent (solid) and received (dashed) per round, over all of the round's exchanges."""
    fig, ax = plt.subplots(figsize=(10, 3.8))
    up: dict[int, dict[int, int]] = {}
    down: dict[int, dict[int, int]] = {}
    for c in data.clients:
        up.setdefault(c.node_id, {}).setdefault(c.round_number, 0)
        down.setdefault(c.node_id, {}).setdefault(c.round_number, 0)
        up[c.node_id][c.round_number] += c.bytes_up
        down[c.node_id][c.round_number] += c.bytes_down
    colours = plt.get_cmap("tab10")
    for node, label in data.node_labels.items():
        colour = colours((label - 1) % 10)
        rounds = sorted(up[node])
        ax.plot(rounds, [up[node][n] / 1024 for n in rounds], "o-", color=colour, label=f"node {label} up")
        ax.plot(rounds, [down[node][n] / 1024 for n in rounds], "x--", color=colour, alpha=0.6,
                label=f"node {label} down")
    ax.set(title="bytes per node per round", xlabel="round", ylabel="KiB")
    ax.set_xticks(data.round_numbers)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def node_parts(data: RunData) -> dict[int, dict[int, str]]:
    """node -> round -> its part (one of ``PARTS``): the worst of its records in that round."""
    parts: dict[int, dict[int, str]] = {}
    for c in data.clients:
        if c.status in ("failed", "rejected"):
            part = c.status
        else:
            part = "trained" if c.phase.startswith("train") else "evaluated only"
        current = parts.setdefault(c.node_id, {}).get(c.round_number, PARTS[-1])
        parts[c.node_id][c.round_number] = min(part, current, key=PARTS.index)
    return parts


def plot_participation(data: RunData, path: Path) -> Path:
    """A node x round grid: trained, evaluated only, rejected, failed, or not in the round."""
    labels = data.node_labels
    parts = node_parts(data)
    rounds = data.round_numbers or [0]
    grid = [[PARTS.index(parts.get(node, {}).get(n, PARTS[-1])) for n in rounds] for node in labels]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(rounds) + 3), max(2.5, 0.35 * len(labels) + 1.5)))
    ax.imshow(grid or [[len(PARTS) - 1]], cmap=ListedColormap(PART_COLOURS), vmin=0, vmax=len(PARTS) - 1,
              aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(rounds)), [str(n) for n in rounds])
    ax.set_yticks(range(len(labels)), [f"node {label}" for label in labels.values()])
    ax.set(title="each node's part per round", xlabel="round")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in PART_COLOURS]
    ax.legend(handles, PARTS, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def outcome_counts(data: RunData) -> dict[str, list[int]]:
    """status -> per round (in ``round_numbers`` order), how many node records had it (all exchanges)."""
    counts = {status: [0] * len(data.rounds) for status in ("accepted", "rejected", "failed")}
    index = {n: i for i, n in enumerate(data.round_numbers)}
    for c in data.clients:
        if c.status in counts and c.round_number in index:
            counts[c.status][index[c.round_number]] += 1
    return counts


def plot_outcomes(data: RunData, path: Path) -> Path:
    """Stacked bars per round: node records accepted, rejected and failed (every exchange of the round)."""
    counts = outcome_counts(data)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = [0] * len(data.rounds)
    for status, colour in zip(("accepted", "rejected", "failed"), ("#2ca02c", PART_COLOURS[1], PART_COLOURS[0])):
        ax.bar(data.round_numbers, counts[status], bottom=bottom, color=colour, label=status)
        bottom = [b + v for b, v in zip(bottom, counts[status])]
    ax.set(title="node replies per round: accepted, rejected, failed", xlabel="round", ylabel="replies")
    ax.set_xticks(data.round_numbers)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_epsilon(data: RunData, path: Path) -> Path:
    """Cumulative epsilon per round, per node (sample, local DP) or the run's (central DP), against the target."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = data.node_labels
    series: dict[str, list[tuple[int, float]]] = {}
    for number, e in data.ledger:
        if e.status == "spent":
            who = "server (the run)" if e.node_id is None else f"node {labels.get(e.node_id, e.node_id)}"
            series.setdefault(who, []).append((number, e.epsilon))
    for who, points in sorted(series.items()):
        ax.plot([n for n, _ in points], [eps for _, eps in points], "o-", label=who)
    target = _number(data.run.config, "privacy.target-epsilon")
    if target is not None:
        ax.axhline(target, color="black", ls=":", label=f"target epsilon {target:g}")
    delta = _number(data.run.config, "privacy.delta")
    ax.set_ylim(bottom=0)
    ax.set(title=f"epsilon spent ({data.run.config.get('privacy.mode')}, delta {delta:g})" if delta is not None
           else "epsilon spent", xlabel="round", ylabel="epsilon")
    ax.set_xticks(data.round_numbers)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def _number(config: Mapping[str, object], key: str) -> float | None:
    value = config.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _title(data: RunData) -> str:
    run = data.run
    return f"run {run.id}: {run.strategy} on {run.model} ({run.status})"


def draw_all(data: RunData, out: Path) -> dict[str, Path]:
    """Every plot of the run into ``out``: name -> PNG path (``epsilon`` only for a run under DP)."""
    plots = {"loss-accuracy": plot_loss_accuracy, "bytes": plot_bytes, "participation": plot_participation,
             "outcomes": plot_outcomes}
    drawn = {name: draw(data, out / f"{name}.png") for name, draw in plots.items()}
    if data.run.config.get("privacy.mode", "off") != "off":
        drawn["epsilon"] = plot_epsilon(data, out / "epsilon.png")
    return drawn
