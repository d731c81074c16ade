"""HetLoRA's aggregation and self-pruning (Cho et al. 2024, Sec. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pollinate.strategies.base import lora_pairs
from pollinate.strategies.lowrank import pad_rank


def hetlora_aggregate(as_: Sequence[np.ndarray], bs: Sequence[np.ndarray], weights: Sequence[float],
                      max_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad every client to ``max_rank`` and average with weights proportional to w_k ||B_k A_k||_F.

    ||B A||_F is computed from the factors as sqrt(trace((B^T B)(A A^T))): no d_out x d_in matrix.
    All-zero updates (e.g. the first round, B = 0) fall back to the plain weights.
    """
    norms = np.array([np.sqrt(max(0.0, float(np.trace((b.T.astype(np.float64) @ b) @ (a.astype(np.float64) @ a.T)))))
                      for a, b in zip(as_, bs, strict=True)])
    raw = np.asarray(weights, dtype=np.float64) * norms
    p = raw / raw.sum() if raw.sum() > 0 else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    padded = [pad_rank(a, b, max_rank) for a, b in zip(as_, bs, strict=True)]
    a = sum(w * pa.astype(np.float64) for w, (pa, _) in zip(p, padded, strict=True))
    b = sum(w * pb.astype(np.float64) for w, (_, pb) in zip(p, padded, strict=True))
    return np.asarray(a), np.asarray(b)


def self_prune_rank(a: np.ndarray, b: np.ndarray, gamma: float) -> int:
    """The smallest r' such that ||B[:, r':] A[r':]||_F <= gamma * ||B A||_F (the dropped tail is small)."""
    total = np.linalg.norm(b.astype(np.float64) @ a)
    for keep in range(1, a.shape[0] + 1):
        tail = np.linalg.norm(b[:, keep:].astype(np.float64) @ a[keep:]) if keep < a.shape[0] else 0.0
        if tail <= gamma * total:
            return keep
    return a.shape[0]


def prune_tail(tensors: dict[str, np.ndarray], gamma: float) -> tuple[dict[str, np.ndarray], int]:
    """Zero every LoRA pair past the largest per-module ``self_prune_rank``; returns (tensors, that rank)."""
    pairs = lora_pairs(tensors)
    keep = max((self_prune_rank(tensors[a], tensors[b], gamma) for a, b in pairs.values()), default=0)
    out = dict(tensors)
    for a, b in pairs.values():
        out[a], out[b] = tensors[a].copy(), tensors[b].copy()
        out[a][keep:], out[b][:, keep:] = 0.0, 0.0
    return out, keep
