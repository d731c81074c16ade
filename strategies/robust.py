"""What the robust aggregation rules share: every node's update read as products, and the way back to factors.

A robust rule must look at each node's own update, so none of them is linear: ``strategies.build`` refuses
them under secure aggregation, and central DP refuses them too (it clips and noises a plain mean). Like
flexlora they aggregate products s_k B_k A_k, so nodes may train different ranks (a node below the global
rank R is sent the truncated global, ``heterogeneous.at_rank``); the result is refactorised to rank R.

The rules (one file each): ``robust-clip`` (``robust_clip.py``), ``trimmed-mean`` and ``median``
(``robust_coordinatewise.py``), ``multi-krum`` (``robust_krum.py``); their math is ``robust_math.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pollinate.proto.instructions import Instructions
from pollinate.strategies.base import NamedArrays, Request, StrategyContext, lora_pairs
from pollinate.strategies.flexlora_math import flexlora_redistribute
from pollinate.strategies.heterogeneous import HeterogeneousRanks, at_rank
from pollinate.strategies.robust_math import flat_gram, product_gram


@dataclass(frozen=True)
class Products:
    """One adapter as the update it means: per LoRA module (s B (d_out, r), A (r, d_in)), float64, and the
    tensors that are not LoRA factors (heads) as they are."""

    factors: Mapping[str, tuple[np.ndarray, np.ndarray]]  # module prefix -> (s * B, A)
    dense: Mapping[str, np.ndarray]  # name -> tensor


def as_products(tensors: NamedArrays, scaling: float) -> Products:
    """``tensors`` (an adapter whose LoRA update is ``scaling`` * B @ A) as ``Products``."""
    pairs = lora_pairs(tensors)
    factor_keys = {k for pair in pairs.values() for k in pair}
    factors = {prefix: (np.float64(scaling) * tensors[b].astype(np.float64), tensors[a].astype(np.float64))
               for prefix, (a, b) in pairs.items()}
    return Products(factors, {k: v for k, v in tensors.items() if k not in factor_keys})


def gram(items: Sequence[Products]) -> np.ndarray:
    """(n, n) inner products of whole updates: the products' Gram matrices summed over modules, plus the dense
    tensors' plain inner products. Never forms a d_out x d_in matrix."""
    first = items[0]
    total = np.zeros((len(items), len(items)))
    for prefix in first.factors:
        total += product_gram([it.factors[prefix][0] for it in items], [it.factors[prefix][1] for it in items])
    for name in first.dense:
        total += flat_gram([it.dense[name] for it in items])
    return total


def combine(state: NamedArrays, items: Sequence[Products], weights: Sequence[float],
            ctx: StrategyContext) -> NamedArrays:
    """The global adapter (state's names, rank ctx.rank) for sum_k w_k x_k: FlexLoRA's factored SVD of the
    weighted products (the best rank-R approximation, exact when R covers their rank), dense tensors summed."""
    out: NamedArrays = {}
    for name in items[0].dense:
        out[name] = sum(np.float64(w) * it.dense[name] for w, it in zip(weights, items, strict=True)).astype(np.float32)
    rank, ones = ctx.rank, [1.0] * len(items)  # the scalings are already folded into B
    for prefix, (a_key, b_key) in lora_pairs(state).items():
        [(a, b)] = flexlora_redistribute([it.factors[prefix][0] for it in items],
                                         [it.factors[prefix][1] for it in items], weights, ones, [rank],
                                         [ctx.scaling(rank)])
        out[a_key], out[b_key] = a.astype(np.float32), b.astype(np.float32)
    return out


class RobustLora(HeterogeneousRanks):
    """A robust rule over products: nodes train min(capacity, R) and are sent the truncated global."""

    exact = False  # a robust rule is not the weighted mean of every node, by design
    linear = False  # it needs each node's own update: SecAgg and central DP refuse it

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        return Request(at_rank(state, rank, self.ctx), Instructions(round=round_number, rank=rank))

    def products(self, tensors: NamedArrays, rank: int) -> Products:
        """An adapter at ``rank`` (0: the global rank) as ``Products``, at PEFT's scaling for that rank."""
        return as_products(tensors, self.ctx.scaling(rank or self.ctx.rank))
