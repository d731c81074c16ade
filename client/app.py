"""The ClientApp: train the received adapter on local data and reply with adapter tensors only.

The same code runs on a hospital/edge node (Deployment Engine; ``data-path`` and ``max-rank``
in the node config) and in ``pollinate simulate`` (Simulation Engine; the node reads the
partition file, and the node settings file, the simulation wrote for its ``partition-id``):
both parsed once into a ``NodeConfig`` (``proto/node_config.py``).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable

import torch
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel

from pollinate.client.data import Example, batches, endless_batches, read_examples, split
from pollinate.client import secure
from pollinate.client.private_training import BudgetRefused, PrivateRound, plan_round, privatise_upload, train_sample_dp
from pollinate.client.sketch import sketch_y, sketch_z
from pollinate.client.train import evaluate, resolve_device, train
from pollinate.models import BaseModel, adapter_state, build_peft_model, load_adapter_state, set_base_deltas
from pollinate.proto.adapter_record import (ADAPTER, INSTRUCTIONS, REPORT, from_record, refuse_outside, specs_of,
                                  to_record)
from pollinate.proto.instructions import Instructions
from pollinate.privacy.central import clip_delta, delta_of
from pollinate.privacy.budget import BudgetFile
from pollinate.privacy.ledger import REFUSAL_CODE
from pollinate.proto.node_config import MAX_RANK, NodeConfig
from pollinate.proto.run_config import RunConfig
from pollinate.proto.secagg_record import STAGE_ACTIONS
from pollinate.strategies.base import lora_pairs
from pollinate.strategies.heterogeneous import to_global_rank
from pollinate.strategies.hetlora_math import prune_tail
from pollinate.strategies.merged import split_deltas

PERSONAL = "personal-factors"  # context.state record: this node's own LoRA B (fedsa-lora)

app = ClientApp()


def node_config(context: Context, cfg: RunConfig) -> NodeConfig:
    """This node's config: Flower's node config, plus the simulation's per-node settings when simulated."""
    return NodeConfig.from_flower(context.node_config, cfg.data.partition_dir)


@functools.lru_cache(maxsize=2)
def _model(cfg: RunConfig) -> tuple[PeftModel, BaseModel]:
    # One PeftModel per (config, rank), reused across rounds: every call overwrites the whole adapter state.
    return build_peft_model(cfg)


