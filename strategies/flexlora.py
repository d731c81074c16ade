"""FlexLoRA (Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources"): the global update is the weighted sum of the clients' full updates,
Delta W = sum_k p_k s_k B_k A_k (Eq. 4), redistributed to each client by truncated SVD at its rank.

Computed without materialising Delta W (d_out x d_in): QR of the stacked factors and an SVD of
the small (sum r_k x sum r_k) core (``strategies.lowrank.factored_svd``). The server keeps the
best rank-R approximation in SVD order, so truncating it to r_k for a client is again the
best rank-r_k approximation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pollinate.strategies.flexlora_math import flexlora_redistribute
from pollinate.strategies.heterogeneous import HeterogeneousLora


class FlexLora(HeterogeneousLora):
    name = "flexlora"
    summary = "sum of the clients' full updates B_k A_k, redistributed by SVD at each client's rank"
    exact = False  # exact up to the rank-R truncation of the summed update
    linear = False

    def aggregate_pair(self, as_: Sequence[np.ndarray], bs: Sequence[np.ndarray], weights: Sequence[float],
                       scalings: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        [(a, b)] = flexlora_redistribute(bs, as_, weights, scalings, [self.ctx.rank],
                                         [self.ctx.scaling(self.ctx.rank)])
        return a, b
