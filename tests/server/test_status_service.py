"""pollinate's status service over real gRPC on 127.0.0.1, reading a real round store filled with the
adapter tensors of a tiny PEFT model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from peft import PeftModel
from pollinate.models import adapter_state, build_peft_model, load_base_model
from pollinate.cli import main
from pollinate.proto import pollinate_status_pb2 as pb
from pollinate.server.status_client import DownloadError, assemble, connect, download
from pollinate.server.status_service import StatusServer, serve_status
from pollinate.server.store import ClientRecord, RoundRecord, RoundStore
from tests.support.stores import damage_stored_blob

NODE = 2**64 - 5  # Flower node ids are unsigned 64-bit


def _record(number: int) -> RoundRecord:
    clients = [ClientRecord(node_id=NODE, phase="train", status="accepted", rank=4, num_examples=32,
                            bytes_up=9000, bytes_down=9000, metrics={"train-loss": 0.6}),
               ClientRecord(node_id=11, phase="train", status="rejected", reason="tensor 'x' holds 1 NaN/Inf"),
               ClientRecord(node_id=NODE, phase="evaluate", status="accepted", num_examples=16,
                            metrics={"eval-loss": 0.5, "eval-accuracy": float("nan")})]
    return RoundRecord(number=number, participants=2, accepted=1, train_loss=0.6, eval_loss=0.5, eval_accuracy=None,
                       bytes_up=9000, bytes_down=18000, duration_s=1.25, clients=clients)


def _adapter(cfg, number: int) -> dict[str, np.ndarray]:
    """The tiny model's real adapter tensors, moved off their init so B is not zero."""
    model, _ = build_peft_model(cfg)
    rng = np.random.default_rng(number)
    return {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in adapter_state(model).items()}


@pytest.fixture
def service(store_url: str) -> Iterator[tuple[StatusServer, RoundStore]]:
    server = serve_status(store_url, "127.0.0.1", 0, poll_interval_s=0.05)
    try:
        yield server, RoundStore(store_url)
    finally:
        server.stop()


def _filled(store: RoundStore, cfg, rounds: int = 2) -> int:
    run_id = store.start_run(cfg.to_flat(), "fedavg", cfg.model.name, {"eval-loss": 0.7, "eval-accuracy": 0.5})
    for n in range(1, rounds + 1):
        store.record_round(run_id, _record(n), _adapter(cfg, n))
    return run_id


