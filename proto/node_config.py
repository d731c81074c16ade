"""A node's own configuration: what one ClientApp is told about the machine it runs on.

Flower hands every ClientApp a flat ``context.node_config``: on a deployed node the one
``pollinate client`` writes (``data-path``, ``max-rank``, ``device``, optionally
``privacy-state``); on the Simulation Engine only ``partition-id`` and ``num-partitions``, so
``pollinate simulate`` writes each simulated node's data and settings into files named here
(the engine offers no way to give one node more config). ``NodeConfig.from_flower`` parses
either form once, with errors that say how to fix them; the ClientApp takes typed values.

``max-rank`` has one meaning: the largest LoRA rank this node can train (0: no limit). The
node announces it to the server, and the rank it is assigned travels only in
``Instructions.rank``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pollinate.privacy.node_policy import NodePolicy, PolicyError
from pollinate.proto.run_config import ConfigError, Scalar, valid_device

# Node config keys (Flower's ``--node-config`` / ``context.node_config``).
DATA_PATH = "data-path"  # this node's CSV/JSONL examples
MAX_RANK = "max-rank"  # the largest LoRA rank this node can train (0: no limit); also the metric it announces
DEVICE = "device"  # overrides the run's train.device on this node
PRIVACY_STATE = "privacy-state"  # the node's privacy budget file (default: beside its data)
PARTITION_ID = "partition-id"  # set by the Simulation Engine
# The node's own privacy policy (privacy/node_policy.py); without max-epsilon the node follows the run's config.
MAX_EPSILON = "max-epsilon"  # this node's budget E (pollinate client --max-epsilon)
MAX_DELTA = "max-delta"  # the largest delta it accepts and accounts at (--delta; default 1e-5)
BUDGET_SCOPE = "budget-scope"  # node (default: one budget across every run) | run (--budget-scope)
POLICY_KEYS = (MAX_EPSILON, MAX_DELTA, BUDGET_SCOPE)
DEFAULT_MAX_DELTA = 1e-5


def partition_file(partition_dir: str | Path, partition_id: int) -> Path:
    """Where ``pollinate simulate`` writes the examples of one simulated node."""
    return Path(partition_dir) / f"partition-{partition_id}.jsonl"


def node_settings_file(partition_dir: str | Path, partition_id: int) -> Path:
    """Where ``pollinate simulate`` writes the node config of one simulated node (its max-rank)."""
    return Path(partition_dir) / f"partition-{partition_id}.node.json"


def write_node_settings(partition_dir: str | Path, partition_id: int, max_rank: int) -> Path:
    """A simulated node's settings file: what ``pollinate client --max-rank`` puts in a real node's config."""
    path = node_settings_file(partition_dir, partition_id)
    path.write_text(json.dumps({MAX_RANK: _max_rank(max_rank, f"[simulation] max-ranks[{partition_id}]")}))
    return path


@dataclass(frozen=True)
class NodeConfig:
    data_path: Path
    max_rank: int = 0  # the largest LoRA rank this node can train (0: no limit)
    device: str | None = None  # None: the run's train.device
    privacy_state: Path | None = None  # None: <data file>.privacy.json beside the data
    partition_id: int | None = None  # simulated nodes only
    policy: NodePolicy | None = None  # the node's own privacy policy; None: it follows the run's config

    @property
    def budget_path(self) -> Path:
        """The node's privacy budget file (``privacy-state``, else beside its data)."""
        return self.privacy_state or self.data_path.with_suffix(".privacy.json")

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Scalar], partition_dir: str = "") -> NodeConfig:
        """Parse Flower's node config; a simulated node (``partition-id``, no ``data-path``) reads the files
        ``pollinate simulate`` wrote for it in ``partition_dir`` (the run's ``data.partition-dir``)."""
        config: dict[str, Scalar] = dict(node_config)
        partition_id = None
        if PARTITION_ID in config:
            partition_id = _int(config[PARTITION_ID], PARTITION_ID, "the Simulation Engine sets it")
        if DATA_PATH not in config and partition_id is not None and partition_dir:
            config[DATA_PATH] = str(partition_file(partition_dir, partition_id))
            settings = node_settings_file(partition_dir, partition_id)
            if settings.is_file():
                config.update(_settings(settings))
        if DATA_PATH not in config or not str(config[DATA_PATH]):
            raise ConfigError("this node has no data: start it with --data PATH (node config 'data-path')")
        device = config.get(DEVICE)
        if device is not None and not valid_device(str(device)):
            raise ConfigError(f"node config {DEVICE} = {device!r} is invalid: use auto, cpu, cuda or cuda:N "
                              f"(pollinate client --device)")
        privacy_state = config.get(PRIVACY_STATE)
        return cls(data_path=Path(str(config[DATA_PATH])),
                   max_rank=_max_rank(config.get(MAX_RANK, 0), f"node config {MAX_RANK}"),
                   device=str(device) if device is not None else None,
                   privacy_state=Path(str(privacy_state)) if privacy_state else None,
                   partition_id=partition_id, policy=_policy(config))


def _policy(config: Mapping[str, Scalar]) -> NodePolicy | None:
    """The node's privacy policy from its config (``max-epsilon``, ``max-delta``, ``budget-scope``)."""
    if MAX_EPSILON not in config:
        extra = [k for k in (MAX_DELTA, BUDGET_SCOPE) if k in config]
        if extra:
            raise ConfigError(f"node config {extra} without {MAX_EPSILON}: a node's privacy policy starts with its "
                              f"budget (pollinate client --max-epsilon E --delta D)")
        return None
    values = {}
    for key in (MAX_EPSILON, MAX_DELTA):
        raw = config.get(key, DEFAULT_MAX_DELTA)
        try:
            values[key] = float(str(raw).strip()) if not isinstance(raw, bool) else math.nan
        except ValueError:
            values[key] = math.nan
    try:
        return NodePolicy(values[MAX_EPSILON], values[MAX_DELTA], str(config.get(BUDGET_SCOPE, "node")))  # type: ignore[arg-type]
    except PolicyError as e:
        raise ConfigError(f"node config: {e}") from None


def _settings(path: Path) -> dict[str, Scalar]:
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"node settings file {path} is not JSON ({e}); `pollinate simulate` writes it, "
                          f"run the simulation again") from e
    if not isinstance(settings, dict) or set(settings) - {MAX_RANK, *POLICY_KEYS}:
        raise ConfigError(f"node settings file {path} must hold {{\"{MAX_RANK}\": N}} (and optionally "
                          f"{list(POLICY_KEYS)}), got {settings!r}")
    return settings


def _max_rank(value: object, where: str) -> int:
    rank = _int(value, where, "use the largest LoRA rank this node can train, or 0 for no limit")
    if rank < 0:
        raise ConfigError(f"{where} = {rank} is invalid: use the largest LoRA rank this node can train, "
                          f"or 0 for no limit")
    return rank


def _int(value: object, where: str, how: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r} is not an integer: {how}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{where} = {value!r} is not an integer: {how}") from None
