"""HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models").

Clients train ranks r_k <= R; the server zero-pads every client's factors to R and averages
them, weighting each client by examples x ||B_k A_k||_F (the paper's sparsity-weighted
aggregation), or by examples alone with strategy.hetlora-norm-weighting = false, which makes
it linear (a weighted sum; secure aggregation works).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.base import StrategyContext
from strategies.heterogeneous import HeterogeneousLora
from strategies.hetlora_math import hetlora_aggregate
from strategies.lowrank import pad_rank


class HetLora(HeterogeneousLora):
    name = "hetlora"
    summary = "zero-pad every client to the global rank and average, weighted by examples x ||B A|| (approximate)"
    exact = False
    linear = False  # true with strategy.hetlora-norm-weighting = false

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.linear = not ctx.options.hetlora_norm_weighting  # example weights alone: a plain weighted sum

    def aggregate_pair(self, as_: Sequence[np.ndarray], bs: Sequence[np.ndarray], weights: Sequence[float],
                       scalings: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        s_global = self.ctx.scaling(self.ctx.rank)
        bs = [b * np.float32(s / s_global) for b, s in zip(bs, scalings, strict=True)]  # into the global scaling
        if self.ctx.options.hetlora_norm_weighting:
            return hetlora_aggregate(as_, bs, weights, self.ctx.rank)
        padded = [pad_rank(a, b, self.ctx.rank) for a, b in zip(as_, bs, strict=True)]
        a = sum(w * pa for w, (pa, _) in zip(weights, padded, strict=True))
        b = sum(w * pb for w, (_, pb) in zip(weights, padded, strict=True))
        return np.asarray(a), np.asarray(b)
