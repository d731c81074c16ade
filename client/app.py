"""The ClientApp: train the received adapter on local data and reply with adapter tensors only.

It names no strategy: the run's strategy (``federation.strategy``) owns its node-side steps, which the
ClientApp calls in one fixed order: prepare the received adapter -> train -> DP post-processing ->
the strategy's upload transform -> the reply guard. What a strategy keeps on the node between messages
lives in Flower's ``context.state`` (``read_node_state`` / ``keep_node_state``).

The same code runs on a hospital/edge node (Deployment Engine; ``data-path`` and ``max-rank``
in the node config) and in ``pollinate simulate`` (Simulation Engine; the node reads the
partition file, and the node settings file, the simulation wrote for its ``partition-id``):
both parsed once into a ``NodeConfig`` (``proto/node_config.py``).

Under DP (any ``privacy.mode``, or a node policy) no per-node number leaves the node unless the mechanism
covers it (``_withholds``): no example count (query, training), no training loss, no evaluation metrics
(evaluation is refused), only the DP release's own description for the ledger (docs/privacy.md).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterable

import torch
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel

from pollinate.client.data import batches, endless_batches
from pollinate.client import resident
from pollinate.client import secure
from pollinate.client.private_training import BudgetRefused, PrivateRound, plan_round, privatise_upload, train_sample_dp
from pollinate.client.generation import count, generate
from pollinate.client.train import evaluate, resolve_device, train
from pollinate.models import BaseModel, adapter_state, load_adapter_state, set_base_deltas
from pollinate.proto.adapter_record import (ADAPTER, INSTRUCTIONS, REPORT, from_record, refuse_outside, specs_of,
                                  to_record)
from pollinate.proto.instructions import Instructions
from pollinate.privacy.central import clip_delta, delta_of
from pollinate.privacy.budget import BudgetExceeded, BudgetFile
from pollinate.privacy.ledger import REFUSAL_CODE
from pollinate.proto.node_config import MAX_RANK, NodeConfig
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.proto.secagg_record import STAGE_ACTIONS
from pollinate import strategies
from pollinate.runtime.flower_logs import quiet_routine_flower_logs
from pollinate.strategies import NamedArrays, NodeState, Strategy
from pollinate.strategies.merged import split_deltas

NODE_STATE = "strategy-state/"  # context.state ArrayRecords under this prefix: the strategy's node state

app = ClientApp()
quiet_routine_flower_logs()  # a simulated node (a Ray actor) logs its own routine end as a WARNING otherwise


DATA_ERROR_CODE = 4_700  # Flower Error code of a node whose own data is unusable; the reason names file, row, fix


def refuses_bad_data(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A node whose data (or run config) it cannot use answers with that one line as an error reply, rather than
    raising: a raise would print a Ray (or SuperNode) traceback and send the coordinator the traceback text."""
    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except ConfigError as e:  # DataError too: the message names the file, row and fix
            return Message(Error(code=DATA_ERROR_CODE, reason=str(e)), reply_to=msg)
    return guarded


def node_config(context: Context, cfg: RunConfig) -> NodeConfig:
    """This node's config: Flower's node config, plus the simulation's per-node settings when simulated."""
    return NodeConfig.from_flower(context.node_config, cfg.data.partition_dir)


@functools.lru_cache(maxsize=2)
def _strategy(cfg: RunConfig) -> Strategy:
    # The node half of the run's strategy: its hooks read only the run config's context, never server state.
    return strategies.build(cfg)


def read_node_state(state: RecordDict) -> dict[str, NamedArrays]:
    """The strategy's node state, from Flower's context.state (one ArrayRecord per name)."""
    return {key.removeprefix(NODE_STATE): {k: v.numpy() for k, v in record.items()}
            for key, record in state.array_records.items() if key.startswith(NODE_STATE)}


def keep_node_state(state: RecordDict, node_state: NodeState) -> None:
    """Write the strategy's node state back into Flower's context.state; names it dropped are deleted."""
    for key in [k for k in state.array_records if k.startswith(NODE_STATE)]:
        if key.removeprefix(NODE_STATE) not in node_state:
            del state[key]
    for name, arrays in node_state.items():
        record = ArrayRecord()
        for k, v in arrays.items():
            record[k] = Array(np.ascontiguousarray(v))
        state[NODE_STATE + name] = record


def _instructions(msg: Message) -> Instructions:
    record = msg.content.config_records.get(INSTRUCTIONS)
    return Instructions.from_record_values(record) if record is not None else Instructions()


