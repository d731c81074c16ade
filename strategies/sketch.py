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
   range of Delta W lies in the range of Y.
4. Delta W has rank up to sum_k r_k, more than the global rank R when the nodes' ranks add up past it. The server
   keeps Delta W's best rank-R factorisation as the next global adapter, which the nodes go on training, and
   merges the rest (the directions past R, already separated by the SVD of the small Z) into the frozen base, as
   FLoRA merges its whole sum (``strategies.merged``). Base deltas plus adapter then equal the mean of the nodes'
   models exactly at any mix of ranks, and an export folds both into one plain LoRA. The price is FLoRA's: the
   merged deltas travel down to every node each round, re-compressed to their numerical rank.

Both exchanges need only the weighted mean of the uploads (``exchange.mean``), so secure
aggregation hides every node's sketch and projection; the base deltas are built from those means alone.

The node half: after training, the node uploads Y_k and keeps its trained factors in its node state;
exchange 2 does not train (``trains``), it projects them (``answer``) and forgets them.

No published federated LoRA system ships this for heterogeneous ranks (Bai et al. 2024 use a
dense SVD of the materialised Delta W and need every client's factors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pollinate.proto.instructions import Instructions
from pollinate.proto.run_config import option
from pollinate.strategies.base import (AggregationError, ClientUpdate, Exchange, NamedArrays, NodeState, Request,
                                       lora_pairs)
from pollinate.strategies.heterogeneous import HeterogeneousRanks, at_rank
from pollinate.strategies.lowrank import split_factors
from pollinate.strategies.merged import DELTA_A, DELTA_B, add_to_deltas, fold_into_lora, join_deltas, split_deltas
from pollinate.strategies.sketch_math import orthonormal_basis, project_upload, sketch_matrix, sketch_upload

SKETCH_Y, SKETCH_Q, SKETCH_Z = ".sketch_y", ".sketch_q", ".sketch_z"
TRAINED = "sketch-trained-adapter"  # node state: this round's trained adapter, kept from exchange 1 for exchange 2


class Sketch(HeterogeneousRanks):
    name = "sketch"
    summary = ("exact sum of B_k A_k at any ranks from two summed uploads (randomised range finder), the part "
               "past rank R merged into the base: linear")
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
        adapter, deltas = split_deltas(state)
        pairs = lora_pairs(adapter)
        factor_keys = {k for pair in pairs.values() for k in pair}
        others = [k for k in adapter if k not in factor_keys]
        size = sum(ranks.values()) + self.options.oversample
        seed = int(np.random.default_rng([self.ctx.seed, round_number]).integers(2**31))
        first = {}
        for node, rank in ranks.items():
            sent = join_deltas(at_rank(adapter, rank, self.ctx), deltas)
            shapes = {k: adapter[k].shape for k in others}
            shapes.update({prefix + SKETCH_Y: (adapter[b].shape[0], size) for prefix, (_, b) in pairs.items()})
            first[node] = Request(sent, Instructions(round=round_number, rank=rank, upload="sketch-y",
                                                     sketch_seed=seed, sketch_size=size),
                                  reply_shapes=shapes)
        sketches = exchange.mean(first)
        out = {k: sketches.tensors[k].astype(np.float32) for k in others}
        bases = {prefix: orthonormal_basis(sketches.tensors[prefix + SKETCH_Y]) for prefix in pairs}
        # Exchange 2 goes to the nodes in the first mean: their trained factors are what Q spans.
        second = {node: Request({prefix + SKETCH_Q: q.astype(np.float32) for prefix, q in bases.items()},
                                Instructions(round=round_number, rank=ranks[node], upload="sketch-z"),
                                reply_shapes={prefix + SKETCH_Z: (q.shape[1], adapter[pairs[prefix][0]].shape[1])
                                              for prefix, q in bases.items()})
                  for node in sketches.node_ids}
        projections = exchange.mean(second)
        if set(projections.node_ids) != set(second):
            missing = sorted(set(second) - set(projections.node_ids))
            raise AggregationError(f"nodes {missing} answered the sketch but not the projection; the mean would "
                                   f"mix two different sets of clients, so this round cannot be aggregated")
        s_global, rank = self.ctx.scaling(self.ctx.rank), self.ctx.rank
        for prefix, (a_key, b_key) in pairs.items():
            # Delta W = Q Z = (Q U) diag(s) Vt from the SVD of the small Z: its first R directions are the adapter,
            # the rest go into the base, so nothing is cut.
            u, s, vt = np.linalg.svd(projections.tensors[prefix + SKETCH_Z].astype(np.float64), full_matrices=False)
            left = bases[prefix] @ u
            a, b = split_factors(left, s, vt, rank)
            out[a_key], out[b_key] = a.astype(np.float32), (b / np.float32(s_global)).astype(np.float32)
            if s.shape[0] > rank and s[rank] > 1e-6 * s[0]:
                root = np.sqrt(s[rank:])
                add_to_deltas(deltas, prefix, [root[:, None] * vt[rank:]], [left[:, rank:] * root])
        return join_deltas(out, deltas)

    def export(self, state: NamedArrays) -> NamedArrays:
        adapter, deltas = split_deltas(state)
        return fold_into_lora(adapter, deltas, self.ctx.scaling, self.ctx.rank)[0]

    # The node half.

    def transform_upload(self, trained: NamedArrays, received: NamedArrays, instructions: Instructions,
                         node_state: NodeState) -> tuple[NamedArrays, dict[str, float]]:
        """Exchange 1's upload: Y_k = s_k B_k (A_k Omega) per module, other tensors as trained; keeps ``trained``."""
        if instructions.upload != "sketch-y":
            return trained, {}
        scaling = self.ctx.scaling(instructions.rank or self.ctx.rank)
        pairs = lora_pairs(trained)
        factor_keys = {k for pair in pairs.values() for k in pair}
        out = {k: v for k, v in trained.items() if k not in factor_keys}
        for prefix, (a_key, b_key) in pairs.items():
            omega = sketch_matrix(instructions.sketch_seed, trained[a_key].shape[1], instructions.sketch_size)
            out[prefix + SKETCH_Y] = sketch_upload(trained[a_key], trained[b_key], scaling, omega)
        node_state[TRAINED] = {k: np.asarray(v, dtype=np.float32) for k, v in trained.items()}
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}, {}

    def trains(self, instructions: Instructions) -> bool:
        return instructions.upload != "sketch-z"  # exchange 2 projects what exchange 1 trained

    def answer(self, received: NamedArrays, instructions: Instructions, node_state: NodeState) -> NamedArrays:
        """Exchange 2's upload: Z_k = Q^T (s_k B_k A_k) per module, from the factors kept at exchange 1."""
        if TRAINED not in node_state:
            raise ValueError(f"round {instructions.round}: asked for the sketch projection before this node sent "
                             f"its sketch (exchange 1); nothing to project")
        trained = node_state.pop(TRAINED)
        scaling = self.ctx.scaling(instructions.rank or self.ctx.rank)
        out = {}
        for prefix, (a_key, b_key) in lora_pairs(trained).items():
            q = received[prefix + SKETCH_Q]
            out[prefix + SKETCH_Z] = project_upload(q, trained[a_key], trained[b_key], scaling)
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}

    def upload_names(self, sent: Iterable[str], instructions: Instructions) -> set[str]:
        """Exchange 1: the sent tensors that are not LoRA factors, and one Y per sent module; exchange 2: one Z
        per Q sent."""
        sent = [k for k in sent if not k.endswith((DELTA_A, DELTA_B))]  # the base deltas are the server's, not uploads
        if instructions.upload == "sketch-z":
            return {k.removesuffix(SKETCH_Q) + SKETCH_Z for k in sent if k.endswith(SKETCH_Q)}
        if instructions.upload != "sketch-y":
            return set(sent)
        pairs = lora_pairs(sent)
        factor_keys = {k for pair in pairs.values() for k in pair}
        return {k for k in sent if k not in factor_keys} | {prefix + SKETCH_Y for prefix in pairs}
