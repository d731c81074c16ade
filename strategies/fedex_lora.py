"""FedEx-LoRA (Singhal et al. 2024, "Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models"): FedIT plus the exact residual folded into the base weights.

Averaging A and B separately leaves the residual sum_k p_k s B_k A_k - s B_bar A_bar (Eq. 6);
the server adds it to the base (``strategies.merged``), so base + s B_bar A_bar equals the
mean of the clients' models exactly. Homogeneous ranks; not linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pollinate.strategies.base import ClientUpdate, NamedArrays, Request, example_weights, lora_pairs
from pollinate.strategies.fedavg import FedAvg, weighted_mean
from pollinate.strategies.merged import add_to_deltas, fold_into_lora, join_deltas, split_deltas


class FedExLora(FedAvg):
    name = "fedex-lora"
    summary = "FedAvg of A and B plus the exact residual sum p B_k A_k - B_bar A_bar merged into the base"
    exact = True
    linear = False
    lora_factors = True

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        request = super().request(state, rank, round_number)
        adapter, _ = split_deltas(state)
        return Request(request.tensors, request.instructions, reply_shapes={k: v.shape for k, v in adapter.items()})

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        _, deltas = split_deltas(state)
        weights = example_weights(updates)
        mean = weighted_mean([u.tensors for u in updates], weights)
        s = self.ctx.scaling(self.ctx.rank)
        for prefix, (a_key, b_key) in lora_pairs(mean).items():
            as_ = [u.tensors[a_key] for u in updates] + [mean[a_key]]
            bs = [u.tensors[b_key] * np.float32(w * s) for u, w in zip(updates, weights, strict=True)]
            add_to_deltas(deltas, prefix, as_, bs + [-np.float32(s) * mean[b_key]])
        return join_deltas(mean, deltas)

    def export(self, state: NamedArrays) -> NamedArrays:
        adapter, deltas = split_deltas(state)
        return fold_into_lora(adapter, deltas, self.ctx.scaling, self.ctx.rank)[0]
