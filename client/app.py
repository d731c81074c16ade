"""The ClientApp: train the received adapter on local data and reply with adapter tensors only.

The same code runs on a hospital/edge node (Deployment Engine; ``data-path`` and ``max-rank``
in the node config) and in ``pollinate simulate`` (Simulation Engine; the node reads the
partition file, and the node settings file, the simulation wrote for its ``partition-id``).
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel

from pollinate.client.data import Example, batches, endless_batches, read_examples, split
from pollinate.client import secure
from pollinate.client.private_training import (BudgetRefused, PrivateRound, budget_file, plan_round, privatise_upload,
                                     train_sample_dp)
from pollinate.client.sketch import sketch_y, sketch_z
from pollinate.client.train import evaluate, resolve_device, train
from pollinate.models import BaseModel, adapter_state, build_peft_model, load_adapter_state, set_base_deltas
from pollinate.proto.adapter_record import (ADAPTER, INSTRUCTIONS, REPORT, from_record, refuse_outside, specs_of,
                                  to_record)
from pollinate.proto.instructions import Instructions
from pollinate.privacy.central import clip_delta, delta_of
from pollinate.privacy.ledger import REFUSAL_CODE
from pollinate.proto.run_config import RunConfig
from pollinate.proto.secagg_record import STAGE_ACTIONS
from pollinate.strategies.base import lora_pairs
from pollinate.strategies.heterogeneous import to_global_rank
from pollinate.strategies.hetlora_math import prune_tail
from pollinate.strategies.merged import split_deltas

# Node config keys (set by `pollinate client` or, in a simulation, by the node settings file).
DATA_PATH = "data-path"
MAX_RANK = "max-rank"  # the largest LoRA rank this node can train (0: no limit)
DEVICE = "device"
PARTITION_ID = "partition-id"  # set by the Simulation Engine
PERSONAL = "personal-factors"  # context.state record: this node's own LoRA B (fedsa-lora)

app = ClientApp()


def partition_file(partition_dir: str | Path, partition_id: int) -> Path:
    """Where ``pollinate simulate`` writes the examples of one simulated node."""
    return Path(partition_dir) / f"partition-{partition_id}.jsonl"


def node_settings_file(partition_dir: str | Path, partition_id: int) -> Path:
    """Where ``pollinate simulate`` writes the node config of one simulated node (e.g. its max-rank)."""
    return Path(partition_dir) / f"partition-{partition_id}.node.json"


def node_config(context: Context, cfg: RunConfig) -> dict[str, object]:
    """This node's config: Flower's node config, plus the simulation's per-node settings when simulated."""
    config: dict[str, object] = dict(context.node_config)
    if DATA_PATH not in config and PARTITION_ID in config and cfg.data.partition_dir:
        pid = int(str(config[PARTITION_ID]))
        config[DATA_PATH] = str(partition_file(cfg.data.partition_dir, pid))
        settings = node_settings_file(cfg.data.partition_dir, pid)
        if settings.is_file():
            config.update(json.loads(settings.read_text()))
    if DATA_PATH not in config:
        raise ValueError("this node has no data: start it with --data PATH (node config 'data-path')")
    return config


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


def _prepare(msg: Message, cfg: RunConfig, instructions: Instructions, config: Mapping[str, object],
             state: RecordDict, training: bool) -> tuple[PeftModel, BaseModel]:
    """The model at the instructed rank with the received adapter loaded (validated against its shapes)."""
    rank = instructions.rank or cfg.adapter.r
    capacity = int(str(config.get(MAX_RANK, 0)))
    if training and capacity and rank > capacity:
        raise ValueError(f"the server sent a rank-{rank} adapter, but this node's max-rank is {capacity}")
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


def _device(cfg: RunConfig, config: Mapping[str, object]) -> torch.device:
    return resolve_device(str(config.get(DEVICE, cfg.train.device)))


@app.query()
def describe_node(msg: Message, context: Context) -> Message:
    """The node's capacity (max-rank) and how many training examples it holds; no tensors."""
    cfg = RunConfig.from_flat(context.run_config)
    config = node_config(context, cfg)
    train_set, _ = _local_split(str(config[DATA_PATH]), cfg)
    report = MetricRecord({"num-examples": len(train_set), MAX_RANK: int(str(config.get(MAX_RANK, 0)))})
    return Message(RecordDict({REPORT: report}), reply_to=msg)


@app.train()
def train_adapter(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    config = node_config(context, cfg)
    instructions = _instructions(msg)
    train_set, _ = _local_split(str(config[DATA_PATH]), cfg)
    rank = instructions.rank or cfg.adapter.r
    scaling = cfg.adapter.alpha / rank
    if instructions.upload == "sketch-z":  # sketch, exchange 2: no training, project what was trained
        received = from_record(msg.content.array_records[ADAPTER])
        tensors = sketch_z(received, instructions, scaling, context.state)
        return _reply(msg, context, cfg, tensors, MetricRecord({"num-examples": len(train_set)}))
    budget = budget_file(config, str(config[DATA_PATH]))
    plan: PrivateRound | None = None
    if cfg.privacy.mode in ("sample", "local"):
        try:
            plan = plan_round(cfg, instructions, len(train_set), budget)
        except BudgetRefused as e:
            return Message(Error(code=REFUSAL_CODE, reason=str(e)), reply_to=msg)
    model, base = _prepare(msg, cfg, instructions, config, context.state, training=True)
    received = adapter_state(model)
    if plan is not None and cfg.privacy.mode == "sample":
        loss = train_sample_dp(model, train_set, base.tokenizer, cfg, _device(cfg, config), instructions, plan)
    else:
        round_seed = zlib.crc32(f"{cfg.seed}/{context.node_id}/{instructions.round}".encode())
        stream = endless_batches(train_set, base.tokenizer, cfg.model, cfg.train.batch_size, round_seed)
        loss = train(model, stream, cfg.train, _device(cfg, config), instructions.train_factors,
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
    config = node_config(context, cfg)
    model, base = _prepare(msg, cfg, _instructions(msg), config, context.state, training=False)
    _, eval_set = _local_split(str(config[DATA_PATH]), cfg)
    eval_set = eval_set[: cfg.train.eval_max_examples]
    result = evaluate(model, batches(eval_set, base.tokenizer, cfg.model, 64, seed=None), _device(cfg, config))
    report = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy})
    return Message(RecordDict({REPORT: report}), reply_to=msg)
