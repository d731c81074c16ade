"""Low-rank algebra on LoRA factors, never materialising a d_out x d_in matrix.

Conventions: A is (r, d_in), B is (d_out, r), the update is s * B @ A with s = ``lora_scaling``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """LoRA's s in s * B @ A, by PEFT's own rule (``LoraLayer.update_layer``): alpha / r (Hu et al. 2021), or
    alpha / sqrt(r) with ``use_rslora`` (rank-stabilised LoRA, Kalajdzievski 2023). The one place s is written."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad A's rows and B's columns up to ``rank``; B @ A is unchanged."""
    r = a.shape[0]
    if b.shape[1] != r:
        raise ValueError(f"A has rank {r} but B has {b.shape[1]} columns")
    if rank < r:
        raise ValueError(f"cannot pad a rank-{r} pair down to rank {rank}; use truncate_rank")
    return (np.pad(a, ((0, rank - r), (0, 0))), np.pad(b, ((0, 0), (0, rank - r))))


def truncate_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rank`` rows of A and columns of B."""
    if rank > a.shape[0]:
        raise ValueError(f"cannot truncate a rank-{a.shape[0]} pair to rank {rank}; use pad_rank")
    return a[:rank], b[:, :rank]


def factored_svd(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray],
                 weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (u (d_out, q), s (q,), vt (q, d_in)) of M = sum_k w_k B_k A_k, ranks r_k may differ.

    QR of the stacked [w_1 B_1 | ... | w_K B_K] and of [A_1; ...; A_K]^T, then an SVD of the
    small core R_B R_A^T (R x R, R = sum r_k): O((d_out + d_in) R^2) instead of O(d_out d_in min(d)).
    """
    if not (len(bs) == len(as_) == len(weights)) or not bs:
        raise ValueError(f"need as many B, A and weights (got {len(bs)}, {len(as_)}, {len(weights)}), at least one")
    for b, a in zip(bs, as_, strict=True):
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"B {b.shape} and A {a.shape} disagree on the rank")
    b_stack = np.concatenate([np.float64(w) * b for w, b in zip(weights, bs, strict=True)], axis=1)
    a_stack = np.concatenate([np.asarray(a, dtype=np.float64) for a in as_], axis=0)
    q_b, r_b = np.linalg.qr(b_stack)  # (d_out, m), (m, R)
    q_a, r_a = np.linalg.qr(a_stack.T)  # (d_in, n), (n, R)
    u_c, s, vt_c = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u_c, s, vt_c @ q_a.T


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-``rank`` pair of U diag(s) Vt: A = sqrt(s) Vt_r, B = U_r sqrt(s); zero-padded past len(s)."""
    keep = min(rank, s.shape[0])
    root = np.sqrt(s[:keep])
    a, b = root[:, None] * vt[:keep], u[:, :keep] * root
    return pad_rank(a, b, rank) if keep < rank else (a, b)
