"""Split a corpus across simulated nodes with Flower Datasets' partitioners; one JSONL file per node.

``iid`` (uniform), ``dirichlet`` (label skew, Dirichlet(alpha) per label; Hsu et al. 2019)
and ``natural`` (whole groups of ``data.group-field``, e.g. all reviews of a movie, on one node). The files are
what each simulated ClientApp reads, exactly as a deployed node reads its own data file.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, GroupedNaturalIdPartitioner, IidPartitioner, Partitioner

from pollinate.proto.node_config import partition_file
from pollinate.proto.run_config import ConfigError, DataConfig


def make_partitioner(data: DataConfig, num_partitions: int, rows: list[dict[str, object]], seed: int) -> Partitioner:
    if data.partitioning == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if data.partitioning == "dirichlet":
        if data.label_field not in rows[0]:
            raise ConfigError(f"data.partitioning = 'dirichlet' splits by label, but the corpus has no "
                              f"{data.label_field!r} column (set data.label-field)")
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=data.label_field, alpha=data.dirichlet_alpha,
                                    min_partition_size=10, self_balancing=True, seed=seed)
    if data.group_field not in rows[0]:
        raise ConfigError(f"data.partitioning = 'natural' needs a {data.group_field!r} column (e.g. the movie, "
                          f"hospital or speaker); the corpus has {sorted(rows[0])}: set data.group-field to one")
    groups = len({str(r[data.group_field]) for r in rows})
    if groups < num_partitions:
        raise ConfigError(f"data.partitioning = 'natural' needs at least {num_partitions} groups, the corpus has "
                          f"{groups}; use fewer clients or another partitioning")
    return GroupedNaturalIdPartitioner(partition_by=data.group_field, group_size=groups // num_partitions,
                                       mode="allow-bigger", sort_unique_ids=True)


def write_partitions(rows: list[dict[str, object]], data: DataConfig, num_partitions: int, seed: int,
                     directory: Path) -> list[int]:
    """Write ``partition-<i>.jsonl`` for every node; returns each partition's size."""
    if len(rows) < 2 * num_partitions:
        raise ConfigError(f"the corpus has {len(rows)} examples, too few for {num_partitions} clients")
    partitioner = make_partitioner(data, num_partitions, rows, seed)
    partitioner.dataset = Dataset.from_list(rows).shuffle(seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i in range(num_partitions):
        part = partitioner.load_partition(i)
        with partition_file(directory, i).open("w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, default=str) + "\n")  # a Parquet date travels as text
        sizes.append(len(part))
    return sizes
