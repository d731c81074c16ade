"""FedAvg over adapter tensors (McMahan et al. 2017; FedIT, Zhang et al. 2024, for LoRA) and FedProx.

The weighted mean of each named tensor. For LoRA this averages A and B separately,
which is not the mean of the products B A (the error is -1/2 sum_ij p_i p_j (B_i-B_j)(A_i-A_j));
``ffa-lora``, ``flexlora`` and ``sketch`` are exact alternatives. For a tensor that is itself the
update (IA3 vectors, classifier heads) the mean is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.base import ClientUpdate, NamedArrays, Request, Strategy, example_weights, with_instructions


def weighted_mean(tensors: Sequence[NamedArrays], weights: Sequence[float]) -> NamedArrays:
    """sum_k w_k x_k per name, for weights that sum to 1; every input must hold the same names and shapes."""
    names = tensors[0].keys()
    out: NamedArrays = {}
    for name in names:
        acc = np.multiply(tensors[0][name], np.float32(weights[0]), dtype=np.float32)
        scratch = np.empty_like(acc)  # one buffer reused for every w_k x_k: no allocation per client
        for arrays, w in zip(tensors[1:], weights[1:], strict=True):
            np.multiply(arrays[name], np.float32(w), out=scratch)
            acc += scratch
        out[name] = acc
    return out


class FedAvg(Strategy):
    name = "fedavg"
    summary = "weighted mean of every adapter tensor (FedIT for LoRA: A and B averaged separately)"
    exact = False
    heterogeneous_ranks = False
    linear = True

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        return weighted_mean([u.tensors for u in updates], example_weights(updates))


class FedProx(FedAvg):
    """FedAvg with a proximal term mu/2 ||w - w_global||^2 in each client's loss (Li et al. 2020, Eq. 2)."""

    name = "fedprox"
    summary = "FedAvg whose clients add a proximal term mu/2 ||w - w_global||^2 (strategy.proximal-mu)"

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        return with_instructions(super().request(state, rank, round_number),
                                 proximal_mu=self.ctx.options.proximal_mu)
