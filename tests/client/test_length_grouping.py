"""Training batches grouped by token length (``train.group-by-length``), evaluation in length order, and a
simulated run that repeats itself: what makes the default simulation faster must not change what it learns."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pollinate.client.data import Example, batch_order, batches, token_lengths
from pollinate.client.train import evaluate
from pollinate.models import build_peft_model, load_base_model
from pollinate.proto.run_config import RunConfig
from pollinate.server.store import RoundStore
from tests.support.adapters import examples
from tests.support.inprocess import run_in_process

_RNG = random.Random(7)
MIXED = [_RNG.choice([4, 6, 9, 14, 20, 31, 48, 64]) for _ in range(1000)]  # token lengths


def _padded_positions(order: list[list[int]], lengths: list[int]) -> int:
    """What a forward pass computes: each batch padded to its longest example."""
    return sum(len(b) * max(lengths[i] for i in b) for b in order)


@pytest.mark.parametrize("seed", [0, 1, None])
def test_a_grouped_pass_yields_every_example_exactly_once(seed: int | None) -> None:
    order = batch_order(len(MIXED), 16, seed, MIXED)
    assert sorted(i for b in order for i in b) == list(range(len(MIXED)))
    assert all(len(b) == 16 for b in order[:-1]) or seed is not None  # evaluation: only the last is short
    assert sum(len(b) < 16 for b in order) <= 1  # windows are whole batches: one short batch per pass at most


def test_grouped_batches_pad_far_less_than_shuffled_ones() -> None:
    grouped = _padded_positions(batch_order(len(MIXED), 16, 0, MIXED), MIXED)
    shuffled = _padded_positions(batch_order(len(MIXED), 16, 0), MIXED)
    real = sum(MIXED)
    assert (grouped - real) / grouped < 0.5 * (shuffled - real) / shuffled


def test_grouping_is_deterministic_per_seed_and_mixes_the_order_of_batches() -> None:
    assert batch_order(len(MIXED), 16, 3, MIXED) == batch_order(len(MIXED), 16, 3, MIXED)
    assert batch_order(len(MIXED), 16, 3, MIXED) != batch_order(len(MIXED), 16, 4, MIXED)
    longest = [max(MIXED[i] for i in b) for b in batch_order(len(MIXED), 16, 3, MIXED)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # not short batches first


def test_without_lengths_batches_are_the_old_plain_shuffle() -> None:
    order = list(range(50))
    random.Random(5).shuffle(order)
    assert batch_order(50, 8, 5) == [order[i:i + 8] for i in range(0, 50, 8)]
    assert batch_order(50, 8, None) == [list(range(i, min(i + 8, 50))) for i in range(0, 50, 8)]


def test_evaluation_in_length_order_gives_the_same_metrics(tiny_cfg) -> None:
    model, base = build_peft_model(tiny_cfg)
    held_out = [e.__class__(text=" ".join([e.text] * (1 + i % 3)), label=e.label) for i, e in enumerate(examples(1))]
    lengths = token_lengths(held_out, base.tokenizer, tiny_cfg.model)
    for e, n in zip(held_out, lengths, strict=True):  # a lone example's batch is exactly its length wide
        assert next(batches([e], base.tokenizer, tiny_cfg.model, 1, None))["input_ids"].shape[1] == n
    cpu = torch.device("cpu")
    plain = evaluate(model, batches(held_out, base.tokenizer, tiny_cfg.model, 5, None), cpu)
    ordered = evaluate(model, batches(held_out, base.tokenizer, tiny_cfg.model, 5, None, lengths), cpu)
    assert ordered.num_examples == plain.num_examples == len(held_out)
    assert ordered.accuracy == plain.accuracy and ordered.loss == pytest.approx(plain.loss, rel=1e-5)


def _round_metrics(workdir: Path, run_id: int) -> list[tuple[float | None, float | None]]:
    return [(r.eval_loss, r.eval_accuracy) for r in RoundStore(f"sqlite:///{workdir / 'store.db'}").rounds(run_id)]


def test_a_simulated_run_repeats_its_metrics_whatever_node_ids_flower_draws(tmp_path: Path) -> None:
    runs = []
    for draw in (1, 2):  # the Simulation Engine draws fresh node ids per run; the batch seed follows the partition
        workdir = tmp_path / str(draw)
        run_id = run_in_process("tiny.toml", workdir, clients=2, node_id_seed=draw,
                                **{"federation.rounds": 1})
        runs.append(_round_metrics(workdir, run_id))
    assert runs[0] == runs[1] and all(a is not None for _, a in runs[0])


def test_causal_lm_lengths_are_the_width_of_prompt_plus_response_as_collated() -> None:
    cfg = RunConfig().replace(**{"model.name": "tiny-llama", "model.task": "causal-lm", "model.max-length": 24,
                                 "adapter.target-modules": "q_proj,v_proj"})
    tokenizer = load_base_model(cfg.model, 0).tokenizer
    chat = [Example(text=e.text, response="good " * (1 + i % 4), turns=(("user", e.text[: 8 * (1 + i % 5)]),))
            for i, e in enumerate(examples(2, n=10))]
    for e, n in zip(chat, token_lengths(chat, tokenizer, cfg.model), strict=True):  # truncated at max-length too
        assert next(batches([e], tokenizer, cfg.model, 1, None))["input_ids"].shape[1] == n


def test_training_passes_over_batches_whose_responses_were_all_truncated_away(monkeypatch) -> None:
    from pollinate.client import train as train_module

    empty = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.full((2, 4), -100)}
    learnable = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.tensor([[-100, -100, 5, 6]] * 2)}
    classes = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.tensor([0, 1])}
    assert train_module.next_with_targets(iter([empty, empty, learnable])) is learnable
    assert train_module.next_with_targets(iter([classes])) is classes  # a classifier's labels are per example
    monkeypatch.setattr(train_module, "MAX_EMPTY_BATCHES", 3)
    with pytest.raises(ValueError, match="raise model.max-length"):
        train_module.next_with_targets(iter([empty] * 5))
