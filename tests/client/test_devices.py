"""GPU nodes, checked without a GPU: device resolution and its refusals, mixed-precision choice, OOM reasons."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml

from pollinate.client.data import endless_batches
from pollinate.client import train as train_module
from pollinate.client.train import NodeOutOfMemory, autocast_dtype, out_of_memory_as_failure, resolve_device, train
from pollinate.models import adapter_state, build_peft_model
from pollinate.proto.run_config import ConfigError, RunConfig, TrainConfig
from tests.support.adapters import examples
from tests.support.paths import REPO


@pytest.mark.parametrize("asked, gpus, expected", [
    ("auto", 0, "cpu"), ("auto", 2, "cuda"), ("cpu", 2, "cpu"), ("cuda:1", 2, "cuda:1"), ("cuda", 1, "cuda")])
def test_a_node_resolves_its_device(asked: str, gpus: int, expected: str) -> None:
    assert resolve_device(asked, cuda_devices=gpus) == torch.device(expected)


@pytest.mark.parametrize("asked, gpus, message", [
    ("cuda:1", 0, "this node has no CUDA device; use --device cpu"),
    ("cuda:2", 2, "this node has 2 CUDA device\\(s\\), cuda:0..cuda:1"),
])
def test_a_device_the_node_lacks_is_refused_with_the_fix(asked: str, gpus: int, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        resolve_device(asked, cuda_devices=gpus)


def test_a_malformed_device_is_refused_at_config_time() -> None:
    with pytest.raises(ConfigError, match="train.device"):
        RunConfig().replace(**{"train.device": "cuda1"})


def test_mixed_precision_is_bf16_where_the_device_has_it_natively_fp16_on_other_gpus_none_on_other_cpus() -> None:
    assert autocast_dtype(torch.device("cpu"), bf16_supported=False) is None  # emulated bf16 is slower than fp32
    assert autocast_dtype(torch.device("cpu"), bf16_supported=True) is torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "fp32", bf16_supported=True) is None
    assert autocast_dtype(torch.device("cuda:0"), "fp32", bf16_supported=True) is None
    assert autocast_dtype(torch.device("cuda:1"), bf16_supported=True) is torch.bfloat16
    assert autocast_dtype(torch.device("cuda:0"), bf16_supported=False) is torch.float16


def test_training_under_cpu_bf16_keeps_fp32_weights_and_learns(monkeypatch, tiny_cfg) -> None:
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: True)  # as on a CPU with AVX512-BF16 / AMX
    seen = []
    monkeypatch.setattr(train_module, "autocast", lambda device, precision="auto": _recording(seen, device, precision))
    model, base = build_peft_model(tiny_cfg)
    before = adapter_state(model)
    cfg = dataclasses.replace(tiny_cfg.train, local_steps=3)
    loss = train(model, endless_batches(examples(0), base.tokenizer, tiny_cfg.model, 8, seed=0), cfg, torch.device("cpu"))
    after = adapter_state(model)
    assert seen == [torch.bfloat16] * 3 and math.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    fp32 = dataclasses.replace(cfg, precision="fp32")
    seen.clear()
    train(model, endless_batches(examples(0), base.tokenizer, tiny_cfg.model, 8, seed=0), fp32, torch.device("cpu"))
    assert seen == [None] * 3


def _recording(seen: list, device: torch.device, precision: str):
    dtype = train_module.autocast_dtype(device, precision)
    seen.append(dtype)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def test_an_unknown_precision_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="train.precision.*'auto'.*'fp32'"):
        RunConfig().replace(**{"train.precision": "fp16"})


def test_out_of_memory_becomes_a_node_failure_whose_reason_names_the_fixes() -> None:
    with pytest.raises(NodeOutOfMemory) as caught:
        with out_of_memory_as_failure(torch.device("cpu"), TrainConfig(batch_size=32)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nlong allocator report")
    reason = str(caught.value)
    assert "Tried to allocate 2.00 GiB" in reason and "allocator report" not in reason
    assert "train.batch-size (now 32)" in reason and "train.gradient-checkpointing = true" in reason
    assert "model.quantization = 'nf4'" in reason


def test_gradient_checkpointing_trains_the_same_adapter_step() -> None:
    cfg = RunConfig().replace(**{"model.name": "tiny-llama", "model.task": "causal-lm", "train.local-steps": 1,
                                 "adapter.target-modules": "q_proj,v_proj", "adapter.dropout": 0.0})
    results = []
    for checkpointing in (False, True):
        model, base = build_peft_model(cfg)
        data = endless_batches(_instructions(), base.tokenizer, cfg.model, 4, seed=0)
        loss = train(model, data, dataclasses.replace(cfg.train, gradient_checkpointing=checkpointing),
                     torch.device("cpu"))
        results.append((loss, adapter_state(model)))
    (plain_loss, plain), (ckpt_loss, ckpt) = results
    assert abs(plain_loss - ckpt_loss) < 1e-5
    assert all(np.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)


def test_the_compose_gpu_profile_runs_a_node_on_a_gpu_with_its_own_data() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    gpu = services["gpu-node"]
    assert gpu["profiles"] == ["gpu"] and gpu["command"][-2:] == ["--device", "cuda:0"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    data = [v for v in gpu["volumes"] if v.endswith(":/data:ro")]
    assert data and all(data[0] not in s.get("volumes", []) for n, s in services.items() if n != "gpu-node")


def _instructions():
    from pollinate.client.data import Example

    return [Example(text=e.text, response="positive", turns=(("user", e.text),)) for e in examples(0)]
