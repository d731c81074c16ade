"""Byzantine-robust aggregation rules on LoRA updates, pure numpy.

Conventions: A is (r, d_in), B is (d_out, r) with the LoRA scaling s already folded into B, so a node's
update of one module is the product P = B @ A. Ranks may differ between nodes.

- Distances between products come from r x r Gram matrices of the factors, never a d_out x d_in matrix:
  <B_i A_i, B_j A_j>_F = tr(A_i^T B_i^T B_j A_j) = sum((B_i^T B_j) * (A_i A_j^T)), so
  ||B_i A_i - B_j A_j||_F^2 = <P_i, P_i> - 2 <P_i, P_j> + <P_j, P_j>.
- Multi-Krum: Blanchard et al. 2017, NeurIPS, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent" (score = sum of squared distances to the n - f - 2 closest others; multi-Krum keeps the
  m best).
- Coordinate-wise median and trimmed mean: Yin et al. 2018, ICML, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates" (Sec. 3, Def. 1 and 2).
- Norm clipping ("norm bounding"): Sun et al. 2019, "Can You Really Backdoor Federated Learning?".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def product_gram(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray]) -> np.ndarray:
    """(n, n) inner products <B_i A_i, B_j A_j>_F of n low-rank products, ranks r_i may differ.

    Stacking B = [B_1 | ... | B_n] (d_out, R) and A = [A_1; ...; A_n] (R, d_in), R = sum r_i, entry (p, q) of
    (B^T B) * (A A^T) is (b_p . b_q)(a_p . a_q); summing the (i, j) block gives <B_i A_i, B_j A_j>.
    Cost O((d_out + d_in) R^2), memory O(R^2).
    """
    b = np.concatenate([np.asarray(x, dtype=np.float64) for x in bs], axis=1)  # (d_out, R)
    a = np.concatenate([np.asarray(x, dtype=np.float64) for x in as_], axis=0)  # (R, d_in)
    starts = np.cumsum([0] + [x.shape[1] for x in bs[:-1]])  # first column of each node's block
    h = (b.T @ b) * (a @ a.T)  # (R, R)
    return np.add.reduceat(np.add.reduceat(h, starts, axis=0), starts, axis=1)


def flat_gram(tensors: Sequence[np.ndarray]) -> np.ndarray:
    """(n, n) inner products of n same-shaped dense tensors (heads and other non-LoRA adapter tensors)."""
    x = np.stack([np.asarray(t, dtype=np.float64).ravel() for t in tensors])  # (n, size)
    return x @ x.T


def squared_distances(gram: np.ndarray) -> np.ndarray:
    """(n, n) ||x_i - x_j||^2 from the Gram matrix of the x_i (negatives from rounding set to 0)."""
    norms = np.diag(gram)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)


def krum_scores(d2: np.ndarray, f: int) -> np.ndarray:
    """Krum's score per node: the sum of its squared distances to its n - f - 2 closest others.

    Blanchard et al. 2017, Sec. 4. Their guarantee needs n >= 2f + 3; with fewer nodes the neighbourhood is
    clamped to [1, n - 1] so a small round still ranks its nodes (and a round of one node scores 0).
    """
    n = d2.shape[0]
    neighbours = min(max(n - f - 2, 1), n - 1)
    others = np.sort(d2 + np.diag(np.full(n, np.inf)), axis=1)  # each row's distances to the others, ascending
    return others[:, :neighbours].sum(axis=1)


def multi_krum(d2: np.ndarray, f: int, m: int) -> list[int]:
    """The indices of the ``m`` nodes with the lowest Krum scores (ties: lower index), in ascending order."""
    scores = krum_scores(d2, f)
    return sorted(np.argsort(scores, kind="stable")[:m].tolist())


def trim_count(n: int, trim: float) -> int:
    """How many values trimmed mean drops at each end of every coordinate: ceil(trim * n), at most (n - 1) // 2."""
    return min(math.ceil(trim * n - 1e-9), (n - 1) // 2)


def trimmed_mean(x: np.ndarray, weights: Sequence[float], trim: int) -> np.ndarray:
    """Coordinate-wise trimmed mean of x (n, ...): per coordinate drop the ``trim`` smallest and largest values
    and take the weighted mean of the rest, their weights renormalised (Yin et al. 2018, Def. 2, with example
    weights; ``trim`` = 0 is the weighted mean). Every coordinate stays within the range of the values it kept.
    """
    n = x.shape[0]
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64).reshape((n,) + (1,) * (x.ndim - 1)), x.shape)
    order = np.argsort(x, axis=0, kind="stable")
    kept = slice(trim, n - trim)
    xs = np.take_along_axis(x, order, axis=0)[kept]
    ws = np.take_along_axis(w, order, axis=0)[kept]
    return (xs * ws).sum(axis=0) / ws.sum(axis=0)


def coordinate_median(x: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of x (n, ...) (Yin et al. 2018, Def. 1). Unweighted on purpose: a weighted
    median would hand a node that reports half of the round's examples every coordinate."""
    return np.median(x, axis=0)


def clip_factors(norms: np.ndarray, bound: float) -> np.ndarray:
    """min(1, bound / ||u_k||) per update: the scale that brings each update's L2 norm within ``bound``."""
    norms = np.asarray(norms, dtype=np.float64)
    return np.where(norms > bound, bound / np.maximum(norms, np.finfo(np.float64).tiny), 1.0)
