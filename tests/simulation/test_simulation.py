"""End to end on Flower's Simulation Engine through the real CLI: what the round store holds afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel

from pollinate.proto.node_config import partition_file
from pollinate.client.data import batches, read_examples, split
from pollinate.client.train import evaluate
from pollinate.models import adapter_state, build_peft_model, load_base_model
from pollinate.proto.adapter_record import payload_bytes, to_record
from pollinate.proto.run_config import RunConfig
from pollinate.simulations.scenario import DEFAULT_SCENARIO, load_scenario
from pollinate.server.store import sha256
from tests.support.commands import simulated_run


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("honest")
    done, store, run = simulated_run("tiny.toml", workdir)
    return done, store, run


def test_the_run_is_fully_recorded(honest) -> None:
    _, store, run = honest
    assert run.status == "completed" and run.strategy == "fedavg" and run.ended_at is not None
    rounds = store.rounds(run.id)
    assert [r.number for r in rounds] == [1, 2, 3]
    assert all(r.participants == 4 and r.accepted == 4 for r in rounds)
    train = [u for u in store.client_updates(run.id) if u.phase == "train"]
    assert len(train) == 12 and {u.status for u in train} == {"accepted"}
    assert len({u.node_id for u in train}) == 4
    adapters = [store.adapter(run.id, r.number) for r in rounds]  # each checked against its sha256 as it is read
    assert [a.number for a in adapters] == [1, 2, 3]
    assert all(sha256(a.data) == a.sha256 == r.adapter_sha256 for a, r in zip(adapters, rounds))
    assert len({a.sha256 for a in adapters}) == 3  # the adapter moved every round


def test_each_upload_costs_the_adapter_parameters_times_element_size(honest) -> None:
    _, store, run = honest
    cfg = RunConfig.from_flat(run.config)
    model, _ = build_peft_model(cfg)
    adapter = adapter_state(model)
    framing = sum(len(name) for name in adapter)  # the key names; there is no per-tensor header
    expected = sum(t.size for t in adapter.values()) * 4
    uploads = [u.bytes_up for u in store.client_updates(run.id) if u.phase == "train"]
    assert uploads == [expected + framing] * 12
    # The upload is the adapter alone: a small fraction of the model.
    assert expected < 0.05 * sum(p.numel() * 4 for p in model.parameters())


def test_the_default_scenario_upload_is_within_one_percent_of_its_parameter_bytes() -> None:
    cfg, _ = load_scenario(DEFAULT_SCENARIO)
    model, _ = build_peft_model(cfg)
    adapter = adapter_state(model)
    params = sum(t.size for t in adapter.values())
    sent = payload_bytes(to_record(adapter, cfg.federation.wire_dtype))
    assert params * 4 <= sent <= params * 4 * 1.01


def test_the_exported_adapter_reproduces_the_final_federated_evaluation(honest) -> None:
    _, store, run = honest
    cfg = RunConfig.from_flat(run.config)
    final = store.rounds(run.id)[-1]
    base = load_base_model(cfg.model, cfg.seed)
    model = PeftModel.from_pretrained(base.model, run.adapter_dir)
    losses, hits, counts = [], [], []
    partitions = sorted(Path(cfg.data.partition_dir).glob("partition-*.jsonl"))
    assert len(partitions) == 4
    for i in range(len(partitions)):
        _, eval_set = split(read_examples(partition_file(cfg.data.partition_dir, i), cfg.data, cfg.model),
                            cfg.data.eval_fraction, cfg.seed)
        result = evaluate(model, batches(eval_set[: cfg.train.eval_max_examples], base.tokenizer, cfg.model, 64,
                                         None), __import__("torch").device("cpu"))
        losses.append(result.loss * result.num_examples)
        hits.append(result.accuracy * result.num_examples)
        counts.append(result.num_examples)
    assert abs(sum(losses) / sum(counts) - final.eval_loss) < 1e-4
    assert abs(sum(hits) / sum(counts) - final.eval_accuracy) < 1e-4
    # ...and the stored round-3 adapter is the exported one.
    stored = store.adapter(run.id, 3).tensors()
    exported = adapter_state(model)
    assert all(np.array_equal(stored[k], exported[k]) for k in stored)


def test_progress_and_summary_are_printed(honest) -> None:
    done, store, run = honest
    out = done.stdout
    for text in ("round 0: eval loss", "round 1/3: 4/4 updates accepted", "round 3/3", "KiB up/client",
                 f"run {run.id}", str(run.adapter_dir)):
        assert text in out.replace("\n", ""), text
    # Not a terminal: the round lines only, no progress control codes; no line broken mid-phrase.
    assert "\x1b" not in out and "\r" not in out
    assert any(line.startswith("simulating 4 clients (") and line.endswith("3 rounds of fedavg")
               for line in out.splitlines())
    assert f"plots and a report page: pollinate report {run.id} --db {store.url}" in out.splitlines()
    # The Simulation Engine's routine end of each ClientApp actor is not a warning to the user.
    assert "Manually terminating" not in done.stdout + done.stderr


def test_runs_lists_the_run_and_its_rounds(honest) -> None:
    done, store, run = honest
    listed = subprocess.run([sys.executable, "-m", "pollinate.cli", "runs", "--db", store.url, "--json"],
                            capture_output=True, text=True, timeout=120)
    [row] = json.loads(listed.stdout)
    assert row["id"] == run.id and row["status"] == "completed"
    assert [r["number"] for r in row["rounds"]] == [1, 2, 3]
    assert row["rounds"][-1]["eval_accuracy"] == store.rounds(run.id)[-1].eval_accuracy


def test_bad_uploads_are_rejected_recorded_and_the_rounds_go_on(tmp_path: Path) -> None:
    done, store, run = simulated_run("faulty.toml", tmp_path)
    assert run.status == "completed"
    rounds = store.rounds(run.id)
    assert [(r.participants, r.accepted) for r in rounds] == [(5, 2), (5, 2)]
    for number in (1, 2):
        rejected = sorted(u.reason for u in store.client_updates(run.id, number)
                          if u.phase == "train" and u.status == "rejected")
        assert len(rejected) == 3
        assert any("NaN/Inf" in r for r in rejected)
        assert any("expected" in r and "has shape" in r for r in rejected)
        assert any("unknown tensor(s) ['base_model.model.bert.embeddings.word_embeddings.weight']" in r
                   for r in rejected)
    assert "train rejected" in done.stdout
