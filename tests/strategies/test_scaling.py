"""One LoRA scaling rule, PEFT's own: alpha / r, or alpha / sqrt(r) with use_rslora, everywhere.

The reference is PEFT itself (a real LoRA layer's ``scaling``) and, for aggregation, the dense
sum_k p_k s(r_k) B_k A_k written with PEFT's formula, not with the function under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from pollinate.strategies import ClientUpdate, StrategyContext, context
from pollinate.strategies.flexlora import FlexLora
from pollinate.strategies.flora import FLora
from pollinate.strategies.lowrank import lora_scaling
from tests.support.adapters import A, B, adapter, close, dense


def peft_formula(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoraLayer.update_layer, written out: lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize(("alpha", "rank"), [(16.0, 8), (8.0, 3), (1.0, 64)])
def test_the_scaling_is_the_one_a_real_peft_lora_layer_applies(alpha: float, rank: int, use_rslora: bool) -> None:
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(6, 5))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora,
                                                  target_modules=["proj"]))
    layer = peft_model.base_model.model.proj
    assert lora_scaling(alpha, rank, use_rslora) == pytest.approx(layer.scaling["default"], rel=1e-12)
    assert StrategyContext(rank=rank, alpha=alpha, use_rslora=use_rslora).scaling(rank) == \
        pytest.approx(layer.scaling["default"], rel=1e-12)


def test_the_run_config_s_use_rslora_reaches_the_strategy_context(tiny_cfg) -> None:
    assert not context(tiny_cfg).use_rslora
    rslora = context(tiny_cfg.replace(**{"adapter.options": '{"use_rslora": true}'}))
    assert rslora.use_rslora and rslora.scaling(4) == pytest.approx(tiny_cfg.adapter.alpha / 2)


def _updates(rng: np.random.Generator, ranks: list[int], counts: list[int]) -> list[ClientUpdate]:
    return [ClientUpdate(node_id=i, tensors=adapter(rng, r), num_examples=n, rank=r)
            for i, (r, n) in enumerate(zip(ranks, counts, strict=True))]


def _reference(updates: list[ClientUpdate], alpha: float, use_rslora: bool) -> np.ndarray:
    total = sum(u.num_examples for u in updates)
    return sum(u.num_examples / total * dense(u.tensors, peft_formula(alpha, u.rank, use_rslora)) for u in updates)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       use_rslora=st.booleans(), alpha=st.sampled_from([1.0, 8.0, 32.0]))
def test_flora_and_flexlora_aggregate_exactly_under_both_scaling_rules(seed: int, ranks: list[int], use_rslora: bool,
                                                                       alpha: float) -> None:
    rng = np.random.default_rng(seed)
    # Global rank 10 = d_in: flexlora's rank-R truncation loses nothing, so it too must equal the reference.
    ctx = StrategyContext(rank=10, alpha=alpha, use_rslora=use_rslora)
    updates = _updates(rng, ranks, [int(n) for n in rng.integers(1, 50, size=len(ranks))])
    reference = _reference(updates, alpha, use_rslora)
    flexlora = FlexLora(ctx).aggregate(adapter(rng, 10), updates, 1)
    assert close(dense(flexlora, peft_formula(alpha, 10, use_rslora)), reference, tol=1e-5)
    flora = FLora(ctx)
    exported = flora.export(flora.aggregate(adapter(rng, 10), updates, 1))
    rank_out = exported[A].shape[0]  # the folded adapter PEFT loads, at its own rank and scaling
    assert exported[B].shape[1] == rank_out
    assert close(dense(exported, peft_formula(alpha, rank_out, use_rslora)), reference, tol=1e-5)
