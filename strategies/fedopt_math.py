"""Adaptive server optimisers on a pseudo-gradient (Reddi et al. 2021, Algorithm 2)."""

from __future__ import annotations

from typing import Literal

import numpy as np


def fedopt_step(x: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, beta1: float,
                beta2: float, tau: float, variant: Literal["adam", "yogi"]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step: m = b1 m + (1-b1) D; v by Adam or Yogi; x + lr m / (sqrt(v) + tau). D = aggregate - x."""
    m = beta1 * m + (1 - beta1) * delta
    d2 = delta * delta
    if variant == "adam":
        v = beta2 * v + (1 - beta2) * d2
    else:  # Yogi: additive, sign-controlled update of v (Zaheer et al. 2018)
        v = v - (1 - beta2) * d2 * np.sign(v - d2)
    x = x + lr * m / (np.sqrt(v) + tau)
    return x.astype(np.float32), m.astype(np.float32), v.astype(np.float32)