def _prepare(msg: Message, context: Context, cfg: RunConfig, instructions: Instructions, node: NodeConfig,
             node_state: NodeState, training: bool) -> tuple[PeftModel, BaseModel]:
    """The model at the instructed rank with the received adapter, as the strategy prepares it, loaded."""
    rank = instructions.rank or cfg.adapter.r
    if training and node.max_rank and rank > node.max_rank:
        raise ValueError(f"the server sent a rank-{rank} adapter, but this node's max-rank is {node.max_rank}")
    # The resident model: loaded once per run and config; everything below overwrites its whole adapter state.
    at_rank = cfg.replace(**{"adapter.r": rank}) if rank != cfg.adapter.r else cfg
    model, base = resident.model(context.run_id, at_rank)
    tensors, deltas = split_deltas(from_record(msg.content.array_records[ADAPTER]))
    expected, got = specs_of(adapter_state(model)), specs_of(tensors)
    if got != expected:
        wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ValueError(f"the adapter sent does not fit this node's rank-{rank} {cfg.adapter.method} model: "
                         f"{len(wrong)} tensor(s) differ, e.g. {wrong[:2]}")
    set_base_deltas(model, deltas)  # updates merged into the frozen base, if the strategy merges; none: W0
    load_adapter_state(model, _strategy(cfg).prepare_received(tensors, instructions, node_state))
    return model, base


def _reply(msg: Message, context: Context, cfg: RunConfig, tensors: dict, report: MetricRecord,
           allowed: Iterable[str] | None = None) -> Message:
    """The upload: as adapter tensors, or (secure aggregation) kept here and answered with public keys."""
    refuse_outside(tensors, allowed)
    if secure.requested(msg):
        return secure.begin(msg, context, tensors, report)
    return Message(RecordDict({ADAPTER: to_record(tensors, cfg.federation.wire_dtype), REPORT: report}),
                   reply_to=msg)


def _withholds(cfg: RunConfig, node: NodeConfig) -> bool:
    """Under DP, or with a node policy, the node sends no per-node metric the mechanism does not cover."""
    return cfg.privacy.mode != "off" or node.policy is not None


def _count(cfg: RunConfig, node: NodeConfig, num_examples: int) -> dict[str, int]:
    """The report's example count, or nothing when the node withholds it (the server then weighs nodes equally)."""
    return {} if _withholds(cfg, node) else {"num-examples": num_examples}


def _loads(cfg: RunConfig, node: NodeConfig) -> dict[str, int]:
    """The node's model-loads counter (how warm it is), or nothing when it withholds everything DP does not cover:
    the counter says nothing of the data, but such a node sends only the keys its release describes."""
    return {} if _withholds(cfg, node) else {resident.MODEL_LOADS: resident.model_loads()}


def _refuse(msg: Message, reason: str) -> Message:
    return Message(Error(code=REFUSAL_CODE, reason=reason), reply_to=msg)


def _node_key(context: Context, node: NodeConfig) -> str:
    """What seeds this node's batch order: its partition when simulated (Flower draws simulated node ids afresh per
    run, so a seed from them would not repeat a run), else its node id."""
    return f"partition-{node.partition_id}" if node.partition_id is not None else str(context.node_id)


def _device(cfg: RunConfig, node: NodeConfig) -> torch.device:
    return resolve_device(node.device or cfg.train.device)


@app.query()
@refuses_bad_data
def describe_node(msg: Message, context: Context) -> Message:
    """The node's capacity (max-rank) and how many training examples it holds; no tensors."""
    cfg = RunConfig.from_flat(context.run_config)
    node = node_config(context, cfg)
    train_set, _ = resident.local_split(context.run_id, str(node.data_path), cfg)
    report = MetricRecord({**_count(cfg, node, len(train_set)), MAX_RANK: node.max_rank, **_loads(cfg, node)})
    return Message(RecordDict({REPORT: report}), reply_to=msg)


