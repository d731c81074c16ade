"""LoRA strategies that keep one factor shared and frozen, which makes FedAvg of the other exact.

With A identical on every client, mean_k(B_k) A = mean_k(B_k A): averaging is exact.
``ffa-lora`` (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning")
freezes A at its shared random initialisation for the whole run; ``rolora`` (Chen et al.
2024, "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA") alternates:
odd rounds train B with A frozen, even rounds train A with B frozen.
"""

from __future__ import annotations

from pollinate.strategies.base import MeanUpdate, NamedArrays, Request, lora_pairs, with_instructions
from pollinate.strategies.fedavg import FedAvg


class FfaLora(FedAvg):
    name = "ffa-lora"
    summary = "A frozen at its shared random init, only B (and heads) trained and averaged: exact"
    exact = True
    lora_factors = True

    def frozen_factor(self, round_number: int) -> str:
        return "A"

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        trained = "B" if self.frozen_factor(round_number) == "A" else "A"
        return with_instructions(super().request(state, rank, round_number), train_factors=trained)

    def aggregate_mean(self, state: NamedArrays, mean: MeanUpdate, round_number: int) -> NamedArrays:
        # In the clear, updates that changed the frozen factor were rejected (Strategy.check_update);
        # under secure aggregation nobody can check, so the frozen factor is restored either way.
        frozen = [pair[0 if self.frozen_factor(round_number) == "A" else 1] for pair in lora_pairs(state).values()]
        out = dict(mean.tensors)
        out.update({k: state[k] for k in frozen})  # bit-exact: the frozen factor is what everybody had
        return out


class RoLora(FfaLora):
    name = "rolora"
    summary = "alternates the trained factor (B on odd rounds, A on even), the other frozen and shared: exact"

    def frozen_factor(self, round_number: int) -> str:
        return "A" if round_number % 2 == 1 else "B"

