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
from rich.markup import escape

from pollinate import strategies
from pollinate.models import adapter_state, build_peft_model, export_adapter
from pollinate.proto.run_config import ConfigError, FederationConfig, RunConfig
from pollinate.server.privacy_rounds import (BudgetSpent, RunPrivacy, check_privacy_config, is_refusal,
                                             private_federation, released)
from pollinate.server.rounds import (Declaration, Evaluation, RoundExchange, RoundFailed, RoundLedger, evaluate_global,
                           mean_metric, query_capacities, sample_nodes, wait_for_nodes)
from pollinate.server.crash_points import AFTER_AGGREGATION, AFTER_COMMIT, crash_point
from pollinate.server.lease import RunLease, holder_id
from pollinate.server.secure import SecureAggregation
from pollinate.server.resume import RunStart, round_state, start_or_resume
from pollinate.server.round_events import RoundEvent, emit, say
from pollinate.server.store import (ClientRecord, LeaseHeld, RoundRecord, RoundStore, StoreError, adapter_bytes,
                                    sha256)
from pollinate.strategies.base import AggregationError, lora_rank

app = ServerApp()
# The phase of the round-0 (initial) evaluation's records: that exchange has no round of its own, so its records,
# rejections with their reasons included, are stored with the first round the run stores.
INITIAL_EVALUATION = "evaluate-round-0"


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_flat(context.run_config), flower_run_id=context.run_id)


def run_federation(grid: Grid, cfg: RunConfig, flower_run_id: int = 0, lease_ttl_s: float | None = None) -> int:
    """Run (or, with ``store.resume-run``, resume) every round of ``cfg`` over ``grid``; returns the run id.

    Refused (``LeaseHeld``) when another live coordinator holds the run. A round that cannot be stored ends
    the run ``interrupted`` (``StoreError``, one line): nothing of it reached a node, and a resume reruns it.
    """
    strategy = strategies.build(cfg)
    store = RoundStore(cfg.store.db)
    model, _ = build_peft_model(cfg)
    check_privacy_config(cfg, strategy)
    holder = holder_id()
    lease_ttl_s = cfg.store.lease_ttl if lease_ttl_s is None else lease_ttl_s
    start = start_or_resume(store, cfg, strategy, adapter_state(model), flower_run_id, holder, lease_ttl_s)
    run_id, state = start.run_id, start.state
    lease = RunLease(store, run_id, holder, lease_ttl_s, lease_ttl_s / 4).start()
    try:
        return _run_rounds(grid, cfg, strategy, store, start, state, model, lease)
    finally:
        lease.release()


def _run_rounds(grid: Grid, cfg: RunConfig, strategy: strategies.Strategy, store: RoundStore, start: RunStart,
                state: strategies.NamedArrays, model: PeftModel, lease: RunLease) -> int:
    run_id = start.run_id
    capacities: dict[int, Declaration] = {}  # what each node declared when first asked (the query exchange)
    resumed = f" resumed at round {start.first_round}" if start.resumed else ""
    say(f"[bold]pollinate[/] run {run_id}{resumed}: {strategy.name} on {cfg.model.name} + "
                  f"{cfg.adapter.method} (r={cfg.adapter.r}), {cfg.federation.rounds} rounds, store {store.url}")
    privacy = RunPrivacy.open(cfg.privacy, cfg.federation.rounds, store, run_id,  # rebuilt from the stored ledger
                              sample_rate=cfg.federation.fraction_train, freeze_head=cfg.train.freeze_head,
                              means_per_round=strategy.private_means)
    if private_federation(cfg) is not cfg.federation:
        say("central DP: federation.update-bound's median mode is off for this run (which nodes it rejects would "
            "depend on the other nodes' data); the clip norm bounds every node's update")
    try:
        try:
            nodes = wait_for_nodes(grid, cfg.federation.min_nodes, cfg.federation.wait_for_nodes)
        except RoundFailed:
            nodes = []  # no round 0 evaluation; round 1 waits again and, failing, is stored as a failed round
        initial_ledger = RoundLedger()  # round 0 has no round of its own: its records go with the first one stored
        if nodes and not start.resumed and cfg.privacy.mode == "off":  # under DP nodes release no eval metrics
            initial = evaluate_global(grid, cfg.federation, nodes, strategy.evaluation_request(state), 0,
                                      initial_ledger, len(cfg.data.label_words))
            if initial is not None:
                store.set_initial_metrics(run_id, {"eval-loss": initial.loss, "eval-accuracy": initial.accuracy,
                                                   **initial.metrics})
                say(f"round 0: eval loss {initial.loss:.4f}, accuracy {initial.accuracy:.4f}{_generation_line(initial)}")
        failures = start.consecutive_failures
        for number in range(start.first_round, cfg.federation.rounds + 1):
            emit(RoundEvent("round-start", round=number, rounds=cfg.federation.rounds))
            try:
                state = _run_round(grid, cfg, strategy, store, run_id, number, state, capacities, privacy, lease,
                                   carried=[replace(c, phase=INITIAL_EVALUATION) for c in initial_ledger.clients])
                initial_ledger.clients.clear()
                failures = 0
            except BudgetSpent as e:
                say(f"[yellow]privacy budget spent: {escape(str(e))}; the run ends with the adapter of "
                              f"the last completed round[/]")
                break
            except RoundFailed:
                failures += 1
                if cfg.federation.on_round_failure == "stop" or failures >= cfg.federation.max_consecutive_failures:
                    raise
                say(f"  [yellow]round {number} failed ({failures} in a row, the run stops at "
                              f"{cfg.federation.max_consecutive_failures}); the next round starts from the last "
                              f"completed round's adapter[/]")
        _finish(cfg, strategy, store, run_id, state, model, lease.holder)
    except LeaseHeld:
        raise  # another coordinator holds the run now: its status is that coordinator's to set
    except (KeyboardInterrupt, SystemExit) as e:
        _end(store, run_id, "interrupted", f"{type(e).__name__}: the coordinator was stopped; "
             f"`pollinate server --resume {run_id}` continues it", lease.holder)
        raise
    except StoreError as e:
        message = (f"run {run_id} stopped, interrupted: {e}. No node received anything not stored; "
                   f"`pollinate server --resume {run_id}` continues it once the store is back")
        _end(store, run_id, "interrupted", message, lease.holder)
        raise StoreError(message) from None
    except BaseException as e:
        _end(store, run_id, "failed", f"{type(e).__name__}: {e}", lease.holder)
        raise
    return run_id


