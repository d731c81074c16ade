"""The ServerApp: the coordinator's round loop, the same in simulation and deployment.

Per round: wait for nodes (bounded), sample, let the strategy run its exchanges through
``GridExchange``, evaluate the new global adapter on the nodes, and store the round in
one transaction. At the end the global adapter is exported in PEFT's format.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

import strategies
from models import adapter_state, build_peft_model, export_adapter
from proto.run_config import ConfigError, RunConfig
from server.privacy_rounds import BudgetSpent, RunPrivacy, check_privacy_config, is_refusal
from server.rounds import (Evaluation, RoundExchange, RoundFailed, RoundLedger, evaluate_global, mean_metric,
                           query_capacities, sample_nodes, wait_for_nodes)
from server.secure import SecureAggregation
from server.store import ClientRecord, RoundRecord, RoundStore
from strategies.base import lora_rank

app = ServerApp()
console = Console(highlight=False, width=max(120, Console().width))


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_flat(context.run_config))


def run_federation(grid: Grid, cfg: RunConfig) -> int:
    """Run every round of ``cfg`` over ``grid``; returns the run id in the round store."""
    strategy = strategies.build(cfg)
    store = RoundStore(cfg.store.db)
    model, _ = build_peft_model(cfg)
    state = adapter_state(model)
    capacities: dict[int, int] = {}
    check_privacy_config(cfg, strategy)
    run_id = store.start_run(cfg.to_flat(), strategy.name, cfg.model.name)
    console.print(f"[bold]pollinate[/] run {run_id}: {strategy.name} on {cfg.model.name} + {cfg.adapter.method} "
                  f"(r={cfg.adapter.r}), {cfg.federation.rounds} rounds, store {store.url}")
    privacy = RunPrivacy.open(cfg, store, run_id)
    try:
        nodes = wait_for_nodes(grid, cfg.federation.min_nodes, cfg.federation.wait_for_nodes)
        initial = evaluate_global(grid, cfg, nodes, strategy.evaluation_request(state), 0, RoundLedger())
        if initial is not None:
            store.set_initial_metrics(run_id, {"eval-loss": initial.loss, "eval-accuracy": initial.accuracy})
            console.print(f"round 0: eval loss {initial.loss:.4f}, accuracy {initial.accuracy:.4f}")
        for number in range(1, cfg.federation.rounds + 1):
            try:
                state = _run_round(grid, cfg, strategy, store, run_id, number, state, capacities, privacy)
            except BudgetSpent as e:
                console.print(f"[yellow]privacy budget spent: {e}; the run ends with the adapter of round "
                              f"{number - 1}[/]")
                break
        final = strategy.export(state)
        rank = lora_rank(final) or cfg.adapter.r
        if rank != cfg.adapter.r:  # base deltas folded into the LoRA (flora, fedex-lora)
            model, _ = build_peft_model(cfg.replace(**{"adapter.r": rank}))
        adapter_dir = export_adapter(model, final, Path(cfg.store.output_dir) / f"run-{run_id}" / "adapter")
        store.finish_run(run_id, "completed", adapter_dir=str(adapter_dir.resolve()))
        console.print(f"run {run_id} completed; adapter exported to {adapter_dir}")
    except BaseException as e:
        store.finish_run(run_id, "failed", error=f"{type(e).__name__}: {e}")
        raise
    return run_id


def _assign_ranks(grid: Grid, cfg: RunConfig, strategy: strategies.Strategy, nodes: list[int], number: int,
                  capacities: dict[int, int], ledger: RoundLedger) -> dict[int, int]:
    """node -> the LoRA rank it trains this round; asks new nodes their max-rank first."""
    unknown = [n for n in nodes if n not in capacities]
    if unknown:
        capacities.update(query_capacities(grid, cfg, unknown, number, ledger))
    ranks = {}
    for node in nodes:
        if node not in capacities:
            continue  # did not answer the query: recorded as failed in the ledger
        try:
            ranks[node] = strategy.assign_rank(node, capacities[node])
        except ConfigError as e:
            ledger.clients.append(ClientRecord(node_id=node, phase="train", status="rejected", reason=str(e)))
    return ranks


def _run_round(grid: Grid, cfg: RunConfig, strategy: strategies.Strategy, store: RoundStore, run_id: int,
               number: int, state: strategies.NamedArrays, capacities: dict[int, int],
               privacy: RunPrivacy) -> strategies.NamedArrays:
    started = time.monotonic()
    ledger = RoundLedger()
    connected = wait_for_nodes(grid, cfg.federation.min_nodes, cfg.federation.wait_for_nodes)
    sampled = sample_nodes(connected, cfg, number)
    if privacy.central is not None:  # the run's own budget: stop before a round that would exceed it
        privacy.central.start_round(number, len(sampled), len(connected))
    ranks = _assign_ranks(grid, cfg, strategy, sampled, number, capacities, ledger)
    secure = SecureAggregation(grid, cfg, number, ledger) if cfg.secagg.enabled else None
    exchange = RoundExchange(grid, cfg, number, ledger, check_update=strategy.check_update, secure=secure,
                             private=privacy.central, privacy_run_key=privacy.run_key)
    try:
        state = strategy.run_round(state, ranks, exchange, number)
    except RoundFailed:
        if not any(is_refusal(c) for c in ledger.clients):
            raise
        # Too few nodes may still train within their budgets: record the refusals, end the run cleanly.
        record = RoundRecord(number=number, participants=len(sampled), accepted=0, train_loss=None, eval_loss=None,
                             eval_accuracy=None, bytes_up=ledger.bytes("up"), bytes_down=ledger.bytes("down"),
                             duration_s=time.monotonic() - started, clients=ledger.clients,
                             metrics={"privacy-budget-spent": 1.0}, privacy=privacy.entries(ledger.clients))
        store.record_round(run_id, record, strategy.export(state))
        _print_round(cfg, record, None, ledger)
        raise BudgetSpent(f"in round {number} too few nodes could train within their privacy.target-epsilon "
                          f"= {cfg.privacy.target_epsilon:g}") from None
    global_adapter = strategy.export(state)
    evaluation = evaluate_global(grid, cfg, connected, strategy.evaluation_request(state), number, ledger)
    record = RoundRecord(
        number=number, participants=len(sampled), accepted=len(exchange.reports),
        train_loss=mean_metric(exchange.reports, "train-loss"),
        eval_loss=evaluation.loss if evaluation else None,
        eval_accuracy=evaluation.accuracy if evaluation else None,
        bytes_up=ledger.bytes("up"), bytes_down=ledger.bytes("down"),
        duration_s=time.monotonic() - started, clients=ledger.clients, privacy=privacy.entries(ledger.clients))
    store.record_round(run_id, record, global_adapter)
    _print_round(cfg, record, evaluation, ledger)
    if secure is not None and secure.clipped:
        console.print(f"  [yellow]secure aggregation clipped {secure.clipped} weighted value(s) to "
                      f"+-{cfg.secagg.clip_range}; raise secagg.clip-range[/]")
    return state


def _print_round(cfg: RunConfig, record: RoundRecord, evaluation: Evaluation | None, ledger: RoundLedger) -> None:
    per_client = record.bytes_up / max(1, record.accepted) / 1024
    line = (f"round {record.number}/{cfg.federation.rounds}: {record.accepted}/{record.participants} updates "
            f"accepted, train loss {record.train_loss or float('nan'):.4f}")
    if evaluation is not None:
        line += f", eval loss {evaluation.loss:.4f}, accuracy {evaluation.accuracy:.4f}"
    console.print(line + f", {per_client:.1f} KiB up per client, {record.duration_s:.1f} s")
    for c in ledger.failures():
        console.print(f"  [yellow]node {c.node_id} {c.phase} {c.status}[/]: {c.reason}")
    spent = [e for e in record.privacy if e.status == "spent"]
    if spent:
        worst = max(spent, key=lambda e: e.epsilon)
        console.print(f"  privacy: {worst.mechanism}, epsilon {worst.epsilon:.4g} of {cfg.privacy.target_epsilon:g} "
                      f"spent (delta {worst.delta:g}" + (", the most of any node)" if worst.node_id is not None
                                                         else ", the run's)"))
