"""``trimmed-mean`` and ``median``: coordinate-wise robust statistics of the LoRA products (Yin et al. 2018,
ICML, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", Def. 1 and 2).

A coordinate-wise rule needs the entries of every node's product s_k B_k A_k, so, unlike the other robust
rules, it forms them: one module at a time, (n, d_out, d_in) float64 for n nodes, i.e. 8 n d_out d_in bytes
at the peak (n = 8 at 4096 x 4096: 1 GiB), and an O(n d_out d_in log n) sort. The robust d_out x d_in
aggregate is then refactorised to rank R by a dense truncated SVD, O(d_out d_in min(d_out, d_in)): the best
rank-R approximation of the robust aggregate, not the aggregate itself. Tensors that are not LoRA factors
(heads) get the same rule on their entries.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pollinate.proto.run_config import option
from pollinate.strategies.base import ClientUpdate, NamedArrays, example_weights, lora_pairs
from pollinate.strategies.lowrank import split_factors
from pollinate.strategies.robust import RobustLora
from pollinate.strategies.robust_math import coordinate_median, trim_count, trimmed_mean


class Coordinatewise(RobustLora):
    """A rule applied to every coordinate of the stacked products (``statistic``), refactorised to rank R."""

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        weights = example_weights(updates)
        items = [self.products(u.tensors, u.rank) for u in updates]
        out = {name: self.statistic(np.stack([it.dense[name] for it in items]).astype(np.float64), weights)
               .astype(np.float32) for name in items[0].dense}
        s_global = self.ctx.scaling(self.ctx.rank)
        for prefix, (a_key, b_key) in lora_pairs(state).items():
            stacked = np.stack([b @ a for b, a in (it.factors[prefix] for it in items)])  # (n, d_out, d_in)
            u, s, vt = np.linalg.svd(self.statistic(stacked, weights), full_matrices=False)
            a, b = split_factors(u, s, vt, self.ctx.rank)
            out[a_key], out[b_key] = a.astype(np.float32), (b / s_global).astype(np.float32)
        return out

    @abstractmethod
    def statistic(self, x: np.ndarray, weights: Sequence[float]) -> np.ndarray:
        """The rule on x (n, ...) with the nodes' example weights, one value per coordinate."""


class TrimmedMean(Coordinatewise):
    name = "trimmed-mean"
    summary = "per coordinate of the products, drop the trim fraction at each end, weighted mean of the rest"

    @dataclass(frozen=True)
    class Options:
        trim: float = option(0.2, "fraction beta of nodes dropped at each end of every coordinate "
                                  "(ceil(beta n), at most (n - 1) / 2; 0: flexlora's weighted mean)",
                             lambda v: 0.0 <= v < 0.5, "use a value in [0, 0.5), above the share of hostile nodes")
        # A node reports its own example count: one that claims a huge count and uploads values inside the honest
        # range would set every coordinate where it is kept. Unweighted, its pull is at most 1 / (n - 2 trim).
        weighted: bool = option(True, "weight the kept values by the nodes' example counts (false: the plain mean "
                                      "of Yin et al., which no reported count can sway)")

    options: Options

    def statistic(self, x: np.ndarray, weights: Sequence[float]) -> np.ndarray:
        weights = weights if self.options.weighted else [1.0] * x.shape[0]
        return trimmed_mean(x, weights, trim_count(x.shape[0], self.options.trim))


class Median(Coordinatewise):
    name = "median"
    summary = "coordinate-wise median of the products (unweighted: example counts cannot buy it)"

    def statistic(self, x: np.ndarray, weights: Sequence[float]) -> np.ndarray:
        return coordinate_median(x)