def _end(store: RoundStore, run_id: int, status: str, error: str, holder: str) -> None:
    """Mark the run ended, if the store lets us: when it is down, the run stays ``running`` and its lease
    expires, which is just as resumable (``pollinate server --resume``)."""
    try:
        store.finish_run(run_id, status, error=error, holder=holder)
    except StoreError as e:
        say(f"[yellow]run {run_id} could not be marked {status} ({escape(str(e))}); it stays resumable[/]")


def _finish(cfg: RunConfig, strategy: strategies.Strategy, store: RoundStore, run_id: int,
            state: strategies.NamedArrays, model: PeftModel, holder: str) -> None:
    final = strategy.export(state)
    rank = lora_rank(final) or cfg.adapter.r
    if rank != cfg.adapter.r:  # base deltas folded into the LoRA (flora, fedex-lora)
        model, _ = build_peft_model(cfg.replace(**{"adapter.r": rank}))
    adapter_dir = export_adapter(model, final, Path(cfg.store.output_dir) / f"run-{run_id}" / "adapter")
    store.finish_run(run_id, "completed", adapter_dir=str(adapter_dir.resolve()), holder=holder)
    say(f"run {run_id} completed; adapter exported to {adapter_dir}")


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
               privacy: RunPrivacy, lease: RunLease, carried: Sequence[ClientRecord] = ()) -> strategies.NamedArrays:
    """One round, stored in one transaction: completed (with adapter, state and privacy ledger), or failed (with
    its reason). Persist, then release: the new adapter reaches the nodes (evaluation, the next round) only
    after its round and ledger are committed, so a coordinator that dies at any point never under-counts
    the privacy spent on what the nodes saw.

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
        progress.sampled = sample_nodes(connected, cfg.federation, cfg.seed, number,
                                        secret=privacy.central is not None)
        if privacy.central is not None:  # the run's own budget: stop before a round that would exceed it
            privacy.central.start_round(number, len(connected))
        ranks = _assign_ranks(grid, cfg.federation, strategy, progress.sampled, number, capacities, ledger)
        declared = {node: capacities[node].num_examples for node in ranks}
        secure = (SecureAggregation(grid, cfg.secagg, cfg.federation, number, ledger, seed=cfg.seed,
                                    declared=declared) if cfg.secagg.enabled else None)
        exchange = RoundExchange(grid, private_federation(cfg), number, ledger, check_update=strategy.check_update,
                                 secure=secure, private=privacy.central, privacy_run_key=privacy.run_key,
                                 declared=declared, scaling=strategy.ctx.scaling)
        new_state = strategy.run_round(state, ranks, exchange, number)
    except (RoundFailed, AggregationError) as e:
        strategy.load_state_arrays(before)
        refused = any(is_refusal(c) for c in ledger.clients)
        reason = (f"too few nodes could train within their privacy.target-epsilon = {cfg.privacy.target_epsilon:g}"
                  if refused else _with_first_node_error(str(e), ledger))
        record = RoundRecord(
            number=number, participants=len(progress.sampled), accepted=progress.accepted, train_loss=None,
            eval_loss=None, eval_accuracy=None, bytes_up=ledger.bytes("up"), bytes_down=ledger.bytes("down"),
            duration_s=time.monotonic() - started, clients=released(cfg.privacy, ledger.clients), status="failed",
            reason=reason,
            parent_sha256=parent, metrics={"privacy-budget-spent": 1.0} if refused else {},
            privacy=privacy.entries(ledger.clients))
        store.record_round(run_id, record, None, holder=lease.holder, lease_ttl_s=lease.ttl_s)
        _print_round(cfg, record, None, ledger)
        if refused:  # the nodes' budgets, not a fault: the run ends cleanly with the last completed adapter
            raise BudgetSpent(f"in round {number} {reason}") from None
        raise RoundFailed(reason) from e
    crash_point(AFTER_AGGREGATION)
    record = RoundRecord(
        number=number, participants=len(progress.sampled), accepted=len(exchange.reports),
        train_loss=mean_metric(exchange.reports, "train-loss"), eval_loss=None, eval_accuracy=None,
        bytes_up=ledger.bytes("up"), bytes_down=ledger.bytes("down"),
        duration_s=time.monotonic() - started, clients=released(cfg.privacy, ledger.clients), parent_sha256=parent,
        privacy=privacy.entries(ledger.clients))
    store.record_round(run_id, record, strategy.export(new_state), round_state(new_state, strategy),
                       holder=lease.holder, lease_ttl_s=lease.ttl_s)
    crash_point(AFTER_COMMIT)
    # Released only now: the round and its ledger are stored. Without DP the nodes evaluate the new adapter
    # and the evaluation is added to the stored round; under DP they release no metrics (the next round's
    # training exchange is the first release of this adapter).
    evaluated, evaluation = RoundLedger(), None
    if cfg.privacy.mode == "off":
        evaluation = evaluate_global(grid, cfg.federation, connected, strategy.evaluation_request(new_state), number,
                                     evaluated, len(cfg.data.label_words))
        store.record_evaluation(run_id, number, evaluation.loss if evaluation else None,
                                evaluation.accuracy if evaluation else None, evaluated.clients, holder=lease.holder,
                                lease_ttl_s=lease.ttl_s, metrics=evaluation.metrics if evaluation else None)
    ledger.clients.extend(evaluated.clients)
    _print_round(cfg, replace(record, bytes_up=ledger.bytes("up"), bytes_down=ledger.bytes("down")), evaluation,
                 ledger)
    if secure is not None and secure.clipped:
        say(f"  [yellow]secure aggregation clipped {secure.clipped} weighted value(s) to "
                      f"+-{cfg.secagg.clip_range}; raise secagg.clip-range[/]")
    return new_state


def _with_first_node_error(reason: str, ledger: RoundLedger) -> str:
    """A failed round's reason with the first node error behind it (e.g. a node's bad data file, one line), so the
    run's stored error says what to fix, not only that too few updates came back."""
    errors = [c for c in ledger.failures() if c.status == "failed" and (c.reason or "").startswith("client error")]
    return f"{reason}; node {errors[0].node_id}: {errors[0].reason}" if errors else reason


