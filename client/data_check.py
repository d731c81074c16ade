"""Check a data file against the run before anything starts, and infer what the data decides (class names).

``check_dataset`` reads and validates every row the way a node will (columns, label values, empty texts,
encoding, broken lines) and raises one ``DataError`` that names the file, the row and the fix. ``pollinate data
check``, ``pollinate simulate`` (on the corpus, before Ray starts) and ``pollinate client`` (on the node's file,
before it connects) all call it. ``infer_labels`` is how a simulation maps label names to ids: sorted names,
unless ``data.labels`` lists them; the result travels in the run config, so every node maps alike.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pollinate.client.data import DataError, examples_of, read_rows
from pollinate.proto.run_config import ConfigError, DataConfig, ModelConfig, Scalar


@dataclass(frozen=True)
class DatasetSummary:
    """What a checked data file holds."""

    path: str
    examples: int
    columns: tuple[str, ...]
    classes: dict[str, int]  # class name (or id) -> examples; empty for causal-lm
    groups: int  # distinct values of data.group-field; 0 when the file has no such column


def check_dataset(path: str | Path, data: DataConfig, model: ModelConfig) -> DatasetSummary:
    """Every row of ``path`` checked as a node reads it; a DataError naming the file, row and fix otherwise."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; pass the path of a CSV, JSONL, Parquet, Arrow file or "
                        f"a `datasets` save_to_disk directory")
    rows = read_rows(path)
    return summarise(rows, path, data, model)


def summarise(rows: list[dict[str, object]], path: str | Path, data: DataConfig, model: ModelConfig) -> DatasetSummary:
    """``rows`` (read from ``path``) checked and summarised; raises the first bad row's DataError."""
    if not rows:
        raise DataError(f"{path} holds no examples; add rows below the header")
    examples = examples_of(rows, path, data, model)
    classes: dict[str, int] = {}
    if model.task == "classification":
        counts = Counter(e.label for e in examples)
        classes = {(data.labels[i] if data.labels else str(i)): counts[i] for i in sorted(counts)}
    columns = tuple(rows[0])
    groups = len({str(r.get(data.group_field)) for r in rows}) if data.group_field in rows[0] else 0
    return DatasetSummary(path=str(path), examples=len(examples), columns=columns, classes=classes, groups=groups)


def infer_labels(rows: list[dict[str, object]], data: DataConfig, model: ModelConfig) -> dict[str, Scalar]:
    """The run config keys the corpus decides: ``data.labels`` (sorted names, when its labels are names and the
    run names none) and ``model.num-labels`` (when unset). Flat keys, for ``RunConfig.replace``."""
    if model.task != "classification" or data.labels:
        return {}
    values = [r.get(data.label_field) for r in rows]
    names = {v for v in values if isinstance(v, str) and v.strip() and not _is_integer(v)}
    if names:
        found = sorted({str(v) for v in values if isinstance(v, (str, int)) and not isinstance(v, bool)
                        and str(v).strip()})
        commas = [n for n in found if "," in n]
        if commas:
            raise ConfigError(f"label {commas[0]!r} holds a comma, which data.labels cannot carry (a comma-separated "
                              f"list); rename that class in the {data.label_field!r} column")
        return {"data.labels": ",".join(found)}
    if model.num_labels:
        return {}
    ids = [int(str(v).strip()) for v in values if v is not None and not isinstance(v, bool) and _is_integer(v)]
    return {"model.num-labels": max(2, max(ids, default=1) + 1)}


def _is_integer(value: object) -> bool:
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    try:
        int(str(value).strip())
        return True
    except ValueError:
        return False
