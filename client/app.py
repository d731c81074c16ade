"""The ClientApp: train the received adapter on local data and reply with adapter tensors only.

The same code runs on a hospital/edge node (Deployment Engine; ``data-path`` in the node
config) and in ``pollinate simulate`` (Simulation Engine; the node reads the partition
file the simulation wrote for its ``partition-id``).
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel

from client.data import Example, batches, endless_batches, read_examples, split
from client.train import evaluate, resolve_device, train
from models import BaseModel, adapter_state, build_peft_model, load_adapter_state
from proto.adapter_record import ADAPTER, REPORT, from_record, specs_of, to_record
from proto.run_config import RunConfig

# Node config keys (set by `pollinate client` or by the Simulation Engine).
DATA_PATH = "data-path"
PARTITION_ID = "partition-id"
DEVICE = "device"

app = ClientApp()


def partition_file(partition_dir: str | Path, partition_id: int) -> Path:
    """Where ``pollinate simulate`` writes the examples of one simulated node."""
    return Path(partition_dir) / f"partition-{partition_id}.jsonl"


@functools.lru_cache(maxsize=1)
def _model(cfg: RunConfig) -> tuple[PeftModel, BaseModel]:
    # One PeftModel per process, reused across rounds: every call overwrites the whole adapter state.
    return build_peft_model(cfg)


@functools.lru_cache(maxsize=4)
def _local_split(path: Path, cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    examples = read_examples(path, cfg.data, cfg.model)
    return split(examples, cfg.data.eval_fraction, cfg.seed)


def _setup(msg: Message, context: Context) -> tuple[RunConfig, tuple[PeftModel, BaseModel], list[Example],
                                                   list[Example], set[str]]:
    cfg = RunConfig.from_flat(context.run_config)
    node = context.node_config
    if DATA_PATH in node:
        path = Path(str(node[DATA_PATH]))
    elif PARTITION_ID in node and cfg.data.partition_dir:
        path = partition_file(cfg.data.partition_dir, int(node[PARTITION_ID]))
    else:
        raise ValueError("this node has no data: start it with --data PATH (node config 'data-path')")
    train_set, eval_set = _local_split(path, cfg)
    model, base = _model(cfg)
    received = msg.content[ADAPTER]  # type: ignore[index]
    load_adapter_state(model, from_record(received, expected=specs_of(adapter_state(model))))
    return cfg, (model, base), train_set, eval_set, set(received.keys())


def _device(cfg: RunConfig, context: Context) -> torch.device:
    return resolve_device(str(context.node_config.get(DEVICE, cfg.train.device)))


@app.train()
def train_adapter(msg: Message, context: Context) -> Message:
    cfg, (model, base), train_set, _, adapter_keys = _setup(msg, context)
    round_seed = zlib.crc32(f"{cfg.seed}/{context.node_id}/{msg.metadata.group_id}".encode())
    stream = endless_batches(train_set, base.tokenizer, cfg.model, cfg.train.batch_size, round_seed)
    loss = train(model, stream, cfg.train, _device(cfg, context))
    tensors = adapter_state(model)
    # Only names the server sent as the adapter may go back: no base-model tensor can leave the node.
    reply = to_record(tensors, cfg.federation.wire_dtype, allowed=adapter_keys)
    report = MetricRecord({"num-examples": len(train_set), "train-loss": loss})
    return Message(RecordDict({ADAPTER: reply, REPORT: report}), reply_to=msg)


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    cfg, (model, base), _, eval_set, _ = _setup(msg, context)
    eval_set = eval_set[: cfg.train.eval_max_examples]
    result = evaluate(model, batches(eval_set, base.tokenizer, cfg.model, 64, seed=None), _device(cfg, context))
    report = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy})
    return Message(RecordDict({REPORT: report}), reply_to=msg)
