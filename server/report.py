"""Views of the round store for people and scripts: run tables (rich) and JSON."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from pollinate.server.store import RoundStore, GlobalTestMetrics


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def rounds_table(store: RoundStore, run_id: int) -> Table:
    """Round 0 (before training) and every stored round: losses, metric, participation, bytes, time; and the
    global test set's measures (a simulation's held-out slice) when the run has them."""
    run = store.run(run_id)
    rounds = store.rounds(run_id)
    causal = run.config.get("model.task") == "causal-lm"
    test_cols = (("test loss", "test perplexity") if causal else ("test accuracy", "test macro-F1")) \
        if any(r.test for r in rounds) else ()
    table = Table(title=f"run {run_id}: {run.strategy} on {run.model} ({run.status})")
    for col in ("round", "train loss", "eval loss", "accuracy", *test_cols, "accepted", "KiB up/client",
                "KiB down/client", "s"):
        table.add_column(col, justify="right")
    init = run.initial_metrics
    table.add_row("0", "-", _fmt(init.get("eval-loss")), _fmt(init.get("eval-accuracy")), *("-" for _ in test_cols),
                  "-", "-", "-", "-")
    for r in rounds:
        number = str(r.number) if r.status == "completed" else f"{r.number} [red]failed[/]"
        tests = _test_cells(r.test, causal) if test_cols else ()
        table.add_row(number, _fmt(r.train_loss), _fmt(r.eval_loss), _fmt(r.eval_accuracy), *tests,
                      f"{r.accepted}/{r.participants}", _fmt(r.bytes_up / max(1, r.accepted) / 1024, ".1f"),
                      _fmt(r.bytes_down / max(1, r.participants) / 1024, ".1f"), _fmt(r.duration_s, ".1f"))
    return table


def _test_cells(test: GlobalTestMetrics | None, causal: bool) -> tuple[str, str]:
    if test is None:
        return "-", "-"
    if causal:
        return _fmt(test.loss), _fmt(math.exp(min(test.loss, 700.0)) if test.loss is not None else None, ".2f")
    return _fmt(test.accuracy), _fmt(test.macro_f1)


def runs_table(store: RoundStore) -> Table:
    table = Table(title=f"runs in {store.url}")
    for col in ("run", "status", "strategy", "model", "rounds", "final accuracy", "started", "adapter / error"):
        table.add_column(col)
    for run in store.runs():
        rounds = store.rounds(run.id)
        last = next((r for r in reversed(rounds) if r.eval_accuracy is not None), None)  # not a budget stop
        table.add_row(str(run.id), run.status, run.strategy, run.model, str(len(rounds)),
                      _fmt(last.eval_accuracy if last else None), run.started_at.strftime("%Y-%m-%d %H:%M"),
                      run.error or run.adapter_dir or "")
    return table


def runs_json(store: RoundStore, run_id: int | None = None) -> list[dict[str, Any]]:
    """Every run (or only ``run_id``) with its rounds; with ``run_id``, each round's node records and reasons too."""
    out = []
    for run in store.runs():
        if run_id is not None and run.id != run_id:
            continue
        clients = _clients_by_round(store, run.id) if run_id is not None else None
        out.append({
            "id": run.id, "status": run.status, "strategy": run.strategy, "model": run.model,
            "started_at": run.started_at.isoformat(), "ended_at": run.ended_at.isoformat() if run.ended_at else None,
            "error": run.error, "adapter_dir": run.adapter_dir, "initial_metrics": dict(run.initial_metrics),
            "flower_run_ids": [str(a.flower_run_id) for a in store.attempts(run.id)],  # u64: strings in JSON
            "rounds": [{"number": r.number, "participants": r.participants, "accepted": r.accepted,
                        "train_loss": r.train_loss, "eval_loss": r.eval_loss, "eval_accuracy": r.eval_accuracy,
                        "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "duration_s": r.duration_s,
                        "status": r.status, "reason": r.reason, "parent_sha256": r.parent_sha256,
                        **({"test": {"loss": r.test.loss, "accuracy": r.test.accuracy, "macro_f1": r.test.macro_f1}}
                           if r.test else {}),
                        **({"clients": clients.get(r.number, [])} if clients is not None else {})}
                       for r in store.rounds(run.id)],
        })
    return out


