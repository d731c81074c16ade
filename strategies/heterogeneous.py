"""The rank plumbing shared by heterogeneous-rank LoRA strategies (hetlora, flexlora).

The server keeps the global adapter at rank R = ``adapter.r``; a node of capacity r_k < R
trains rank r_k. LoRA's update is s * B @ A with s = s(r) (alpha / r, or alpha / sqrt(r) with rsLoRA:
``StrategyContext.scaling``), so a factor pair means the
same update at every rank only if B is rescaled when the rank changes: a node is sent
(A[:r_k], B[:, :r_k] * s_R / s_k) and its reply is read back as B_k * s_k / s_R. Tensors
that are not LoRA factors (classifier heads) are averaged by examples.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from pollinate.proto.instructions import Instructions
from pollinate.strategies.base import (ClientUpdate, NamedArrays, Request, Strategy, StrategyContext, example_weights,
                             lora_pairs)
from pollinate.strategies.fedavg import weighted_mean
from pollinate.strategies.lowrank import pad_rank, truncate_rank


def at_rank(state: NamedArrays, rank: int, ctx: StrategyContext) -> NamedArrays:
    """The global adapter (rank ctx.rank) as a rank-``rank`` adapter meaning the same (truncated) update."""
    out = dict(state)
    ratio = ctx.scaling(ctx.rank) / ctx.scaling(rank)
    for a_key, b_key in lora_pairs(state).values():
        a, b = truncate_rank(state[a_key], state[b_key], rank)
        out[a_key], out[b_key] = np.ascontiguousarray(a), np.ascontiguousarray(b * np.float32(ratio))
    return out


def to_global_rank(tensors: NamedArrays, rank: int, ctx: StrategyContext) -> NamedArrays:
    """A node's rank-``rank`` adapter zero-padded to the global rank ctx.rank, B rescaled into its scaling.

    The inverse of ``at_rank`` for an upload: B A s_k = B' A' s_R, so uploads of every rank share
    one shape and meaning, and their plain weighted mean is linear HetLoRA's aggregate.
    """
    out = dict(tensors)
    ratio = ctx.scaling(rank) / ctx.scaling(ctx.rank)
    for a_key, b_key in lora_pairs(tensors).values():
        a, b = pad_rank(tensors[a_key], tensors[b_key] * np.float32(ratio), ctx.rank)
        out[a_key], out[b_key] = a.astype(np.float32), b.astype(np.float32)
    return out


class HeterogeneousRanks(Strategy):
    """LoRA strategies where a node trains the global rank, or its announced max-rank when smaller."""

    heterogeneous_ranks = True
    lora_factors = True

    def assign_rank(self, node_id: int, capacity: int) -> int:
        return min(capacity, self.ctx.rank) if capacity else self.ctx.rank


class HeterogeneousLora(HeterogeneousRanks):
    """Truncate-and-rescale requests; aggregation one LoRA pair at a time (``aggregate_pair``)."""

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        return Request(at_rank(state, rank, self.ctx), Instructions(round=round_number, rank=rank))

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        weights = example_weights(updates)
        pairs = lora_pairs(state)
        factor_keys = {k for pair in pairs.values() for k in pair}
        others = [k for k in state if k not in factor_keys]
        out = weighted_mean([{k: u.tensors[k] for k in others} for u in updates], weights) if others else {}
        scalings = [self.ctx.scaling(u.rank or self.ctx.rank) for u in updates]
        for a_key, b_key in pairs.values():
            a, b = self.aggregate_pair([u.tensors[a_key] for u in updates], [u.tensors[b_key] for u in updates],
                                       weights, scalings)
            out[a_key], out[b_key] = a.astype(np.float32), b.astype(np.float32)
        return out

    @abstractmethod
    def aggregate_pair(self, as_: Sequence[np.ndarray], bs: Sequence[np.ndarray], weights: Sequence[float],
                       scalings: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """One module's global (A: (R, d_in), B: (d_out, R)) at scaling ctx.scaling(R), from clients at their ranks."""