def test_status_lists_runs_rounds_and_the_client_ledger(service, tiny_cfg, capsys) -> None:
    server, store = service
    run_id = _filled(store, tiny_cfg)
    stub = connect(f"127.0.0.1:{server.port}")

    runs = stub.ListRuns(pb.ListRunsRequest(), timeout=30).runs
    assert [(r.id, r.status, r.rounds_stored) for r in runs] == [(run_id, "running", 2)]
    assert json.loads(runs[0].config_json)["adapter.r"] == 4
    run = stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=30)
    assert [r.number for r in run.rounds] == [1, 2]
    stored = store.adapter(run_id, 2)
    assert (run.rounds[1].adapter_sha256, run.rounds[1].adapter_bytes) == (stored.sha256, len(stored.data))
    assert run.rounds[0].train_loss == pytest.approx(0.6) and not run.rounds[0].HasField("eval_accuracy")
    ledger = stub.GetRound(pb.GetRoundRequest(run_id=run_id, round=2), timeout=30).clients
    assert [(c.node_id, c.phase, c.status) for c in ledger] == [
        (str(NODE), "train", "accepted"), ("11", "train", "rejected"), (str(NODE), "evaluate", "accepted")]
    assert ledger[0].rank == 4 and not ledger[1].HasField("rank")
    assert ledger[1].reason == "tensor 'x' holds 1 NaN/Inf"
    assert dict(ledger[2].metrics) == {"eval-loss": 0.5}  # NaN was stored as null, which is left out

    assert main(["status", "--coordinator", f"127.0.0.1:{server.port}", str(run_id), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run"]["id"] == str(run_id) and shown["round"]["number"] == 2  # proto JSON: uint64 as string
    assert [c["status"] for c in shown["round"]["clients"]] == ["accepted", "rejected", "accepted"]


def test_a_follower_sees_each_round_as_it_is_recorded_then_the_end_of_the_run(service, tiny_cfg) -> None:
    server, store = service
    run_id = _filled(store, tiny_cfg)
    stub = connect(f"127.0.0.1:{server.port}")
    events = stub.WatchRun(pb.WatchRunRequest(run_id=run_id, after_round=0), timeout=60)
    assert [next(events).round.number for _ in range(2)] == [1, 2]  # the stream is open and caught up

    store.record_round(run_id, _record(3), _adapter(tiny_cfg, 3))  # another writer, as the ServerApp is
    third = next(events)
    assert (third.kind, third.round.number, len(third.round.clients)) == (pb.RunEvent.ROUND_RECORDED, 3, 3)
    store.finish_run(run_id, "completed", adapter_dir="/srv/run/adapter")
    finished = next(events)
    assert (finished.kind, finished.run.status, finished.run.rounds_stored) == (pb.RunEvent.RUN_FINISHED,
                                                                                "completed", 3)
    assert list(events) == []  # the server ends the stream


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_download_is_byte_identical_and_loads_with_peft(service, tiny_cfg, tmp_path: Path) -> None:
    server, store = service
    run_id = _filled(store, tiny_cfg)
    stub = connect(f"127.0.0.1:{server.port}")
    out, header = download(stub, run_id, 0, tmp_path / "adapter", chunk_bytes=4096)  # 0: the last round
    assert header.round == 2 and header.total_bytes > 2 * 4096  # three chunks or more
    stored = store.adapter(run_id, 2)
    assert (out / "adapter_model.safetensors").read_bytes() == stored.data and header.sha256 == stored.sha256

    base = load_base_model(tiny_cfg.model, tiny_cfg.seed).model
    model = PeftModel.from_pretrained(base, str(out))
    loaded = adapter_state(model)
    expected = stored.tensors()
    assert loaded.keys() == expected.keys()
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 2)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_round_stored_at_a_larger_rank_downloads_at_that_rank(service, tiny_cfg, tmp_path: Path) -> None:
    """flora / fedex-lora store one LoRA of a larger rank than adapter.r (the merged part folded in)."""
    server, store = service
    run_id = store.start_run(tiny_cfg.to_flat(), "flora", tiny_cfg.model.name)
    store.record_round(run_id, _record(1), _adapter(tiny_cfg.replace(**{"adapter.r": 12}), 1))
    out, _ = download(connect(f"127.0.0.1:{server.port}"), run_id, 1, tmp_path / "flora")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 12
    model = PeftModel.from_pretrained(load_base_model(tiny_cfg.model, tiny_cfg.seed).model, str(out))
    expected = store.adapter(run_id, 1).tensors()
    assert all(np.array_equal(adapter_state(model)[k], v) for k, v in expected.items())


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_unknown_runs_and_rounds_are_not_found_and_say_what_exists(service, tiny_cfg, tmp_path: Path,
                                                                   capsys) -> None:
    server, store = service
    run_id = _filled(store, tiny_cfg)
    stub = connect(f"127.0.0.1:{server.port}")
    with pytest.raises(grpc.RpcError) as e:
        stub.GetRun(pb.GetRunRequest(run_id=run_id + 7), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and f"holds runs {run_id}" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.DownloadAdapter(pb.DownloadAdapterRequest(run_id=run_id, round=9), timeout=30))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "stored rounds are 1..2" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.WatchRun(pb.WatchRunRequest(run_id=run_id + 7), timeout=30))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    out = tmp_path / "never"
    code = main(["download", "--coordinator", f"127.0.0.1:{server.port}", str(run_id), "--round", "5", str(out)])
    assert code == 2 and "NOT_FOUND" in capsys.readouterr().out and not out.exists()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_damaged_bytes_are_refused_and_nothing_is_written(service, tiny_cfg, tmp_path: Path) -> None:
    server, store = service
    run_id = _filled(store, tiny_cfg, rounds=1)
    stub = connect(f"127.0.0.1:{server.port}")
    chunks = list(stub.DownloadAdapter(pb.DownloadAdapterRequest(run_id=run_id, round=1, chunk_bytes=4096)))
    chunks[2].data = chunks[2].data[:-1] + bytes([chunks[2].data[-1] ^ 1])  # one bit flipped on the way
    with pytest.raises(DownloadError, match="fails its checksum"):
        assemble(chunks)
    with pytest.raises(DownloadError, match="arrived with"):
        assemble(chunks[:-1])

    damage_stored_blob(store.engine, "adapters")  # the stored copy damaged: the server refuses to send it
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with pytest.raises(grpc.RpcError) as e:
        download(stub, run_id, 1, downloads / "adapter")
    assert e.value.code() == grpc.StatusCode.DATA_LOSS and "sha256" in e.value.details()
    assert list(downloads.iterdir()) == []  # no directory, no partial files