def _clients_by_round(store: RoundStore, run_id: int) -> dict[int, list[dict[str, Any]]]:
    """round -> what happened to every node in it: phase, status, the reason when not accepted, its numbers."""
    out: dict[int, list[dict[str, Any]]] = {}
    for c in store.client_updates(run_id):
        out.setdefault(c.round_number, []).append({
            "node_id": str(c.node_id), "phase": c.phase, "status": c.status, "reason": c.reason,  # u64: a string
            "num_examples": c.num_examples, "rank": c.rank, "bytes_up": c.bytes_up, "metrics": dict(c.metrics)})
    return out


GUARANTEES = {
    "sample": "example-level: each node's training examples, per node (DP-SGD)",
    "local": "node-level against the server: each node's whole upload (local DP)",
    "central": "client-level: any one node's whole contribution to the run (DP-FedAvg)",
}


def privacy_json(store: RoundStore, run_id: int) -> dict[str, Any]:
    """A run's privacy report: its guarantee, the epsilon spent (per node where nodes account) and the ledger."""
    run = store.run(run_id)
    mode = str(run.config.get("privacy.mode", "off"))
    ledger = store.privacy_ledger(run_id)
    spent = [e for _, e in ledger if e.status == "spent"]
    per_node: dict[str, float] = {}
    for e in spent:
        who = "server" if e.node_id is None else str(e.node_id)
        per_node[who] = max(per_node.get(who, 0.0), e.epsilon)
    rounds = store.rounds(run_id)
    stopped = any((r.metrics or {}).get("privacy-budget-spent") for r in rounds) or (
        mode == "central" and run.status == "completed" and len(rounds) < int(run.config.get("federation.rounds", 0)))
    return {
        "run": run_id, "status": run.status, "strategy": run.strategy, "mode": mode,
        "guarantee": GUARANTEES.get(mode, "none: privacy.mode = 'off'"),
        "target_epsilon": run.config.get("privacy.target-epsilon"), "delta": run.config.get("privacy.delta"),
        "epsilon": max(per_node.values(), default=0.0), "epsilon_by_node": per_node,
        "stopped_by_budget": bool(stopped), "rounds_recorded": len(rounds),
        "ledger": [{"round": n, "node": e.node_id, "mechanism": e.mechanism, "status": e.status,
                    "noise_multiplier": e.noise_multiplier, "clip_norm": e.clip_norm, "sample_rate": e.sample_rate,
                    "steps": e.steps, "epsilon": e.epsilon, "delta": e.delta, "reason": e.reason,
                    "metrics": dict(e.metrics)} for n, e in ledger],
    }


def privacy_table(store: RoundStore, run_id: int) -> Table:
    """The privacy report for people: one line per ledger row, the guarantee in the title and caption."""
    report = privacy_json(store, run_id)
    table = Table(title=f"run {run_id} privacy: {report['mode']} ({report['guarantee']})",
                  caption=f"epsilon {report['epsilon']:.4g} of {report['target_epsilon']} spent at delta "
                          f"{report['delta']}" + ("; the run stopped at its budget" if report["stopped_by_budget"]
                                                  else ""))
    for col in ("round", "node", "mechanism", "status", "z", "C", "q", "steps", "epsilon", "note"):
        table.add_column(col, justify="left" if col in ("mechanism", "status", "note") else "right")
    for row in report["ledger"]:
        note = row["reason"] or ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items()
                                          if k in ("unclipped-fraction", "next-clip-norm"))
        table.add_row(str(row["round"]), "server" if row["node"] is None else str(row["node"]), row["mechanism"],
                      row["status"], _fmt(row["noise_multiplier"]), _fmt(row["clip_norm"]), _fmt(row["sample_rate"]),
                      str(row["steps"]), _fmt(row["epsilon"]), note)
    return table
