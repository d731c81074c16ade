"""Updates merged into the frozen base: low-rank "base deltas" carried beside the LoRA adapter.

FLoRA and FedEx-LoRA fold exact updates into the base weights: W = W0 + B_d A_d, with the
factors (A_d: (q, d_in), B_d: (d_out, q)) kept per module under ``<module>.base_delta_A`` /
``<module>.base_delta_B`` in the server state and sent to the nodes, which add them to their
frozen base. Deltas are re-compressed (QR + small SVD, no d_out x d_in matrix) after every
round, dropping only numerically zero directions, so they stay exact and small. For export,
deltas and the adapter fold into one plain LoRA that PEFT loads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pollinate.strategies.base import NamedArrays, lora_pairs
from pollinate.strategies.lowrank import factored_svd, pad_rank

DELTA_A, DELTA_B = ".base_delta_A", ".base_delta_B"
Deltas = dict[str, tuple[np.ndarray, np.ndarray]]  # module prefix -> (A_d (q, d_in), B_d (d_out, q))


def split_deltas(tensors: Mapping[str, np.ndarray]) -> tuple[NamedArrays, Deltas]:
    """(the adapter tensors, the base deltas by module prefix)."""
    adapter = {k: v for k, v in tensors.items() if not k.endswith((DELTA_A, DELTA_B))}
    deltas = {k.removesuffix(DELTA_A): (v, tensors[k.removesuffix(DELTA_A) + DELTA_B])
              for k, v in tensors.items() if k.endswith(DELTA_A)}
    return adapter, deltas


def join_deltas(adapter: Mapping[str, np.ndarray], deltas: Deltas) -> NamedArrays:
    out = dict(adapter)
    for prefix, (a, b) in deltas.items():
        out[prefix + DELTA_A], out[prefix + DELTA_B] = a, b
    return out


def add_to_deltas(deltas: Deltas, prefix: str, as_: Sequence[np.ndarray], bs: Sequence[np.ndarray],
                  rel_tol: float = 1e-6) -> None:
    """deltas[prefix] += sum_i B_i A_i, re-compressed to its numerical rank (exact up to rel_tol)."""
    if prefix in deltas:
        as_, bs = [deltas[prefix][0], *as_], [deltas[prefix][1], *bs]
    u, s, vt = factored_svd(list(bs), list(as_), [1.0] * len(as_))
    keep = int(np.sum(s > rel_tol * s[0])) if s.size and s[0] > 0 else 0
    keep = max(keep, 1)  # a zero delta still has shape (1, d_in) / (d_out, 1)
    root = np.sqrt(s[:keep])
    deltas[prefix] = ((root[:, None] * vt[:keep]).astype(np.float32), (u[:, :keep] * root).astype(np.float32))


def fold_into_lora(adapter: NamedArrays, deltas: Deltas, scaling: Callable[[int], float],
                   rank: int) -> tuple[NamedArrays, int]:
    """One plain LoRA equal to base deltas + adapter: B' = [B_d / s', B s / s'], A' = [A_d; A], padded to one rank.

    ``scaling`` is the run's rule rank -> s (``StrategyContext.scaling``); the adapter is at ``rank``.
    Returns the adapter and its rank r' (scaling s' = scaling(r')), for PEFT's export.
    """
    pairs = lora_pairs(adapter)
    if not deltas:
        return adapter, rank
    rank_out = max(rank + (deltas[p][0].shape[0] if p in deltas else 0) for p in pairs)
    s, s_out = scaling(rank), scaling(rank_out)
    out = dict(adapter)
    for prefix, (a_key, b_key) in pairs.items():
        a, b = adapter[a_key], adapter[b_key] * np.float32(s / s_out)
        if prefix in deltas:
            da, db = deltas[prefix]
            a, b = np.concatenate([da, a]), np.concatenate([db / np.float32(s_out), b], axis=1)
        out[a_key], out[b_key] = (np.ascontiguousarray(t, dtype=np.float32) for t in pad_rank(a, b, rank_out))
    return out, rank_out
