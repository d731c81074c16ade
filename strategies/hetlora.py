"""HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models").

Clients train ranks r_k <= R; with strategy.hetlora.prune = gamma > 0 a client drops the tail of
its LoRA whose share of ||B A|| is at most gamma and trains the smaller rank from then on
(self-pruning, Sec. 3.2). The server zero-pads every client's factors to R and averages
them, weighting each client by examples x ||B_k A_k||_F (the paper's sparsity-weighted
aggregation), or by examples alone with strategy.hetlora.norm-weighting = false, which makes
it linear (a weighted sum; secure aggregation works).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pollinate.proto.instructions import Instructions
from pollinate.proto.run_config import option
from pollinate.strategies.base import (ClientUpdate, MeanUpdate, NamedArrays, NodeState, Request, StrategyContext,
                                       with_instructions)
from pollinate.strategies.heterogeneous import HeterogeneousLora, to_global_rank
from pollinate.strategies.hetlora_math import hetlora_aggregate, prune_tail
from pollinate.strategies.lowrank import pad_rank


class HetLora(HeterogeneousLora):
    name = "hetlora"
    summary = "zero-pad every client to the global rank and average, weighted by examples x ||B A|| (approximate)"
    exact = False
    linear = False  # true with strategy.hetlora.norm-weighting = false

    @dataclass(frozen=True)
    class Options:
        prune: float = option(0.0, "client self-pruning threshold gamma (Sec. 3.2; 0: off)", lambda v: 0 <= v < 1,
                              "use a value in [0, 1)")
        norm_weighting: bool = option(True, "weight clients by examples x ||B A|| (false: examples only, linear)")

    options: Options

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.linear = not self.options.norm_weighting  # example weights alone: a plain weighted sum
        self.pruned: dict[int, int] = {}  # node -> the rank it pruned itself to

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        request = with_instructions(super().request(state, rank, round_number),
                                    prune_gamma=self.options.prune)
        if not self.linear:
            return request
        # Linear: the node zero-pads its upload to the global rank in the global scaling, so every
        # upload has one shape and the mean is all the server needs (secure aggregation works).
        return Request(request.tensors, replace(request.instructions, upload_rank=self.ctx.rank),
                       reply_shapes={k: v.shape for k, v in state.items()})

    def assign_rank(self, node_id: int, capacity: int) -> int:
        """A node that pruned its rank last round keeps the pruned rank (HetLoRA's self-pruning)."""
        return min(super().assign_rank(node_id, capacity), self.pruned.get(node_id, self.ctx.rank))

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        self._note_pruning({u.node_id: u.metrics for u in updates})
        return super().aggregate(state, updates, round_number)

    def aggregate_mean(self, state: NamedArrays, mean: MeanUpdate, round_number: int) -> NamedArrays:
        """Linear HetLoRA: the uploads arrive padded to rank R in the global scaling; their mean is the state."""
        self._note_pruning(mean.node_metrics)
        return dict(mean.tensors)

    def state_arrays(self) -> NamedArrays:
        """The ranks nodes pruned themselves to: node ids (uint64, as Flower's) beside their ranks."""
        nodes = sorted(self.pruned)
        return {"pruned/node-ids": np.array(nodes, dtype=np.uint64),
                "pruned/ranks": np.array([self.pruned[n] for n in nodes], dtype=np.int64)}

    def load_state_arrays(self, arrays: NamedArrays) -> None:
        nodes, ranks = arrays.get("pruned/node-ids", np.zeros(0)), arrays.get("pruned/ranks", np.zeros(0))
        self.pruned = {int(n): int(r) for n, r in zip(nodes, ranks, strict=True)}

    def _note_pruning(self, metrics: Mapping[int, Mapping[str, float]]) -> None:
        for node, reported in metrics.items():
            if "pruned-rank" in reported:
                self.pruned[node] = max(1, int(reported["pruned-rank"]))

    def transform_upload(self, trained: NamedArrays, received: NamedArrays, instructions: Instructions,
                         node_state: NodeState) -> tuple[NamedArrays, dict[str, float]]:
        """The node half: self-pruning (zero the negligible tail, report the rank kept), then, when linear,
        the upload zero-padded to the global rank in the global scaling."""
        metrics: dict[str, float] = {}
        if instructions.prune_gamma > 0:
            trained, pruned_rank = prune_tail(trained, instructions.prune_gamma)
            metrics["pruned-rank"] = pruned_rank
        if instructions.upload_rank:
            rank = instructions.rank or self.ctx.rank
            trained = to_global_rank(trained, rank, replace(self.ctx, rank=instructions.upload_rank))
        return trained, metrics

    def aggregate_pair(self, as_: Sequence[np.ndarray], bs: Sequence[np.ndarray], weights: Sequence[float],
                       scalings: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        s_global = self.ctx.scaling(self.ctx.rank)
        bs = [b * np.float32(s / s_global) for b, s in zip(bs, scalings, strict=True)]  # into the global scaling
        if self.options.norm_weighting:
            return hetlora_aggregate(as_, bs, weights, self.ctx.rank)
        padded = [pad_rank(a, b, self.ctx.rank) for a, b in zip(as_, bs, strict=True)]
        a = sum(w * pa for w, (pa, _) in zip(weights, padded, strict=True))
        b = sum(w * pb for w, (_, pb) in zip(weights, padded, strict=True))
        return np.asarray(a), np.asarray(b)
