"""FedAvg works for every PEFT method whose trainable tensors PEFT saves: train, average, load, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel

from pollinate.client.data import batches, endless_batches
from pollinate.client.train import evaluate, train
from pollinate.models import adapter_state, build_peft_model, export_adapter, load_adapter_state, load_base_model
from pollinate.strategies import ClientUpdate, build
from tests.support.adapters import examples

METHODS = {
    "lora": "",
    "dora": "",
    "ia3": '{"feedforward_modules": []}',
    "lokr": "",
    "miss": "",
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fedavg_round_trip_for_peft_method(method: str, tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg.replace(**{"adapter.method": method, "adapter.options": METHODS[method]})
    model, base = build_peft_model(cfg)
    initial = adapter_state(model)
    cpu = torch.device("cpu")

    updates = []
    for client in range(2):
        load_adapter_state(model, initial)
        train(model, endless_batches(examples(client), base.tokenizer, cfg.model, 8, seed=client), cfg.train, cpu)
        tensors = adapter_state(model)
        assert any(not np.array_equal(tensors[k], initial[k]) for k in initial), "training changed nothing"
        updates.append(ClientUpdate(node_id=client, tensors=tensors, num_examples=10 * (client + 1)))

    global_adapter = build(cfg).aggregate(initial, updates, 1)
    for name in initial:
        expected = (updates[0].tensors[name] * 10 + updates[1].tensors[name] * 20) / 30
        np.testing.assert_allclose(global_adapter[name], expected, rtol=1e-5, atol=1e-6)

    load_adapter_state(model, global_adapter)
    assert all(np.array_equal(adapter_state(model)[k], v) for k, v in global_adapter.items())
    eval_set = examples(99, 16)
    ours = evaluate(model, batches(eval_set, base.tokenizer, cfg.model, 8, None), cpu)

    directory = export_adapter(model, global_adapter, tmp_path / method)
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, cfg.seed).model, str(directory))
    theirs = evaluate(reloaded, batches(eval_set, base.tokenizer, cfg.model, 8, None), cpu)
    assert abs(ours.loss - theirs.loss) < 1e-5 and ours.accuracy == theirs.accuracy
