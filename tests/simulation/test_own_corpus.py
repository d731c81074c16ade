"""A corpus the project has never seen runs as-is (issue #17): class names as labels, split by a `speaker` column.

One real `pollinate simulate` (the tiny model, 2 nodes, 1 round): the names are mapped to sorted ids and stored
with the run, each node holds whole speakers, the global test set measures the round, and `transformers.pipeline`
on the exported adapter prints names.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from peft import PeftModel
from transformers import pipeline

from pollinate.client.data import read_examples
from pollinate.models import load_base_model
from pollinate.proto.node_config import partition_file
from pollinate.proto.run_config import RunConfig
from tests.support.commands import simulated_run

NAMES = ("democrat", "republican")


def _speeches(path: Path) -> Path:
    """40 speeches by 8 speakers, each speaker always of one party; labels are the parties' names."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "speaker"])
        for i in range(40):
            party = NAMES[i % 8 < 3]
            writer.writerow([f"speech {i}: {'lower taxes' if party == 'republican' else 'public health'}", party,
                             f"speaker-{i % 8}"])
    return path


def test_string_labels_and_a_speaker_column_run_as_is(tmp_path: Path) -> None:
    corpus = _speeches(tmp_path / "speeches.csv")
    done, store, run = simulated_run("tiny.toml", tmp_path, "--corpus", str(corpus), "--clients", "2", "--rounds",
                                     "1", "--set", "data.partitioning=natural", "--set", "data.group-field=speaker",
                                     "--set", "data.test-fraction=0.1")
    assert run.status == "completed"
    # The global test set: 4 held-out speeches, the round's adapter measured on them and stored.
    [stored] = store.rounds(run.id)
    assert stored.test is not None and 0 <= stored.test.macro_f1 <= 1
    said = " ".join(done.stdout.split())
    assert (f"final adapter on the global test set (data.test-fraction = 0.1, no node trained on it): accuracy "
            f"{stored.test.accuracy:.4f}, macro-F1 {stored.test.macro_f1:.4f}") in said, said[-2000:]
    assert "classes (data.labels): 0 = democrat, 1 = republican" in said
    cfg = RunConfig.from_flat(run.config)  # what the run stored: the mapping every node used
    assert cfg.data.labels == NAMES and cfg.model.num_labels == 2
    speakers = []
    for i in range(2):
        part = partition_file(cfg.data.partition_dir, i)
        speakers.append({json.loads(line)["speaker"] for line in part.read_text().splitlines()})
        assert {e.label for e in read_examples(part, cfg.data, cfg.model)} <= {0, 1}
    assert not speakers[0] & speakers[1]  # whole speakers per node (the held-out 4 speeches may take one away)
    exported = json.loads((Path(run.adapter_dir) / "config.json").read_text())
    assert exported["id2label"] == {"0": "democrat", "1": "republican"}
    assert exported["label2id"] == {"democrat": 0, "republican": 1}
    base = load_base_model(cfg.model, cfg.seed, cfg.data.labels)
    classify = pipeline("text-classification", model=PeftModel.from_pretrained(base.model, run.adapter_dir),
                        tokenizer=base.tokenizer)
    [answer] = classify("lower taxes for every family")
    assert answer["label"] in NAMES
