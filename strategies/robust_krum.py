"""Multi-Krum on LoRA products (Blanchard et al. 2017, NeurIPS, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", Sec. 4 and the multi-Krum variant).

Each node's score is the sum of the squared distances from its update to its n - f - 2 closest others; the
m nodes with the lowest scores are kept and aggregated exactly like flexlora: their example-weighted sum of
products s_k B_k A_k, refactorised to rank R. With n >= 2f + 3, a node whose update is far from the honest
cluster (huge, or sign-flipped) cannot be among the kept, whatever example count it reports.

The distances ||s_i B_i A_i - s_j B_j A_j||_F^2 (plus the heads' plain squared distances) come from r x r
Gram matrices of the factors (``robust_math.product_gram``): O(L (d_out + d_in) (sum_k r_k)^2) for L
modules, no d_out x d_in matrix. The kept nodes' aggregate costs one factored SVD per module, as flexlora.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pollinate.proto.run_config import option
from pollinate.strategies.base import ClientUpdate, NamedArrays, example_weights
from pollinate.strategies.robust import RobustLora, combine, gram
from pollinate.strategies.robust_math import multi_krum, squared_distances


class MultiKrum(RobustLora):
    name = "multi-krum"
    summary = "keep the m nodes whose products are closest to their n - f - 2 neighbours (Krum), flexlora-sum them"

    @dataclass(frozen=True)
    class Options:
        f: int = option(1, "assumed number of Byzantine nodes per round (Krum's guarantee needs n >= 2f + 3)",
                        lambda v: v >= 0, "use a count >= 0")
        m: int = option(0, "nodes kept and averaged each round (0: n - f)", lambda v: v >= 0,
                        "use a count >= 0 (0: n - f)")

    options: Options

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        weights = example_weights(updates)
        items = [self.products(u.tensors, u.rank) for u in updates]
        kept = self.select(squared_distances(gram(items)))
        total = sum(weights[k] for k in kept)
        return combine(state, [items[k] for k in kept], [weights[k] / total for k in kept], self.ctx)

    def select(self, d2: np.ndarray) -> list[int]:
        """The indices multi-Krum keeps from the (n, n) squared distances: the m (0: n - f; at least 1, at most n)
        best Krum scores."""
        n, f = d2.shape[0], self.options.f
        m = min(self.options.m or n - f, n)
        return multi_krum(d2, f, max(m, 1))
