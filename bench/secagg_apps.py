"""The ServerApp and ClientApp of ``bench/secagg.py``: one aggregation round, no training, four ways.

The nodes do not train: each answers a train message with a fixed, seeded random vector (``node_vector``)
of the length the server asked for, weighted by a fixed example count (``node_examples``). Everything
else is the real code:

- ``pollinate-plain``: ``server.rounds.RoundExchange.mean`` in the clear (GridExchange + ``mean_of``);
  the node replies through ``client.app._reply``.
- ``pollinate-secagg``: the same with ``secagg.enabled``: ``server.secure.SecureAggregation`` and, on the
  node, ``client.app._reply`` -> ``client.secure.begin`` and the real ``client.secure`` stage handlers.
- ``flower-plain``: Flower 1.42's legacy ``DefaultWorkflow`` with its default fit workflow and ``FedAvg``;
  the node is a ``NumPyClient`` whose ``fit`` returns the vector.
- ``flower-secagg``: the same with ``SecAggPlusWorkflow`` and the ``secaggplus_mod`` client mod.

Flower's legacy API is used here only as the library we compare against; pollinate never builds on it.
The server times each round around the round itself (Ray and node start-up excluded), counts the bytes
of every message it sends and receives (``CountingGrid``), checks the mean against numpy, and writes
one JSON line per round to the file named by ``$POLLINATE_SECAGG_BENCH``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from pollinate.client.app import _reply, secagg_mask, secagg_share, secagg_unmask
from pollinate.proto.adapter_record import ADAPTER, from_record, specs_of
from pollinate.proto.message_size import record_bytes
from pollinate.proto.run_config import RunConfig
from pollinate.secagg import minimum_threshold, suggested_degree
from pollinate.server.rounds import RoundExchange, RoundLedger, wait_for_nodes
from pollinate.server.secure import SecureAggregation
from pollinate.strategies import Request

PLAN_ENV = "POLLINATE_SECAGG_BENCH"  # path of the plan (JSON); results are appended to <plan>.jsonl
TIMING = "bench-timing"  # MetricRecord the bench node adds to each reply; excluded from byte counts
CONFIGS = ("pollinate-plain", "pollinate-secagg", "flower-plain", "flower-secagg")
MAX_EXAMPLES = 100


# --------------------------------------------------------------------------- what every node uploads

def node_examples(node_id: int) -> int:
    """A node's example count (its FedAvg weight), 50..100, fixed by its id so the server can check the mean."""
    return 50 + node_id % (MAX_EXAMPLES - 49)


@functools.lru_cache(maxsize=8)
def node_vector(node_id: int, length: int) -> np.ndarray:
    """The node's upload: ``length`` float32 values, uniform in [-1, 1), seeded by node id and length."""
    rng = np.random.default_rng([node_id & 0xFFFFFFFF, node_id >> 32, length])
    vector = rng.uniform(-1.0, 1.0, length).astype(np.float32)
    vector.flags.writeable = False
    return vector


def layout(length: int) -> dict[str, tuple[int, ...]]:
    """The upload as four LoRA-like named tensors (sorted names = vector order for both frameworks)."""
    rows = length // 4000
    if rows * 4000 != length:
        raise ValueError(f"vector length {length} must be a multiple of 4000")
    return {f"layer.{i}.lora_{ab}.weight": (rows, 1000) for i in range(2) for ab in "AB"}


def split(vector: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name]))
        out[name] = vector[offset:offset + size].reshape(shapes[name])
        offset += size
    return out


# --------------------------------------------------------------------------- the ClientApp

client = ClientApp()


