"""FLoRA (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations"): stacking instead of averaging.

Each round every client trains a fresh LoRA at its own rank; the server stacks the
clients' factors, B = [p_1 s_1 B_1 | ... | p_K s_K B_K], A = [A_1; ...; A_K], whose product is
exactly sum_k p_k s_k B_k A_k (Eq. 5), and merges it into the base weights (``strategies.merged``).
Exact for any mix of ranks; not linear (the server needs each client's factors).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pollinate.proto.instructions import Instructions
from pollinate.strategies.base import ClientUpdate, NamedArrays, Request, example_weights, lora_pairs
from pollinate.strategies.fedavg import weighted_mean
from pollinate.strategies.heterogeneous import HeterogeneousRanks
from pollinate.strategies.merged import add_to_deltas, fold_into_lora, join_deltas, split_deltas


class FLora(HeterogeneousRanks):
    name = "flora"
    summary = "stack every client's B_k A_k exactly (any ranks), merge into the base, fresh LoRA each round"
    exact = True
    linear = False

    def fresh_lora(self, adapter: NamedArrays, rank: int, round_number: int) -> NamedArrays:
        """A new LoRA for this round: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) as PEFT initialises it, B = 0."""
        rng = np.random.default_rng([self.ctx.seed, round_number])
        out = dict(adapter)
        for a_key, b_key in lora_pairs(adapter).values():
            r_global, d_in = adapter[a_key].shape
            bound = 1.0 / np.sqrt(d_in)
            a = rng.uniform(-bound, bound, size=(r_global, d_in)).astype(np.float32)  # shared by all clients
            out[a_key] = np.ascontiguousarray(a[:rank])
            out[b_key] = np.zeros((adapter[b_key].shape[0], rank), dtype=np.float32)
        return out

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        adapter, deltas = split_deltas(state)
        fresh = self.fresh_lora(adapter, rank, round_number)
        return Request(join_deltas(fresh, deltas), Instructions(round=round_number, rank=rank),
                       reply_shapes={k: v.shape for k, v in fresh.items()})

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        adapter, deltas = split_deltas(state)
        weights = example_weights(updates)
        pairs = lora_pairs(adapter)
        factor_keys = {k for pair in pairs.values() for k in pair}
        out = weighted_mean([{k: u.tensors[k] for k in adapter if k not in factor_keys} for u in updates], weights) \
            if len(factor_keys) < len(adapter) else {}
        for prefix, (a_key, b_key) in pairs.items():
            bs = [u.tensors[b_key] * np.float32(w * self.ctx.scaling(u.rank or self.ctx.rank))
                  for u, w in zip(updates, weights, strict=True)]
            add_to_deltas(deltas, prefix, [u.tensors[a_key] for u in updates], bs)
            out[a_key] = adapter[a_key]
            out[b_key] = np.zeros_like(adapter[b_key])  # everything learned so far lives in the base delta
        return join_deltas(out, deltas)

    def export(self, state: NamedArrays) -> NamedArrays:
        adapter, deltas = split_deltas(state)
        return fold_into_lora(adapter, deltas, self.ctx.scaling, self.ctx.rank)[0]