def _generation_line(evaluation: Evaluation) -> str:
    """A causal LM's generation scores for the console (accuracy above is already the generated one)."""
    shown = [(k, evaluation.metrics[k]) for k in ("gen-exact-match", "gen-macro-f1", "perplexity")
             if k in evaluation.metrics]
    return "".join(f", {k.removeprefix('gen-').replace('-', ' ')} {v:.4f}" for k, v in shown)


def _print_round(cfg: RunConfig, record: RoundRecord, evaluation: Evaluation | None, ledger: RoundLedger) -> None:
    emit(RoundEvent("round-end", round=record.number, rounds=cfg.federation.rounds, seconds=record.duration_s))
    per_client = record.bytes_up / max(1, record.accepted) / 1024
    if record.status == "failed":
        say(f"[red]round {record.number}/{cfg.federation.rounds} failed[/]: {escape(record.reason or '')}")
        for c in ledger.failures():
            say(f"  [yellow]node {c.node_id} {c.phase} {c.status}[/]: {escape(c.reason or '')}")
        return
    line = (f"round {record.number}/{cfg.federation.rounds}: {record.accepted}/{record.participants} updates "
            f"accepted, train loss {record.train_loss or float('nan'):.4f}")
    if evaluation is not None:
        line += f", eval loss {evaluation.loss:.4f}, accuracy {evaluation.accuracy:.4f}{_generation_line(evaluation)}"
    say(line + f", {per_client:.1f} KiB up per client, {record.duration_s:.1f} s")
    for c in ledger.failures():
        say(f"  [yellow]node {c.node_id} {c.phase} {c.status}[/]: {escape(c.reason or '')}")
    spent = [e for e in record.privacy if e.status == "spent"]
    if spent:
        worst = max(spent, key=lambda e: e.epsilon)
        say(f"  privacy: {worst.mechanism}, epsilon {worst.epsilon:.4g} of {cfg.privacy.target_epsilon:g} "
                      f"spent (delta {worst.delta:g}" + (", the most of any node)" if worst.node_id is not None
                                                         else ", the run's)"))
