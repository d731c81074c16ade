"""The ServerApp: the coordinator's round loop, the same in simulation and deployment.

Per round: wait for nodes (bounded), sample, let the strategy run its exchanges through
``GridExchange``, evaluate the new global adapter on the nodes, and store the round in
one transaction (with the full state a resumed coordinator needs, ``server.resume``). A round
that fails (too few nodes or accepted updates, secure aggregation unable to unmask) is stored
as failed with its reason and ledger; ``federation.on-round-failure`` decides whether the run
stops or the next round starts from the last completed state. At the end the global adapter is
exported in PEFT's format.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel
from rich.console import Console
from rich.markup import escape

from pollinate import strategies
from pollinate.models import adapter_state, build_peft_model, export_adapter
from pollinate.proto.run_config import ConfigError, FederationConfig, RunConfig
from pollinate.server.privacy_rounds import BudgetSpent, RunPrivacy, check_privacy_config, is_refusal
from pollinate.server.rounds import (Declaration, Evaluation, RoundExchange, RoundFailed, RoundLedger, evaluate_global,
                           mean_metric, query_capacities, sample_nodes, wait_for_nodes)
from pollinate.server.secure import SecureAggregation
from pollinate.server.resume import round_state, start_or_resume
from pollinate.server.store import ClientRecord, RoundRecord, RoundStore, adapter_bytes, sha256
from pollinate.strategies.base import AggregationError, lora_rank

app = ServerApp()
# The phase of the round-0 (initial) evaluation's records: that exchange has no round of its own, so its records,
# rejections with their reasons included, are stored with the first round the run stores.
INITIAL_EVALUATION = "evaluate-round-0"
console = Console(highlight=False, width=max(120, Console().width))


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_flat(context.run_config), flower_run_id=context.run_id)


def run_federation(grid: Grid, cfg: RunConfig, flower_run_id: int = 0) -> int:
    """Run (or, with ``store.resume-run``, resume) every round of ``cfg`` over ``grid``; returns the run id."""
    strategy = strategies.build(cfg)
    store = RoundStore(cfg.store.db)
    model, _ = build_peft_model(cfg)
    check_privacy_config(cfg, strategy)
    start = start_or_resume(store, cfg, strategy, adapter_state(model), flower_run_id)
    run_id, state = start.run_id, start.state
    capacities: dict[int, Declaration] = {}  # what each node declared when first asked (the query exchange)
    resumed = f" resumed at round {start.first_round}" if start.resumed else ""
    console.print(f"[bold]pollinate[/] run {run_id}{resumed}: {strategy.name} on {cfg.model.name} + "
                  f"{cfg.adapter.method} (r={cfg.adapter.r}), {cfg.federation.rounds} rounds, store {store.url}")
    privacy = RunPrivacy.open(cfg.privacy, cfg.federation.rounds, store, run_id)  # rebuilt from the stored ledger on a resume
    try:
        try:
            nodes = wait_for_nodes(grid, cfg.federation.min_nodes, cfg.federation.wait_for_nodes)
        except RoundFailed:
            nodes = []  # no round 0 evaluation; round 1 waits again and, failing, is stored as a failed round
        initial_ledger = RoundLedger()  # round 0 has no round of its own: its records go with the first one stored
        if nodes and not start.resumed:
            initial = evaluate_global(grid, cfg.federation, nodes, strategy.evaluation_request(state), 0,
                                      initial_ledger)
            if initial is not None:
                store.set_initial_metrics(run_id, {"eval-loss": initial.loss, "eval-accuracy": initial.accuracy})
                console.print(f"round 0: eval loss {initial.loss:.4f}, accuracy {initial.accuracy:.4f}")
        failures = start.consecutive_failures
        for number in range(start.first_round, cfg.federation.rounds + 1):
            try:
                state = _run_round(grid, cfg, strategy, store, run_id, number, state, capacities, privacy,
                                   carried=[replace(c, phase=INITIAL_EVALUATION) for c in initial_ledger.clients])
                initial_ledger.clients.clear()
                failures = 0
            except BudgetSpent as e:
                console.print(f"[yellow]privacy budget spent: {escape(str(e))}; the run ends with the adapter of "
                              f"the last completed round[/]")
                break
            except RoundFailed:
                failures += 1
                if cfg.federation.on_round_failure == "stop" or failures >= cfg.federation.max_consecutive_failures:
                    raise
                console.print(f"  [yellow]round {number} failed ({failures} in a row, the run stops at "
                              f"{cfg.federation.max_consecutive_failures}); the next round starts from the last "
                              f"completed round's adapter[/]")
        _finish(cfg, strategy, store, run_id, state, model)
    except (KeyboardInterrupt, SystemExit) as e:
        store.finish_run(run_id, "interrupted", error=f"{type(e).__name__}: the coordinator was stopped; "
                         f"`pollinate server --resume {run_id}` continues it")
        raise
    except BaseException as e:
        store.finish_run(run_id, "failed", error=f"{type(e).__name__}: {e}")
        raise
    return run_id


def _finish(cfg: RunConfig, strategy: strategies.Strategy, store: RoundStore, run_id: int,
            state: strategies.NamedArrays, model: PeftModel) -> None:
    final = strategy.export(state)
    rank = lora_rank(final) or cfg.adapter.r
    if rank != cfg.adapter.r:  # base deltas folded into the LoRA (flora, fedex-lora)
        model, _ = build_peft_model(cfg.replace(**{"adapter.r": rank}))
    adapter_dir = export_adapter(model, final, Path(cfg.store.output_dir) / f"run-{run_id}" / "adapter")
    store.finish_run(run_id, "completed", adapter_dir=str(adapter_dir.resolve()))
    console.print(f"run {run_id} completed; adapter exported to {adapter_dir}")


def _assign_ranks(grid: Grid, federation: FederationConfig, strategy: strategies.Strategy, nodes: list[int], number: int,
                  capacities: dict[int, Declaration], ledger: RoundLedger) -> dict[int, int]:
    """node -> the LoRA rank it trains this round; asks new nodes their max-rank and examples first."""
    unknown = [n for n in nodes if n not in capacities]
    if unknown:
        capacities.update(query_capacities(grid, federation, unknown, number, ledger))
    ranks = {}
    for node in nodes:
        if node not in capacities:
            continue  # did not answer the query: recorded as failed in the ledger
        try:
            ranks[node] = strategy.assign_rank(node, capacities[node].max_rank)
        except ConfigError as e:
            ledger.clients.append(ClientRecord(node_id=node, phase="train", status="rejected", reason=str(e)))
    return ranks


@dataclass
class _RoundProgress:
    """What a round got to before it failed, for its failed-round record."""

    sampled: list[int] = field(default_factory=list)

    ledger: RoundLedger = field(default_factory=RoundLedger)

    @property
    def accepted(self) -> int:
        """Training updates accepted before the round failed."""
        return sum(1 for c in self.ledger.clients if c.phase == "train" and c.status == "accepted")


def _run_round(grid: Grid, cfg: RunConfig, strategy: strategies.Strategy, store: RoundStore, run_id: int,
               number: int, state: strategies.NamedArrays, capacities: dict[int, Declaration],
               privacy: RunPrivacy, carried: Sequence[ClientRecord] = ()) -> strategies.NamedArrays:
    """One round, stored in one transaction: completed (with adapter and state), or failed (with its reason).

    ``carried``: records of exchanges before this round that have no round of their own (the round-0 evaluation),
    stored in this round's ledger so that a node rejected there is recorded with its reason like any other.
    """
    started = time.monotonic()
    progress = _RoundProgress()
    ledger = progress.ledger
    ledger.clients.extend(carried)
    parent = sha256(adapter_bytes(strategy.export(state)))
    before = strategy.state_arrays()  # a failed round must leave the strategy as it found it
    try:
        connected = wait_for_nodes(grid, cfg.federation.min_nodes, cfg.federation.wait_for_nodes)
        progress.sampled = sample_nodes(connected, cfg.federation, cfg.seed, number)
        if privacy.central is not None:  # the run's own budget: stop before a round that would exceed it
            privacy.central.start_round(number, len(progress.sampled), len(connected))
        ranks = _assign_ranks(grid, cfg.federation, strategy, progress.sampled, number, capacities, ledger)
        declared = {node: capacities[node].num_examples for node in ranks}
        secure = (SecureAggregation(grid, cfg.secagg, cfg.federation, number, ledger, seed=cfg.seed,
                                    declared=declared) if cfg.secagg.enabled else None)
        exchange = RoundExchange(grid, cfg.federation, number, ledger, check_update=strategy.check_update,
                                 secure=secure, private=privacy.central, privacy_run_key=privacy.run_key,
                                 declared=declared, scaling=strategy.ctx.scaling)
        new_state = strategy.run_round(state, ranks, exchange, number)
    except (RoundFailed, AggregationError) as e:
        strategy.load_state_arrays(before)
        refused = any(is_refusal(c) for c in ledger.clients)
        reason = (f"too few nodes could train within their privacy.target-epsilon = {cfg.privacy.target_epsilon:g}"
                  if refused else str(e))
        record = RoundRecord(
            number=number, participants=len(progress.sampled), accepted=progress.accepted, train_loss=None,
            eval_loss=None, eval_accuracy=None, bytes_up=ledger.bytes("up"), bytes_down=ledger.bytes("down"),
            duration_s=time.monotonic() - started, clients=ledger.clients, status="failed", reason=reason,
            parent_sha256=parent, metrics={"privacy-budget-spent": 1.0} if refused else {},
            privacy=privacy.entries(ledger.clients))
        store.record_round(run_id, record, None)
        _print_round(cfg, record, None, ledger)
        if refused:  # the nodes' budgets, not a fault: the run ends cleanly with the last completed adapter
            raise BudgetSpent(f"in round {number} {reason}") from None
        raise RoundFailed(str(e)) from e
    evaluation = evaluate_global(grid, cfg.federation, connected, strategy.evaluation_request(new_state), number,
                                 ledger)
    record = RoundRecord(
        number=number, participants=len(progress.sampled), accepted=len(exchange.reports),
        train_loss=mean_metric(exchange.reports, "train-loss"),
        eval_loss=evaluation.loss if evaluation else None,
        eval_accuracy=evaluation.accuracy if evaluation else None,
        bytes_up=ledger.bytes("up"), bytes_down=ledger.bytes("down"),
        duration_s=time.monotonic() - started, clients=ledger.clients, parent_sha256=parent,
        privacy=privacy.entries(ledger.clients))
    store.record_round(run_id, record, strategy.export(new_state), round_state(new_state, strategy))
    _print_round(cfg, record, evaluation, ledger)
    if secure is not None and secure.clipped:
        console.print(f"  [yellow]secure aggregation clipped {secure.clipped} weighted value(s) to "
                      f"+-{cfg.secagg.clip_range}; raise secagg.clip-range[/]")
    return new_state


def _print_round(cfg: RunConfig, record: RoundRecord, evaluation: Evaluation | None, ledger: RoundLedger) -> None:
    per_client = record.bytes_up / max(1, record.accepted) / 1024
    if record.status == "failed":
        console.print(f"[red]round {record.number}/{cfg.federation.rounds} failed[/]: {escape(record.reason or '')}")
        for c in ledger.failures():
            console.print(f"  [yellow]node {c.node_id} {c.phase} {c.status}[/]: {escape(c.reason or '')}")
        return
    line = (f"round {record.number}/{cfg.federation.rounds}: {record.accepted}/{record.participants} updates "
            f"accepted, train loss {record.train_loss or float('nan'):.4f}")
    if evaluation is not None:
        line += f", eval loss {evaluation.loss:.4f}, accuracy {evaluation.accuracy:.4f}"
    console.print(line + f", {per_client:.1f} KiB up per client, {record.duration_s:.1f} s")
    for c in ledger.failures():
        console.print(f"  [yellow]node {c.node_id} {c.phase} {c.status}[/]: {escape(c.reason or '')}")
    spent = [e for e in record.privacy if e.status == "spent"]
    if spent:
        worst = max(spent, key=lambda e: e.epsilon)
        console.print(f"  privacy: {worst.mechanism}, epsilon {worst.epsilon:.4g} of {cfg.privacy.target_epsilon:g} "
                      f"spent (delta {worst.delta:g}" + (", the most of any node)" if worst.node_id is not None
                                                         else ", the run's)"))
