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

Under client-level central DP (``ctx.central_dp``, privacy.mode = 'central') the server clips and noises each
of the two means (``server/privacy_rounds.py``), which needs what each node uploads to be a delta of its own work,
so the clip bounds one node's contribution and the mean is DP-FedAvg's. The full-product uploads above are not
(a node's Y_k carries the global adapter it was sent), so the nodes are told ``sketch_delta``: they upload
Y_k = D_k Omega' and Z_k = Q^T D_k of D_k = s_k (B_k A_k - B_sent A_sent), their trained product minus the
product they received at their rank, with Omega' = Omega / sqrt(size) so that E ||Y_k||_F^2 = ||D_k||_F^2 and
||Z_k||_F <= ||D_k||_F (Q orthonormal): one clip norm C means the same in both exchanges as fedavg's C on a delta
(exchange 1 clips Y_k together with the node's change of the head). The server then adds Q (noisy mean Z) to the
global product s_R B A it holds (DP-FedAvg's global + mean change), keeps the best rank R of the sum as the adapter
and merges the rest into the base deltas, as without DP. D_k has rank up to 2 r_k, their mean up to
sum_k r_k + R, so without noise the result is exact while that is at most the sketch size.
The non-DP path keeps full products, so its results are unchanged; the two agree when no node's received
product was truncated (ranks >= the adapter's rank, or a zero adapter), and otherwise differ in what the
global keeps: the delta form keeps the part of the global a low-rank node was not sent, the product form
averages it out. Under DP the delta form is the only one whose clip bounds a node's own work. The sketch size under
DP is fixed (``dp_size``) and Q keeps all its columns: a size from the sampled nodes' ranks, or Q's numerical rank,
would put who was sampled into the shapes of the released state. A smaller size also carries less noise
(Q Z's noise has size x d_in entries). Under secure aggregation the server cannot clip: each node clips its own
change in each upload to ``Instructions.clip_norm`` (``_clipped``), and the server noises the unmasked means.

No published federated LoRA system ships this for heterogeneous ranks (Bai et al. 2024 use a
dense SVD of the materialised Delta W and need every client's factors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pollinate.privacy.central import clip_delta
from pollinate.proto.instructions import Instructions
from pollinate.proto.run_config import option
from pollinate.strategies.base import (AggregationError, ClientUpdate, Exchange, NamedArrays, NodeState, Request,
                                       lora_pairs)
from pollinate.strategies.heterogeneous import HeterogeneousRanks, at_rank
from pollinate.strategies.lowrank import factored_svd, split_factors
from pollinate.strategies.merged import DELTA_A, DELTA_B, add_to_deltas, fold_into_lora, join_deltas, split_deltas
from pollinate.strategies.sketch_math import (delta_sketch_matrix, orthonormal_basis, project_upload, projected_svd,
                                              sketch_matrix, sketch_upload)

SKETCH_Y, SKETCH_Q, SKETCH_Z = ".sketch_y", ".sketch_q", ".sketch_z"
TRAINED = "sketch-trained-adapter"  # node state: this round's trained adapter, kept from exchange 1 for exchange 2
SENT = "sketch-sent-factors"  # node state under sketch_delta: the LoRA factors the node received, for D_k


class Sketch(HeterogeneousRanks):
    name = "sketch"
    summary = ("exact sum of B_k A_k at any ranks from two summed uploads (randomised range finder), the part "
               "past rank R merged into the base: linear")
    exact = True
    linear = True
    uploads_own_deltas = True  # under central DP: Y_k and Z_k of D_k, the node's own change (sketch_delta)
    private_means = 2  # Y and Z: two releases of one Poisson sample, accounted jointly (privacy_rounds.py)

    @dataclass(frozen=True)
    class Options:
        oversample: int = option(8, "sketch size = sum of the nodes' ranks + this", lambda v: v >= 0, "use >= 0")
        dp_size: int = option(0, "sketch size under privacy.mode = 'central', fixed whoever is sampled (0: 2 x "
                              "adapter.r + oversample); exact while sum of the ranks + adapter.r <= it",
                              lambda v: v >= 0, "use >= 0 (0: the default)")

    options: Options

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        raise AggregationError("sketch aggregates in run_round, from summed sketches")

    def run_round(self, state: NamedArrays, ranks: Mapping[int, int], exchange: Exchange,
                  round_number: int) -> NamedArrays:
        adapter, deltas = split_deltas(state)
        pairs = lora_pairs(adapter)
        factor_keys = {k for pair in pairs.values() for k in pair}
        others = [k for k in adapter if k not in factor_keys]
        delta = self.ctx.central_dp  # the nodes sketch their own change D_k (module docstring)
        size = self.sketch_size(ranks)
        seed = int(np.random.default_rng([self.ctx.seed, round_number]).integers(2**31))
        first = {}
        for node, rank in ranks.items():
            sent = join_deltas(at_rank(adapter, rank, self.ctx), deltas)
            shapes = {k: adapter[k].shape for k in others}
            shapes.update({prefix + SKETCH_Y: (adapter[b].shape[0], size) for prefix, (_, b) in pairs.items()})
            first[node] = Request(sent, Instructions(round=round_number, rank=rank, upload="sketch-y",
                                                     sketch_seed=seed, sketch_size=size, sketch_delta=delta),
                                  reply_shapes=shapes)
        sketches = exchange.mean(first)
        out = {k: sketches.tensors[k].astype(np.float32) for k in others}  # under DP: sent + noisy mean delta
        # Under DP Q keeps every column of the sketch's range: its numerical rank would depend on the sample.
        bases = {prefix: orthonormal_basis(sketches.tensors[prefix + SKETCH_Y], rel_tol=None if delta else 1e-10)
                 for prefix in pairs}
        # Exchange 2 goes to the nodes in the first mean: their trained factors are what Q spans.
        second = {node: Request({prefix + SKETCH_Q: q.astype(np.float32) for prefix, q in bases.items()},
                                Instructions(round=round_number, rank=ranks[node], upload="sketch-z",
                                             sketch_delta=delta),
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
            z = projections.tensors[prefix + SKETCH_Z].astype(np.float64)
            if delta:  # the new product s_R B A + Q Z: the global plus the (noisy) mean delta, as DP-FedAvg
                left, s, vt = factored_svd([np.float64(s_global) * adapter[b_key].astype(np.float64), bases[prefix]],
                                           [adapter[a_key].astype(np.float64), z], [1.0, 1.0])
            else:
                left, s, vt = projected_svd(bases[prefix], z)
            a, b = split_factors(left, s, vt, rank)
            out[a_key], out[b_key] = a.astype(np.float32), (b / np.float32(s_global)).astype(np.float32)
            if s.shape[0] > rank and s[rank] > 1e-6 * s[0]:
                root = np.sqrt(s[rank:])
                add_to_deltas(deltas, prefix, [root[:, None] * vt[rank:]], [left[:, rank:] * root])
        return join_deltas(out, deltas)

    def sketch_size(self, ranks: Mapping[int, int]) -> int:
        """Columns of Omega: the sampled ranks' sum + oversample; under central DP a size fixed before sampling."""
        if not self.ctx.central_dp:
            return sum(ranks.values()) + self.options.oversample
        return self.options.dp_size or 2 * self.ctx.rank + self.options.oversample

    def export(self, state: NamedArrays) -> NamedArrays:
        adapter, deltas = split_deltas(state)
        return fold_into_lora(adapter, deltas, self.ctx.scaling, self.ctx.rank)[0]

    # The node half.

    def transform_upload(self, trained: NamedArrays, received: NamedArrays, instructions: Instructions,
                         node_state: NodeState) -> tuple[NamedArrays, dict[str, float]]:
        """Exchange 1's upload: Y_k = s_k B_k (A_k Omega) per module, other tensors as trained; keeps ``trained``.

        With ``sketch_delta`` (central DP): Y_k = D_k Omega' of the node's change D_k = s_k (B_k A_k - B_sent A_sent)
        (module docstring); it keeps the received factors too, for Z_k. The other tensors go up as trained: the
        server sent them, so it takes their delta itself."""
        if instructions.upload != "sketch-y":
            return trained, {}
        scaling = self.ctx.scaling(instructions.rank or self.ctx.rank)
        pairs = lora_pairs(trained)
        factor_keys = {k for pair in pairs.values() for k in pair}
        out = {k: v for k, v in trained.items() if k not in factor_keys}
        matrix = delta_sketch_matrix if instructions.sketch_delta else sketch_matrix
        for prefix, (a_key, b_key) in pairs.items():
            omega = matrix(instructions.sketch_seed, trained[a_key].shape[1], instructions.sketch_size)
            out[prefix + SKETCH_Y] = sketch_upload(trained[a_key], trained[b_key], scaling, omega)
            if instructions.sketch_delta:
                out[prefix + SKETCH_Y] -= sketch_upload(received[a_key], received[b_key], scaling, omega)
        node_state[TRAINED] = {k: np.asarray(v, dtype=np.float32) for k, v in trained.items()}
        if instructions.sketch_delta:
            node_state[SENT] = {k: np.asarray(received[k], dtype=np.float32) for k in factor_keys}
        else:
            node_state.pop(SENT, None)
        if instructions.sketch_delta and instructions.clip_norm > 0:
            out = self._clipped(out, received, instructions.clip_norm)
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}, {}

    @staticmethod
    def _clipped(upload: NamedArrays, received: NamedArrays, clip_norm: float) -> NamedArrays:
        """Central DP under secure aggregation, where the server cannot clip: the node's change in this upload
        (its Y_k or Z_k, and what it changed of the tensors it was sent) scaled to norm at most C, as the server
        would (``CentralPrivacy.mean``)."""
        change = {k: np.subtract(v, received[k], dtype=np.float32) if k in received else v for k, v in upload.items()}
        clipped, _ = clip_delta(change, clip_norm)
        return {k: received[k] + v if k in received else v for k, v in clipped.items()}

    def trains(self, instructions: Instructions) -> bool:
        return instructions.upload != "sketch-z"  # exchange 2 projects what exchange 1 trained

    def answer(self, received: NamedArrays, instructions: Instructions, node_state: NodeState) -> NamedArrays:
        """Exchange 2's upload: Z_k = Q^T (s_k B_k A_k) per module, from the factors kept at exchange 1; with
        ``sketch_delta``, Z_k = Q^T D_k."""
        if TRAINED not in node_state:
            raise ValueError(f"round {instructions.round}: asked for the sketch projection before this node sent "
                             f"its sketch (exchange 1); nothing to project")
        if instructions.sketch_delta and SENT not in node_state:
            raise ValueError(f"round {instructions.round}: asked to project the change of this node's adapter, but "
                             f"its sketch (exchange 1) was of the whole product; the two exchanges disagree")
        trained, sent = node_state.pop(TRAINED), node_state.pop(SENT, None)
        scaling = self.ctx.scaling(instructions.rank or self.ctx.rank)
        out = {}
        for prefix, (a_key, b_key) in lora_pairs(trained).items():
            q = received[prefix + SKETCH_Q]
            out[prefix + SKETCH_Z] = project_upload(q, trained[a_key], trained[b_key], scaling)
            if instructions.sketch_delta and sent is not None:
                out[prefix + SKETCH_Z] -= project_upload(q, sent[a_key], sent[b_key], scaling)
        if instructions.sketch_delta and instructions.clip_norm > 0:
            out = self._clipped(out, {}, instructions.clip_norm)
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