class _VectorClient(NumPyClient):
    """Flower's side: ``fit`` returns the node's vector (as the tensors it was sent) and its example count."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        shapes = {f"{i:04d}": p.shape for i, p in enumerate(parameters)}
        vector = node_vector(self.node_id, sum(p.size for p in parameters))
        return list(split(vector, shapes).values()), node_examples(self.node_id), {}


def _flower_fit(msg: Message, context: Context) -> Message:
    return handle_legacy_message_from_msgtype(lambda ctx: _VectorClient(ctx.node_id).to_client(), msg, context)


def _timed(handler: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    """Run ``handler`` and add its compute time to the reply (the server separates it from transport)."""
    start = time.perf_counter()
    reply = handler(msg, context)
    if not reply.has_error():
        reply.content[TIMING] = MetricRecord({"seconds": time.perf_counter() - start})
    return reply


def _pollinate_train(msg: Message, context: Context) -> Message:
    """pollinate's node, training replaced by "return this vector": the reply goes through the real ``_reply``."""
    cfg = RunConfig.from_flat(context.run_config)
    shapes = {name: spec.shape for name, spec in specs_of(from_record(msg.content.array_records[ADAPTER])).items()}
    tensors = split(node_vector(context.node_id, sum(int(np.prod(s)) for s in shapes.values())), shapes)
    report = MetricRecord({"num-examples": node_examples(context.node_id)})
    return _reply(msg, context, cfg, tensors, report, allowed=msg.content.array_records[ADAPTER].keys())


@client.train()
def train(msg: Message, context: Context) -> Message:
    if RECORD_KEY_CONFIGS in msg.content.config_records:  # Flower's SecAgg+ stages, all sent as "train"
        return _timed(lambda m, c: secaggplus_mod(m, c, _flower_fit), msg, context)
    if ADAPTER in msg.content.array_records:  # pollinate: plain, or stage 1 of SecAgg+
        return _timed(_pollinate_train, msg, context)
    return _timed(_flower_fit, msg, context)  # Flower's plain FitIns


# pollinate's SecAgg+ stages 2-4: the real handlers of client/app.py, timed.
client.train("secagg_share")(lambda msg, context: _timed(secagg_share, msg, context))
client.train("secagg_mask")(lambda msg, context: _timed(secagg_mask, msg, context))
client.train("secagg_unmask")(lambda msg, context: _timed(secagg_unmask, msg, context))


# --------------------------------------------------------------------------- the ServerApp

@dataclass
class Exchange:
    """One send_and_receive: what it cost on the wire and in time, and the nodes' own compute in it."""

    message_type: str
    seconds: float
    bytes_down: int
    bytes_up: int
    node_seconds: list[float] = field(default_factory=list)


