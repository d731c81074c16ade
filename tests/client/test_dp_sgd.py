"""DP-SGD on the adapter with Opacus: exact when noiseless and unclipped (Opacus #820), private, still learning."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from pollinate.client.data import Example, _collate, poisson_batches
from pollinate.client.dp_sgd import train_dp
from pollinate.client.train import evaluate, train
from pollinate.models import adapter_state, build_peft_model, load_adapter_state
from pollinate.strategies.base import lora_pairs

CPU = torch.device("cpu")


def _labelled(n: int = 64, seed: int = 0) -> list[Example]:
    """Examples whose label is learnable: positive words -> 1, negative words -> 0."""
    rng = np.random.default_rng(seed)
    good, bad, filler = ["good", "great", "fun"], ["bad", "awful", "boring"], ["film", "plot", "actor", "the"]
    out = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(good if label else bad, size=3)) + list(rng.choice(filler, size=4))
        rng.shuffle(words)
        out.append(Example(text=" ".join(words), label=label))
    return out


def _model(cfg):
    model, base = build_peft_model(cfg)
    # A non-zero B (as after a first round): with LoRA's B = 0 init, A has no gradient at all.
    rng = np.random.default_rng(0)
    load_adapter_state(model, {k: v + (0.1 * rng.standard_normal(v.shape).astype(np.float32) if ".lora_B." in k else 0)
                               for k, v in adapter_state(model).items()})
    return model, base


def _fixed_batches(cfg, base, size: int = 8):
    examples = _labelled()
    return itertools.cycle([_collate(examples[i:i + size], base.tokenizer, cfg.model)
                            for i in range(0, len(examples), size)])


def test_noiseless_unclipped_dp_sgd_gives_exactly_the_plain_update(tiny_cfg) -> None:
    """Opacus issue #820: Opacus + PEFT once silently corrupted LoRA updates. z = 0, C = inf must be plain SGD."""
    cfg = tiny_cfg.replace(**{"train.local-steps": 5, "train.precision": "fp32"})  # DP-SGD on a CPU is fp32 always
    plain_model, base = _model(cfg)
    dp_model, _ = _model(cfg)
    start = adapter_state(plain_model)
    torch.manual_seed(1)  # the base model's dropout draws the same masks in both runs
    train(plain_model, _fixed_batches(cfg, base), cfg.train, CPU)
    torch.manual_seed(1)
    train_dp(dp_model, _fixed_batches(cfg, base), cfg.train, CPU, noise_multiplier=0.0, clip_norm=1e9,
             expected_batch_size=8)
    plain, private = adapter_state(plain_model), adapter_state(dp_model)
    assert plain.keys() == private.keys()
    for k in plain:
        assert not np.array_equal(plain[k], start[k]), f"{k} did not train"
        np.testing.assert_allclose(private[k], plain[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_dp_sgd_on_b_only_gives_the_frozen_a_no_gradient_and_no_noise(tiny_cfg) -> None:
    model, base = _model(tiny_cfg)
    before = adapter_state(model)
    batches = poisson_batches(_labelled(), base.tokenizer, tiny_cfg.model, sample_rate=0.125, seed=0)
    train_dp(model, batches, tiny_cfg.train, CPU, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=8,
             train_factors="B")
    after = adapter_state(model)
    for a, b in lora_pairs(before).values():
        assert np.array_equal(before[a], after[a])
        assert not np.array_equal(before[b], after[b])
    # The hooks are gone: the shared model trains and evaluates plainly afterwards.
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    train(model, _fixed_batches(tiny_cfg, base), tiny_cfg.train, CPU)


def test_an_empty_poisson_batch_still_takes_a_noise_only_step(tiny_cfg) -> None:
    model, _ = _model(tiny_cfg)
    before = adapter_state(model)
    train_dp(model, iter([None] * 3), tiny_cfg.train, CPU, noise_multiplier=1.0, clip_norm=1.0,
             expected_batch_size=8, train_factors="B")
    after = adapter_state(model)
    assert any(not np.array_equal(before[b], after[b]) for _, b in lora_pairs(before).values())


def test_dp_training_still_lowers_the_loss(tiny_cfg) -> None:
    cfg = tiny_cfg.replace(**{"train.local-steps": 60, "train.lr": 5e-2})
    model, base = _model(cfg)
    examples = _labelled(128)

    def loss() -> float:
        return evaluate(model, iter([_collate(examples, base.tokenizer, cfg.model)]), CPU).loss

    before = loss()
    torch.manual_seed(0)
    batches = poisson_batches(examples, base.tokenizer, cfg.model, sample_rate=16 / 128, seed=0)
    train_dp(model, batches, cfg.train, CPU, noise_multiplier=0.8, clip_norm=1.0, expected_batch_size=16)
    assert loss() < 0.5 * before
