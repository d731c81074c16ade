"""Bring your own data (issue #17): every format reads the same examples, columns and classes are named by the
run config, class names map to ids the same way everywhere, and a bad file is one line naming file, row and fix.

All on real files written by the real libraries (csv, json, datasets/pyarrow) and read by the node's reader.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from pollinate.client.data import DataError, read_examples
from pollinate.client.data_check import check_dataset, infer_labels
from pollinate.proto.run_config import ConfigError, DataConfig, ModelConfig, RunConfig
from tests.support.commands import pollinate

# Speeches: names as labels, their own column names, and a speaker to split by.
ROWS = [{"sentence": f"speech {i} on {'taxes' if i % 3 else 'health care'}",
         "party": "republican" if i % 3 else "democrat", "speaker": f"s{i % 4}"} for i in range(12)]
COLUMNS = {"data.text-field": "sentence", "data.label-field": "party"}


def _cfg(**flat: object) -> RunConfig:
    return RunConfig.from_flat({**COLUMNS, **flat})


def _write_every_format(directory: Path, rows: list[dict[str, object]]) -> list[Path]:
    """The rows as CSV, JSONL, Parquet, Arrow (IPC stream), and a save_to_disk directory (a DatasetDict too)."""
    with (directory / "d.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (directory / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(directory / "d.parquet"))
    with pa.OSFile(str(directory / "d.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, dataset.data.table.schema) as writer:
        writer.write_table(dataset.data.table)
    dataset.save_to_disk(str(directory / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(directory / "saved-dict"))
    return [directory / n for n in ("d.csv", "d.jsonl", "d.parquet", "d.arrow", "saved", "saved-dict")]


def test_every_format_reads_the_same_examples_under_the_configured_column_names(tmp_path: Path) -> None:
    cfg = _cfg(**{"data.labels": "democrat,republican"})
    read = {path.name: read_examples(path, cfg.data, cfg.model) for path in _write_every_format(tmp_path, ROWS)}
    expected = [(r["sentence"], 0 if r["party"] == "democrat" else 1) for r in ROWS]
    for name, examples in read.items():
        assert [(e.text, e.label) for e in examples] == expected, name


def test_causal_lm_columns_are_configurable(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"question": "2 + 2?", "answer": "4"}) + "\n")
    cfg = RunConfig.from_flat({"model.name": "tiny-llama", "model.task": "causal-lm",
                               "data.instruction-field": "question", "data.response-field": "answer"})
    [example] = read_examples(path, cfg.data, cfg.model)
    assert "2 + 2?" in example.text and example.response == "4"
    with pytest.raises(DataError, match="row 1 lacks 'instruction' or 'response'.*data.instruction-field"):
        read_examples(path, DataConfig(), cfg.model)


def test_names_map_to_sorted_ids_unless_data_labels_orders_them() -> None:
    cfg = _cfg()
    inferred = cfg.replace(**infer_labels(ROWS, cfg.data, cfg.model))
    assert inferred.data.labels == ("democrat", "republican") and inferred.model.num_labels == 2
    assert infer_labels(ROWS, _cfg(**{"data.labels": "republican,democrat"}).data, cfg.model) == {}
    explicit = _cfg(**{"data.labels": "republican,democrat,green"})
    assert explicit.model.num_labels == 3  # inferred from data.labels when unset
    with pytest.raises(ConfigError, match="model.num-labels = 2 is invalid: data.labels names 3 classes"):
        _cfg(**{"data.labels": "a,b,c", "model.num-labels": 2})


def test_integer_labels_infer_the_number_of_classes() -> None:
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": "4"}]
    cfg = RunConfig()
    assert cfg.model.num_labels == 0 and cfg.model.classes == 2
    assert infer_labels(rows, cfg.data, cfg.model) == {"model.num-labels": 5}
    assert infer_labels(rows, cfg.data, ModelConfig(num_labels=7)) == {}


def test_a_node_refuses_a_label_outside_the_runs_classes_with_its_row(tmp_path: Path) -> None:
    path = tmp_path / "node.csv"
    path.write_text("sentence,party\nlower taxes,republican\nmore parks,green\n")
    cfg = _cfg(**{"data.labels": "democrat,republican"})
    with pytest.raises(DataError) as refused:
        read_examples(path, cfg.data, cfg.model)
    assert str(refused.value) == (f"{path} row 2: label 'green' is not one of the run's classes ['democrat', "
                                  f"'republican'] (data.labels); fix the row, or add the class to data.labels on "
                                  f"the coordinator")
    # Names, but the run maps none: the node must not invent its own mapping.
    with pytest.raises(DataError, match=r"row 1: label 'republican' is a name, but the run has no class names"):
        read_examples(path, _cfg().data, _cfg().model)


BAD = {  # file name -> (bytes, what the one line says after the file name)
    "broken.csv": (b"text,label\nfine,0\ntoo,many,fields\n", "row 2 (line 3): more fields than the header's 2"),
    "short.csv": (b"text,label,group\nfine,0,a\nshort,1\n", "row 2 (line 3): fewer fields than the header's 3"),
    "empty.csv": (b"text,label\nfine,0\n   ,1\n", "row 2: 'text' is empty; remove the row or fill in its text"),
    "latin1.csv": (b"text,label\nfine,0\ncaf\xe9,1\n", "line 3: byte 0xe9 is not UTF-8 text"),
    "columns.csv": (b"body,label\nfine,0\n", "row 1 lacks columns 'text' and 'label'; set data.text-field"),
    "nothing.csv": (b"text,label\n", "holds no examples"),
    "junk.parquet": (b"not parquet at all", "not a readable CSV, JSONL, Parquet, Arrow"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_file_is_one_line_naming_file_row_and_fix(name: str, tmp_path: Path, capsys) -> None:
    data, says = BAD[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as refused:
        check_dataset(path, DataConfig(), ModelConfig())
    assert says in str(refused.value) and str(path) in str(refused.value)
    code, said = pollinate(capsys, "data", "check", str(path))
    assert code == 2 and said.startswith(f"error: {path}") and says in said, said
    assert "\n" not in str(refused.value)


def test_data_check_summarises_a_good_file_as_a_simulation_would_read_it(tmp_path: Path, capsys) -> None:
    [csv_path, *_] = _write_every_format(tmp_path, ROWS)
    code, said = pollinate(capsys, "data", "check", str(csv_path), "--set", "data.text-field=sentence", "--set",
                           "data.label-field=party", "--set", "data.partitioning=natural", "--set",
                           "data.group-field=speaker")
    assert code == 0, said
    assert "12 examples" in said and "2 classes (data.labels = democrat,republican): democrat 4, republican 8" in said
    assert "4 distinct 'speaker' values" in said
    code, said = pollinate(capsys, "data", "check", str(csv_path), "--set", "data.text-field=sentence", "--set",
                           "data.label-field=party", "--set", "data.partitioning=natural")
    assert code == 2 and "needs a 'group' column" in said and "set data.group-field" in said, said


def test_a_node_with_class_names_passes_its_start_up_check_and_a_broken_row_does_not(tmp_path: Path) -> None:
    # `pollinate client` checks its file before it connects, without the run's data.labels: names are the run's
    # to map (on the first message), but every row must still read.
    from pollinate.client.node import check_data

    good = tmp_path / "names.csv"
    good.write_text("text,label\ngreat film,positive\ndull plot,negative\nfine acting,positive\n")
    assert check_data(good) == 3
    bad = tmp_path / "empty-text.csv"
    bad.write_text("text,label\ngreat film,positive\n ,negative\n")
    with pytest.raises(DataError, match=r"empty-text.csv row 2: 'text' is empty"):
        check_data(bad)
