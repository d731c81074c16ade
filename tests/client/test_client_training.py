"""The client's training honours the server's instructions: frozen factors, the proximal term, the rank."""

from __future__ import annotations

import numpy as np
import torch

from pollinate.client.data import endless_batches
from pollinate.client.train import train
from pollinate.models import adapter_state, build_peft_model, load_adapter_state
from pollinate.proto.instructions import Instructions, is_head
from pollinate.strategies import Request, StrategyContext
from pollinate.strategies.base import lora_pairs
from pollinate.strategies.frozen_factor import FfaLora
from tests.support.adapters import examples

CPU = torch.device("cpu")


def _trained(cfg, **kwargs) -> tuple[dict, dict]:
    model, base = build_peft_model(cfg)
    # A non-zero B (as after a first round): with LoRA's B = 0 init, A has no gradient at all.
    rng = np.random.default_rng(0)
    load_adapter_state(model, {k: v + (0.1 * rng.standard_normal(v.shape).astype(np.float32) if ".lora_B." in k else 0)
                               for k, v in adapter_state(model).items()})
    before = adapter_state(model)
    train(model, endless_batches(examples(0), base.tokenizer, cfg.model, 8, seed=0), cfg.train, CPU, **kwargs)
    return before, adapter_state(model)


def test_training_only_b_leaves_a_bit_identical(tiny_cfg) -> None:
    before, after = _trained(tiny_cfg, train_factors="B")
    for a, b in lora_pairs(before).values():
        assert np.array_equal(before[a], after[a])
        assert not np.array_equal(before[b], after[b])


def test_training_only_a_leaves_b_bit_identical(tiny_cfg) -> None:
    before, after = _trained(tiny_cfg, train_factors="A")
    for a, b in lora_pairs(before).values():
        assert not np.array_equal(before[a], after[a])
        assert np.array_equal(before[b], after[b])


def test_a_frozen_head_stays_bit_identical_while_the_adapter_layers_train(tiny_cfg) -> None:
    cfg = tiny_cfg.replace(**{"train.freeze-head": True})
    before, after = _trained(cfg)
    heads = [k for k in before if is_head(k)]
    assert heads, "the tiny classifier has a head in its adapter state"
    assert all(np.array_equal(before[k], after[k]) for k in heads)
    assert all(not np.array_equal(before[k], after[k]) for k in before if ".lora_B." in k)
    _, trained_head = _trained(tiny_cfg)  # the default trains the head
    assert any(not np.array_equal(before[k], trained_head[k]) for k in heads)


def test_a_strong_proximal_term_keeps_the_adapter_near_what_was_received(tiny_cfg) -> None:
    def drift(mu: float) -> float:
        before, after = _trained(tiny_cfg.replace(**{"train.local-steps": 10}), proximal_mu=mu)
        return sum(float(np.sum((after[k] - before[k]) ** 2)) for k in before)

    assert drift(1e4) < 0.1 * drift(0.0)


def test_a_reply_that_changed_the_frozen_factor_is_rejected(tiny_cfg) -> None:
    model, _ = build_peft_model(tiny_cfg)
    sent = adapter_state(model)
    strategy = FfaLora(StrategyContext(rank=tiny_cfg.adapter.r, alpha=tiny_cfg.adapter.alpha))
    request = strategy.request(sent, tiny_cfg.adapter.r, 1)
    assert request.instructions.train_factors == "B"
    honest = {k: v + (1.0 if ".lora_B." in k else 0.0) for k, v in sent.items()}
    assert strategy.check_update(request, honest) is None
    cheating = {k: v + 1.0 for k, v in sent.items()}
    reason = strategy.check_update(request, cheating)
    assert reason is not None and "lora_A" in reason and "frozen" in reason


def test_a_model_built_at_the_instructed_rank_loads_that_rank(tiny_cfg) -> None:
    model, _ = build_peft_model(tiny_cfg.replace(**{"adapter.r": 2}))
    state = adapter_state(model)
    assert {v.shape[0] for k, v in state.items() if ".lora_A." in k} == {2}
    load_adapter_state(model, state)
    assert Instructions.from_record_values(Instructions(rank=2, round=3).to_record_values()) == \
        Instructions(rank=2, round=3)
    assert isinstance(Request(state).instructions, Instructions)
