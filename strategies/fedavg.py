"""FedAvg over adapter tensors (McMahan et al. 2017; FedIT, Zhang et al. 2024, for LoRA).

The weighted mean of each named tensor. For LoRA this averages A and B separately,
which is not the mean of the products B A (see ``ffa-lora``, ``flexlora`` for exact
alternatives); for a tensor that is itself the update (IA3 vectors, heads) it is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.base import ClientUpdate, NamedArrays, Strategy, example_weights


def weighted_mean(tensors: Sequence[NamedArrays], weights: Sequence[float]) -> NamedArrays:
    """Σ_k w_k x_k per name, for weights that sum to 1; every input must hold the same names and shapes."""
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

    def aggregate(self, global_adapter: NamedArrays, updates: Sequence[ClientUpdate]) -> NamedArrays:
        return weighted_mean([u.tensors for u in updates], example_weights(updates))
