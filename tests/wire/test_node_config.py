"""A node's config: Flower's node config (deployed) or the simulation's files, parsed once into a NodeConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollinate.proto.node_config import (NodeConfig, node_settings_file, partition_file, write_node_settings)
from pollinate.proto.run_config import ConfigError


def test_a_deployed_nodes_config_is_typed() -> None:
    node = NodeConfig.from_flower({"data-path": "/data/node-1.jsonl", "max-rank": "8", "device": "cpu"})
    assert node == NodeConfig(Path("/data/node-1.jsonl"), max_rank=8, device="cpu")
    assert node.budget_path == Path("/data/node-1.privacy.json")
    pinned = NodeConfig.from_flower({"data-path": "/data/a.csv", "privacy-state": "/var/budget.json"})
    assert pinned.max_rank == 0 and pinned.device is None and pinned.budget_path == Path("/var/budget.json")


def test_a_simulated_node_reads_its_partition_and_settings_files(tmp_path: Path) -> None:
    write_node_settings(tmp_path, 1, 4)
    node = NodeConfig.from_flower({"partition-id": 1, "num-partitions": 3}, str(tmp_path))
    assert node == NodeConfig(partition_file(tmp_path, 1), max_rank=4, partition_id=1)
    assert NodeConfig.from_flower({"partition-id": 2, "num-partitions": 3}, str(tmp_path)).max_rank == 0


@pytest.mark.parametrize("config, says", [
    ({}, "this node has no data: start it with --data PATH (node config 'data-path')"),
    ({"partition-id": 0}, "this node has no data"),  # simulated, but the run names no partition directory
    ({"data-path": "d.jsonl", "max-rank": -1}, "node config max-rank = -1 is invalid: use the largest LoRA rank"),
    ({"data-path": "d.jsonl", "max-rank": "big"}, "node config max-rank = 'big' is not an integer"),
    ({"data-path": "d.jsonl", "max-rank": True}, "node config max-rank = True is not an integer"),
    ({"data-path": "d.jsonl", "device": "tpu"}, "node config device = 'tpu' is invalid: use auto, cpu, cuda or cuda:N"),
    ({"partition-id": "first"}, "partition-id = 'first' is not an integer"),
])
def test_bad_node_config_fails_with_a_message_that_names_the_key(config: dict, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        NodeConfig.from_flower(config)
    assert says in str(e.value)


def test_bad_settings_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[simulation\] max-ranks\[2\] = -2 is invalid"):
        write_node_settings(tmp_path, 2, -2)
    node_settings_file(tmp_path, 0).write_text('{"max-rank": 4, "rank": 4}')
    with pytest.raises(ConfigError, match="must hold"):
        NodeConfig.from_flower({"partition-id": 0}, str(tmp_path))
    node_settings_file(tmp_path, 0).write_text("max-rank = 4")
    with pytest.raises(ConfigError, match="is not JSON"):
        NodeConfig.from_flower({"partition-id": 0}, str(tmp_path))
