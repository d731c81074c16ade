"""FedAvg over adapter tensors (McMahan et al. 2017; FedIT, Zhang et al. 2024, for LoRA) and FedProx.

The weighted mean of each named tensor. For LoRA this averages A and B separately,
which is not the mean of the products B A (the error is -1/2 sum_ij p_i p_j (B_i-B_j)(A_i-A_j));
``ffa-lora``, ``flexlora`` and ``sketch`` are exact alternatives. For a tensor that is itself the
update (IA3 vectors, classifier heads) the mean is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from pollinate.proto.run_config import option
from pollinate.strategies.base import MeanUpdate, NamedArrays, Request, Strategy, weighted_mean, with_instructions

__all__ = ["FedAvg", "FedProx", "weighted_mean"]


class FedAvg(Strategy):
    name = "fedavg"
    summary = "weighted mean of every adapter tensor (FedIT for LoRA: A and B averaged separately)"
    exact = False
    heterogeneous_ranks = False
    linear = True

    def aggregate_mean(self, state: NamedArrays, mean: MeanUpdate, round_number: int) -> NamedArrays:
        return dict(mean.tensors)


class FedProx(FedAvg):
    """FedAvg with a proximal term mu/2 ||w - w_global||^2 in each client's loss (Li et al. 2020, Eq. 2)."""

    name = "fedprox"
    summary = "FedAvg whose clients add a proximal term mu/2 ||w - w_global||^2 (strategy.fedprox.proximal-mu)"

    @dataclass(frozen=True)
    class Options:
        proximal_mu: float = option(0.01, "weight mu of the proximal term mu/2 ||w - w_global||^2",
                                    lambda v: v >= 0, "use a value >= 0 (0: plain FedAvg)")

    options: Options

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        return with_instructions(super().request(state, rank, round_number),
                                 proximal_mu=self.options.proximal_mu)