class CountingGrid:
    """Flower's Grid, with every exchange timed and its messages' record bytes counted.

    An exchange is a ``send_and_receive`` (Flower's workflows) or a ``push_messages`` and the
    ``pull_messages`` that follow it (pollinate's ``server.rounds.send_and_receive``). Bytes are
    ``proto.message_size.record_bytes`` of each record of each message (tensor data, config values and
    their keys, as Flower's ``count_bytes``), for every configuration alike; no protobuf framing.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.exchanges: list[Exchange] = []
        self._pushed_at = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._open(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._received(replies)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._open(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._received(replies)
        return replies

    def _open(self, messages: list[Message]) -> None:
        kind = messages[0].metadata.message_type if messages else "none"
        self.exchanges.append(Exchange(kind, 0.0, sum(_content_bytes(m.content) for m in messages), 0))
        self._pushed_at = time.perf_counter()

    def _received(self, replies: list[Message]) -> None:
        exchange = self.exchanges[-1]
        exchange.seconds = time.perf_counter() - self._pushed_at
        for reply in replies:
            if reply.has_content() and TIMING in reply.content.metric_records:
                exchange.node_seconds.append(float(reply.content.metric_records[TIMING]["seconds"]))
                del reply.content[TIMING]
        exchange.bytes_up += sum(_content_bytes(r.content) for r in replies if r.has_content())


def _content_bytes(content: RecordDict) -> int:
    return sum(record_bytes(record) for name, record in content.items() if name != TIMING)


@dataclass(frozen=True)
class Plan:
    nodes: int
    lengths: list[int]
    reps: dict[str, int]  # str(length) -> repetitions
    results: str  # JSON lines, one per round


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    plan = Plan(**json.loads(open(os.environ[PLAN_ENV]).read()))
    cfg = RunConfig.from_flat(context.run_config)
    nodes = wait_for_nodes(grid, plan.nodes, cfg.federation.wait_for_nodes)
    round_number = 0
    with open(plan.results, "a") as out:
        for length in plan.lengths:
            expected = _expected_mean(nodes, length)
            # One untimed round of each first: Ray actors load the ClientApp and build the vectors.
            schedule = [(-1, name) for name in CONFIGS]
            for rep in range(plan.reps[str(length)]):  # interleaved, the order rotating every repetition
                schedule += [(rep, CONFIGS[(rep + i) % len(CONFIGS)]) for i in range(len(CONFIGS))]
            for rep, name in schedule:
                round_number += 1
                row = run_config(name, grid, context, cfg, nodes, length, round_number, expected)
                row.update(rep=rep, nodes=len(nodes), length=length)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"n={len(nodes)} L={length} rep={rep} {name}: {row['seconds']:.3f} s, "
                      f"max error {row['max_error']:.2e}", flush=True)


def _expected_mean(nodes: list[int], length: int) -> np.ndarray:
    total = sum(node_examples(n) for n in nodes)
    return sum(node_vector(n, length).astype(np.float64) * (node_examples(n) / total) for n in nodes)


def run_config(name: str, grid: Grid, context: Context, cfg: RunConfig, nodes: list[int], length: int,
               round_number: int, expected: np.ndarray) -> dict[str, Any]:
    counting = CountingGrid(grid)
    runner = _run_pollinate if name.startswith("pollinate") else _run_flower
    seconds, mean = runner(name.endswith("secagg"), counting, context, cfg, nodes, length, round_number)
    return {"config": name, "seconds": seconds, "max_error": float(np.abs(mean - expected).max()),
            "exchanges": [asdict(e) for e in counting.exchanges]}


def _run_pollinate(secure: bool, grid: CountingGrid, context: Context, cfg: RunConfig, nodes: list[int],
                   length: int, round_number: int) -> tuple[float, np.ndarray]:
    cfg = cfg.replace(**{"secagg.enabled": secure, "federation.min-nodes": len(nodes)})
    shapes = layout(length)
    request = Request(split(np.zeros(length, np.float32), shapes))  # the global adapter sent down: zeros
    ledger = RoundLedger()
    start = time.perf_counter()
    aggregation = (SecureAggregation(grid, cfg.secagg, cfg.federation, round_number, ledger,  # type: ignore[arg-type]
                                     seed=cfg.seed) if secure else None)
    exchange = RoundExchange(grid, cfg.federation, round_number, ledger, secure=aggregation)  # type: ignore[arg-type]
    mean = exchange.mean({node: request for node in nodes})
    seconds = time.perf_counter() - start
    if len(mean.node_ids) != len(nodes):
        raise RuntimeError(f"{len(mean.node_ids)} of {len(nodes)} nodes in the mean: {ledger.failures()}")
    return seconds, np.concatenate([mean.tensors[k].ravel() for k in sorted(shapes)])


def flower_secaggplus(n: int) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ with pollinate's parameters (the mapping is in docs/secagg-bench.md).

    Flower's neighbourhood includes the node itself (it keeps one of its own shares), so our k neighbours
    are Flower's num_shares = k + 1; the threshold t is the same count of shares. Quantisation: the same
    clip range (1.0), number of levels (2^24 = secagg.bits) and ring (2^32).
    """
    k = suggested_degree(n)
    return SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=minimum_threshold(k),
                              max_weight=float(MAX_EXAMPLES), clipping_range=1.0, quantization_range=2**24,
                              modulus_range=2**32)


def _run_flower(secure: bool, grid: CountingGrid, context: Context, cfg: RunConfig, nodes: list[int], length: int,
                round_number: int) -> tuple[float, np.ndarray]:
    shapes = layout(length)
    initial = ndarrays_to_parameters(list(split(np.zeros(length, np.float32), shapes).values()))
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(nodes),
                      min_available_clients=len(nodes), initial_parameters=initial)
    fit = flower_secaggplus(len(nodes)) if secure else default_fit_workflow
    timed: list[float] = []

    def timed_fit(grid: Grid, legacy: Context) -> None:
        start = time.perf_counter()
        fit(grid, legacy)
        timed.append(time.perf_counter() - start)

    legacy = LegacyContext(context=replace_state(context), config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)  # type: ignore[arg-type]
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD],
                                                                     keep_input=True))
    return timed[0], np.concatenate([a.ravel() for a in arrays])


def replace_state(context: Context) -> Context:
    """The ServerApp's context with an empty state: each Flower run starts afresh and frees its arrays."""
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=RecordDict(), run_config=context.run_config)