@app.train()
@refuses_bad_data
def train_adapter(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    node = node_config(context, cfg)
    instructions = _instructions(msg)
    train_set, _ = resident.local_split(context.run_id, str(node.data_path), cfg)
    strategy, node_state = _strategy(cfg), read_node_state(context.state)
    # The reply guard: only names the strategy may upload for what was sent; no base-model tensor leaves.
    allowed = strategy.upload_names(msg.content.array_records[ADAPTER].keys(), instructions)
    if not strategy.trains(instructions):  # an exchange that asks for something computed from what was trained
        tensors = strategy.answer(from_record(msg.content.array_records[ADAPTER]), instructions, node_state)
        keep_node_state(context.state, node_state)
        return _reply(msg, context, cfg, tensors, MetricRecord(_count(cfg, node, len(train_set))), allowed)
    budget = BudgetFile(str(node.budget_path))
    plan: PrivateRound | None = None
    if cfg.privacy.mode in ("sample", "local") or node.policy is not None:
        try:  # a node policy refuses a run without node-side DP here, before anything is trained
            plan = plan_round(cfg, instructions, len(train_set), budget, node.policy)
        except BudgetRefused as e:
            return _refuse(msg, str(e))
    model, base = _prepare(msg, context, cfg, instructions, node, node_state, training=True)
    received = adapter_state(model)
    if plan is not None and cfg.privacy.mode == "sample":
        loss = train_sample_dp(model, train_set, base.tokenizer, cfg, _device(cfg, node), instructions, plan)
    else:
        round_seed = zlib.crc32(f"{cfg.seed}/{_node_key(context, node)}/{instructions.round}".encode())
        torch.manual_seed(round_seed)  # adapter dropout draws from torch's global generator
        lengths = (resident.local_lengths(context.run_id, str(node.data_path), cfg, base.tokenizer)[0]
                   if cfg.train.group_by_length else None)
        stream = endless_batches(train_set, base.tokenizer, cfg.model, cfg.train.batch_size, round_seed, lengths)
        loss = train(model, stream, cfg.train, _device(cfg, node), instructions.train_factors,
                     instructions.proximal_mu)
    trained = adapter_state(model)
    report = MetricRecord({"num-examples": len(train_set), "train-loss": loss} if not _withholds(cfg, node) else {})
    # Central DP under secure aggregation: the server cannot clip, the node does (sketch clips its own uploads).
    if instructions.clip_norm > 0 and not strategy.uploads_own_deltas:
        clipped, _ = clip_delta(delta_of(trained, received), instructions.clip_norm)
        trained = {k: (received[k] + clipped[k]).astype(np.float32) for k in trained}
    if plan is not None:  # everything below is post-processing of a private adapter
        if cfg.privacy.mode == "local":
            trained = privatise_upload(received, trained, instructions.train_factors, plan, cfg.train.freeze_head)
        try:  # before the reply leaves: what was released is counted (checked again under the file's lock)
            budget.record(plan.run_key, plan.spent, plan.limits)
        except BudgetExceeded as e:
            return _refuse(msg, str(e))
        # The training loss and the exact count are functions of the private examples that no noise covers:
        # they stay here. The release's own description is what the ledger records.
        report = MetricRecord(plan.report(cfg.privacy.delta))
    # The strategy transforms the post-processed adapter: what it computes from a private one is private too.
    upload, metrics = strategy.transform_upload(trained, received, instructions, node_state)
    if plan is not None or not _withholds(cfg, node):  # under central DP the upload itself is not yet private
        for key, value in metrics.items():
            report[key] = value
    for key, value in _loads(cfg, node).items():  # how warm this node is: 1 per run when resident
        report[key] = value
    keep_node_state(context.state, node_state)
    return _reply(msg, context, cfg, upload, report, allowed)


@app.train(STAGE_ACTIONS[0])
def secagg_share(msg: Message, context: Context) -> Message:
    return secure.share(msg, context)


@app.train(STAGE_ACTIONS[1])
def secagg_mask(msg: Message, context: Context) -> Message:
    return secure.mask(msg, context)


@app.train(STAGE_ACTIONS[2])
def secagg_unmask(msg: Message, context: Context) -> Message:
    return secure.unmask(msg, context)


@app.evaluate()
@refuses_bad_data
def evaluate_adapter(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    node = node_config(context, cfg)
    if _withholds(cfg, node):  # a per-node loss and accuracy are not covered by any DP mechanism pollinate runs
        return _refuse(msg, "this node sends no evaluation metrics under differential privacy (per-node loss and "
                            "accuracy are not covered by the DP mechanism); see docs/privacy.md")
    model, base = _prepare(msg, context, cfg, _instructions(msg), node, read_node_state(context.state), training=False)
    _, eval_set = resident.local_split(context.run_id, str(node.data_path), cfg)
    eval_set = eval_set[: cfg.train.eval_max_examples]
    # In length order: evaluation sums over examples, so the order changes no metric, only the padding computed.
    _, eval_lengths = resident.local_lengths(context.run_id, str(node.data_path), cfg, base.tokenizer)
    device = _device(cfg, node)
    result = evaluate(model, batches(eval_set, base.tokenizer, cfg.model, 64, seed=None,
                                     lengths=eval_lengths[: len(eval_set)]), device, cfg.train.precision)
    report = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy,
                           **_loads(cfg, node)})
    if cfg.model.task == "causal-lm" and cfg.train.eval_max_new_tokens > 0:
        # "accuracy" of an instruction-tuned model is that of what it generates; the per-token argmax is named so.
        answers = generate(model, base.tokenizer, eval_set, cfg.train.eval_max_new_tokens, cfg.model.max_length,
                           device)
        counts = count(answers, [e.response for e in eval_set], cfg.data.label_words)
        report["token-accuracy"] = result.accuracy
        report["accuracy"] = (counts["gen-correct"] / counts["gen-labelled"] if counts["gen-labelled"]
                              else counts["gen-exact"] / max(1, counts["gen-count"]))
        for key, value in counts.items():
            report[key] = value
    return Message(RecordDict({REPORT: report}), reply_to=msg)
