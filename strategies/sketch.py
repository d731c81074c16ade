"""``sketch``: exact heterogeneous-rank aggregation that is also linear, in two exchanges per round.

The target is FlexLoRA's global update Delta W = sum_k p_k s_k B_k A_k (any mix of ranks), but
the server only ever needs *sums* of client uploads, so it works under secure aggregation.
A randomised range finder (Halko, Martinsson & Tropp 2011, Alg. 4.1) run across clients:

1. the server sends each client the global adapter at its rank, a seed and a sketch size s;
   the client trains, then uploads Y_k = s_k B_k (A_k Omega) (d_out x s) with the shared
   Gaussian Omega (d_in x s) drawn from the seed, plus its other tensors (heads);
2. the server orthonormalises the example-weighted mean Y = sum_k p_k Y_k to Q (d_out x q) and
   sends Q; each client uploads Z_k = Q^T (s_k B_k A_k) = (Q^T B_k) A_k s_k (q x d_in);
3. Q (sum_k p_k Z_k) = Delta W exactly (up to float error) when s >= sum_k r_k, because the
   range of Delta W lies in the range of Y. The server keeps its best rank-R factorisation.

Both exchanges need only the weighted mean of the uploads (``exchange.mean``), so secure
aggregation hides every node's sketch and projection.

No published federated LoRA system ships this for heterogeneous ranks (Bai et al. 2024 use a
dense SVD of the materialised Delta W and need every client's factors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pollinate.proto.instructions import Instructions
from pollinate.proto.run_config import option
from pollinate.strategies.base import AggregationError, ClientUpdate, Exchange, NamedArrays, Request, lora_pairs
from pollinate.strategies.heterogeneous import HeterogeneousRanks, at_rank
from pollinate.strategies.sketch_math import orthonormal_basis, sketch_factors

SKETCH_Y, SKETCH_Q, SKETCH_Z = ".sketch_y", ".sketch_q", ".sketch_z"


class Sketch(HeterogeneousRanks):
    name = "sketch"
    summary = "exact sum of B_k A_k at any ranks from two summed uploads (randomised range finder): linear"
    exact = True
    linear = True

    @dataclass(frozen=True)
    class Options:
        oversample: int = option(8, "sketch size = sum of the nodes' ranks + this", lambda v: v >= 0, "use >= 0")

    options: Options

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        raise AggregationError("sketch aggregates in run_round, from summed sketches")

    def run_round(self, state: NamedArrays, ranks: Mapping[int, int], exchange: Exchange,
                  round_number: int) -> NamedArrays:
        pairs = lora_pairs(state)
        factor_keys = {k for pair in pairs.values() for k in pair}
        others = [k for k in state if k not in factor_keys]
        size = sum(ranks.values()) + self.options.oversample
        seed = int(np.random.default_rng([self.ctx.seed, round_number]).integers(2**31))
        first = {}
        for node, rank in ranks.items():
            sent = at_rank(state, rank, self.ctx)
            shapes = {k: state[k].shape for k in others}
            shapes.update({prefix + SKETCH_Y: (state[b].shape[0], size) for prefix, (_, b) in pairs.items()})
            first[node] = Request(sent, Instructions(round=round_number, rank=rank, upload="sketch-y",
                                                     sketch_seed=seed, sketch_size=size),
                                  reply_shapes=shapes)
        sketches = exchange.mean(first)
        out = {k: sketches.tensors[k].astype(np.float32) for k in others}
        bases = {prefix: orthonormal_basis(sketches.tensors[prefix + SKETCH_Y]) for prefix in pairs}
        # Exchange 2 goes to the nodes in the first mean: their trained factors are what Q spans.
        second = {node: Request({prefix + SKETCH_Q: q.astype(np.float32) for prefix, q in bases.items()},
                                Instructions(round=round_number, rank=ranks[node], upload="sketch-z"),
                                reply_shapes={prefix + SKETCH_Z: (q.shape[1], state[pairs[prefix][0]].shape[1])
                                              for prefix, q in bases.items()})
                  for node in sketches.node_ids}
        projections = exchange.mean(second)
        if set(projections.node_ids) != set(second):
            missing = sorted(set(second) - set(projections.node_ids))
            raise AggregationError(f"nodes {missing} answered the sketch but not the projection; the mean would "
                                   f"mix two different sets of clients, so this round cannot be aggregated")
        s_global = self.ctx.scaling(self.ctx.rank)
        for prefix, (a_key, b_key) in pairs.items():
            z = projections.tensors[prefix + SKETCH_Z]
            a, b = sketch_factors(bases[prefix], z, self.ctx.rank)  # Delta W ~= b @ a
            out[a_key], out[b_key] = a.astype(np.float32), (b / np.float32(s_global)).astype(np.float32)
        return out
