"""Views of the round store for people and scripts: run tables (rich) and JSON."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from server.store import RoundStore


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def rounds_table(store: RoundStore, run_id: int) -> Table:
    """Round 0 (before training) and every stored round: losses, metric, participation, bytes, time."""
    run = store.run(run_id)
    table = Table(title=f"run {run_id}: {run.strategy} on {run.model} ({run.status})")
    for col in ("round", "train loss", "eval loss", "accuracy", "accepted", "KiB up/client", "KiB down/client",
                "s"):
        table.add_column(col, justify="right")
    init = run.initial_metrics
    table.add_row("0", "-", _fmt(init.get("eval-loss")), _fmt(init.get("eval-accuracy")), "-", "-", "-", "-")
    for r in store.rounds(run_id):
        number = str(r.number) if r.status == "completed" else f"{r.number} [red]failed[/]"
        table.add_row(number, _fmt(r.train_loss), _fmt(r.eval_loss), _fmt(r.eval_accuracy),
                      f"{r.accepted}/{r.participants}", _fmt(r.bytes_up / max(1, r.accepted) / 1024, ".1f"),
                      _fmt(r.bytes_down / max(1, r.participants) / 1024, ".1f"), _fmt(r.duration_s, ".1f"))
    return table


def runs_table(store: RoundStore) -> Table:
    table = Table(title=f"runs in {store.url}")
    for col in ("run", "status", "strategy", "model", "rounds", "final accuracy", "started", "adapter / error"):
        table.add_column(col)
    for run in store.runs():
        rounds = store.rounds(run.id)
        last = rounds[-1] if rounds else None
        table.add_row(str(run.id), run.status, run.strategy, run.model, str(len(rounds)),
                      _fmt(last.eval_accuracy if last else None), run.started_at.strftime("%Y-%m-%d %H:%M"),
                      run.error or run.adapter_dir or "")
    return table


def runs_json(store: RoundStore) -> list[dict[str, Any]]:
    out = []
    for run in store.runs():
        out.append({
            "id": run.id, "status": run.status, "strategy": run.strategy, "model": run.model,
            "started_at": run.started_at.isoformat(), "ended_at": run.ended_at.isoformat() if run.ended_at else None,
            "error": run.error, "adapter_dir": run.adapter_dir, "initial_metrics": dict(run.initial_metrics),
            "flower_run_ids": [a.flower_run_id for a in store.attempts(run.id)],
            "rounds": [{"number": r.number, "participants": r.participants, "accepted": r.accepted,
                        "train_loss": r.train_loss, "eval_loss": r.eval_loss, "eval_accuracy": r.eval_accuracy,
                        "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "duration_s": r.duration_s,
                        "status": r.status, "reason": r.reason, "parent_sha256": r.parent_sha256}
                       for r in store.rounds(run.id)],
        })
    return out
