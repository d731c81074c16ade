"""QLoRA: a bitsandbytes NF4/int8 base on CPU, LoRA on top; the adapter on the wire and the export are plain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict

from pollinate.client.data import endless_batches
from pollinate.client.train import train
from pollinate.models import adapter_state, build_peft_model, load_base_model
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.server.store import RoundStore
from tests.support.adapters import examples
from tests.support.inprocess import run_in_process

bnb = pytest.importorskip("bitsandbytes", reason="the QLoRA tests need bitsandbytes (in the [test] extra)")

TINY_LLAMA = {"model.name": "tiny-llama", "model.task": "causal-lm", "model.max-length": 48,
              "adapter.target-modules": "q_proj,v_proj", "data.dataset": "rotten-tomatoes-instruct",
              "data.label-words": "negative,positive", "train.eval-max-new-tokens": 2}


def _quantised_layers(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def test_an_nf4_run_trains_aggregates_and_exports_an_adapter_that_loads_on_the_unquantised_base(tmp_path) -> None:
    run_id = run_in_process("tiny.toml", tmp_path, clients=2, **TINY_LLAMA, **{
        "model.quantization": "nf4", "federation.rounds": 2, "train.local-steps": 2, "train.eval-max-examples": 16})
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    run = store.run(run_id)
    assert run.status == "completed", run.error
    rounds = store.rounds(run_id)
    assert [r.status for r in rounds] == ["completed", "completed"]
    assert all(r.train_loss is not None and np.isfinite(r.train_loss) for r in rounds)
    # generation-based evaluation, summed over the nodes, is stored with every round
    assert {"gen-exact-match", "gen-accuracy", "gen-macro-f1", "perplexity", "token-accuracy"} <= set(rounds[-1].metrics)
    assert rounds[-1].eval_accuracy == rounds[-1].metrics["gen-accuracy"]
    final = store.adapter(run_id, 2).tensors()

    cfg = RunConfig().replace(**TINY_LLAMA, **{"model.quantization": "nf4", "adapter.r": 4, "adapter.alpha": 8.0})
    quantised, _ = build_peft_model(cfg)
    assert _quantised_layers(quantised) == {"Linear4bit"}, "the node's base was not quantised"
    plain = cfg.replace(**{"model.quantization": "none"})
    unquantised, _ = build_peft_model(plain)
    # The same adapter tensors travel, whatever the base: names, shapes and the seeded initial values.
    initial = adapter_state(quantised)
    assert {k: v.shape for k, v in initial.items()} == {k: v.shape for k, v in adapter_state(unquantised).items()}
    assert all(np.array_equal(initial[k], v) for k, v in adapter_state(unquantised).items())
    assert any(not np.array_equal(final[k], initial[k]) for k in final), "two rounds changed nothing"

    base = load_base_model(plain.model, plain.seed).model  # no bitsandbytes layer in it
    assert not _quantised_layers(base)
    reloaded = PeftModel.from_pretrained(base, str(Path(run.adapter_dir)))
    loaded = {k: v.numpy() for k, v in get_peft_model_state_dict(reloaded).items()}
    assert sorted(loaded) == sorted(final)
    assert all(np.array_equal(loaded[k], final[k]) for k in final)


def test_an_int8_base_trains_lora_with_finite_gradients_on_cpu(tmp_path) -> None:
    cfg = RunConfig().replace(**TINY_LLAMA, **{"model.quantization": "int8", "adapter.r": 4,
                                              "train.local-steps": 2, "train.batch-size": 4})
    model, base = build_peft_model(cfg)
    assert _quantised_layers(model) == {"Linear8bitLt"}
    before = adapter_state(model)
    loss = train(model, endless_batches(_instructions(), base.tokenizer, cfg.model, 4, seed=0), cfg.train,
                 torch.device("cpu"))
    assert np.isfinite(loss)
    after = adapter_state(model)
    assert any(not np.array_equal(after[k], before[k]) for k in after if "lora_B" in k), "B was not trained"


def test_quantisation_of_an_encoder_classifier_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="model.task = 'causal-lm'"):
        RunConfig().replace(**{"model.name": "tiny-bert", "model.quantization": "nf4"})
    with pytest.raises(ConfigError, match="none, nf4, int8"):
        RunConfig().replace(**{"model.quantization": "fp4"})


def _instructions():
    from pollinate.client.data import Example

    return [Example(text=f"### Instruction:\n{e.text}\n\n### Response:\n", response="positive") for e in examples(0)]
