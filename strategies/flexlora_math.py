"""FlexLoRA's redistribution (Bai et al. 2024, Eq. 4-5): truncated SVD of the summed full updates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pollinate.strategies.lowrank import factored_svd, split_factors


def flexlora_redistribute(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float],
                          scalings: Sequence[float], out_ranks: Sequence[int],
                          out_scalings: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each output rank r_j, (a_j, b_j) with out_scalings[j] * b_j @ a_j the best rank-r_j
    approximation of Delta W = sum_k weights[k] * scalings[k] * B_k A_k."""
    u, s, vt = factored_svd(bs, as_, [w * sc for w, sc in zip(weights, scalings, strict=True)])
    out = []
    for rank, scaling in zip(out_ranks, out_scalings, strict=True):
        a, b = split_factors(u, s, vt, rank)
        out.append((a, b / scaling))
    return out