@functools.lru_cache(maxsize=4)
def _local_split(path: str, cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    examples = read_examples(path, cfg.data, cfg.model)
    return split(examples, cfg.data.eval_fraction, cfg.seed)


def _instructions(msg: Message) -> Instructions:
    record = msg.content.config_records.get(INSTRUCTIONS)
    return Instructions.from_record_values(record) if record is not None else Instructions()


def _prepare(msg: Message, cfg: RunConfig, instructions: Instructions, node: NodeConfig,
             state: RecordDict, training: bool) -> tuple[PeftModel, BaseModel]:
    """The model at the instructed rank with the received adapter loaded (validated against its shapes)."""
    rank = instructions.rank or cfg.adapter.r
    if training and node.max_rank and rank > node.max_rank:
        raise ValueError(f"the server sent a rank-{rank} adapter, but this node's max-rank is {node.max_rank}")
    model, base = _model(cfg.replace(**{"adapter.r": rank}) if rank != cfg.adapter.r else cfg)
    tensors, deltas = split_deltas(from_record(msg.content.array_records[ADAPTER]))
    expected, got = specs_of(adapter_state(model)), specs_of(tensors)
    if got != expected:
        wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ValueError(f"the adapter sent does not fit this node's rank-{rank} {cfg.adapter.method} model: "
                         f"{len(wrong)} tensor(s) differ, e.g. {wrong[:2]}")
    set_base_deltas(model, deltas)  # merged updates (flora, fedex-lora) on top of the frozen base; none: W0
    if instructions.personal_factors and PERSONAL in state.array_records:  # fedsa-lora: this node's own B
        tensors.update({k: v.numpy() for k, v in state.array_records[PERSONAL].items() if k in tensors})
    load_adapter_state(model, tensors)
    return model, base


def _reply(msg: Message, context: Context, cfg: RunConfig, tensors: dict, report: MetricRecord,
           allowed: Iterable[str] | None = None) -> Message:
    """The upload: as adapter tensors, or (secure aggregation) kept here and answered with public keys."""
    refuse_outside(tensors, allowed)
    if secure.requested(msg):
        return secure.begin(msg, context, tensors, report)
    return Message(RecordDict({ADAPTER: to_record(tensors, cfg.federation.wire_dtype), REPORT: report}),
                   reply_to=msg)


def _device(cfg: RunConfig, node: NodeConfig) -> torch.device:
    return resolve_device(node.device or cfg.train.device)


@app.query()
def describe_node(msg: Message, context: Context) -> Message:
    """The node's capacity (max-rank) and how many training examples it holds; no tensors."""
    cfg = RunConfig.from_flat(context.run_config)
    node = node_config(context, cfg)
    train_set, _ = _local_split(str(node.data_path), cfg)
    report = MetricRecord({"num-examples": len(train_set), MAX_RANK: node.max_rank})
    return Message(RecordDict({REPORT: report}), reply_to=msg)


@app.train()
def train_adapter(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    node = node_config(context, cfg)
    instructions = _instructions(msg)
    train_set, _ = _local_split(str(node.data_path), cfg)
    rank = instructions.rank or cfg.adapter.r
    scaling = cfg.adapter.alpha / rank
    if instructions.upload == "sketch-z":  # sketch, exchange 2: no training, project what was trained
        received = from_record(msg.content.array_records[ADAPTER])
        tensors = sketch_z(received, instructions, scaling, context.state)
        return _reply(msg, context, cfg, tensors, MetricRecord({"num-examples": len(train_set)}))
    budget = BudgetFile(str(node.budget_path))
    plan: PrivateRound | None = None
    if cfg.privacy.mode in ("sample", "local"):
        try:
            plan = plan_round(cfg, instructions, len(train_set), budget)
        except BudgetRefused as e:
            return Message(Error(code=REFUSAL_CODE, reason=str(e)), reply_to=msg)
    model, base = _prepare(msg, cfg, instructions, node, context.state, training=True)
    received = adapter_state(model)
    if plan is not None and cfg.privacy.mode == "sample":
        loss = train_sample_dp(model, train_set, base.tokenizer, cfg, _device(cfg, node), instructions, plan)
    else:
        round_seed = zlib.crc32(f"{cfg.seed}/{context.node_id}/{instructions.round}".encode())
        stream = endless_batches(train_set, base.tokenizer, cfg.model, cfg.train.batch_size, round_seed)
        loss = train(model, stream, cfg.train, _device(cfg, node), instructions.train_factors,
                     instructions.proximal_mu)
    trained = adapter_state(model)
    report = MetricRecord({"num-examples": len(train_set), "train-loss": loss})
    if instructions.clip_norm > 0:  # central DP under secure aggregation: the server cannot clip, the node does
        clipped, _ = clip_delta(delta_of(trained, received), instructions.clip_norm)
        trained = {k: (received[k] + clipped[k]).astype(np.float32) for k in trained}
    if plan is not None:  # everything below is post-processing of a private adapter
        if cfg.privacy.mode == "local":
            trained = privatise_upload(received, trained, instructions.train_factors, plan)
        budget.record(plan.run_key, plan.spent)  # before the reply leaves: what was released is counted
        # The training loss is a function of the private examples that no noise covers: it stays here.
        report = MetricRecord({"num-examples": len(train_set), **plan.report(cfg.privacy.delta)})
    if instructions.prune_gamma > 0:  # hetlora self-pruning: zero the negligible tail, tell the server
        trained, pruned_rank = prune_tail(trained, instructions.prune_gamma)
        report["pruned-rank"] = pruned_rank
    if instructions.upload_rank:  # linear hetlora: every upload padded to the global rank and scaling
        trained = to_global_rank(trained, rank, instructions.upload_rank, cfg.adapter.alpha)
    if instructions.upload == "sketch-y":  # sketch, exchange 1: a linear sketch of the trained update
        return _reply(msg, context, cfg, sketch_y(trained, instructions, scaling, context.state), report)
    if instructions.personal_factors:  # fedsa-lora: B stays here, for the next round and for evaluation
        personal = {b for _, b in lora_pairs(trained).values()}
        state_record = ArrayRecord()
        for k in personal:
            state_record[k] = Array(np.ascontiguousarray(trained[k]))
        context.state[PERSONAL] = state_record
        trained = {k: v for k, v in trained.items() if k not in personal}
    # Only names the server sent as the adapter may go back: no base-model tensor can leave the node.
    return _reply(msg, context, cfg, trained, report, allowed=msg.content.array_records[ADAPTER].keys())


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
def evaluate_adapter(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    node = node_config(context, cfg)
    model, base = _prepare(msg, cfg, _instructions(msg), node, context.state, training=False)
    _, eval_set = _local_split(str(node.data_path), cfg)
    eval_set = eval_set[: cfg.train.eval_max_examples]
    result = evaluate(model, batches(eval_set, base.tokenizer, cfg.model, 64, seed=None), _device(cfg, node))
    report = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy})
    return Message(RecordDict({REPORT: report}), reply_to=msg)
