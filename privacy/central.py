"""Client-level DP as pure numpy over named arrays: clip a delta, noise a mean, adapt the clip norm.

DP-FedAvg (McMahan et al. 2018, Alg. 1 with equal weights): every sampled client's adapter
delta is clipped to L2 norm C, the deltas are averaged with weight 1/m, and Gaussian noise
of std z * C / m is added to the mean, so one client's whole contribution is hidden behind
noise of multiplier z. Adaptive clipping (Andrew et al. 2021, "Differentially Private
Learning with Adaptive Clipping", Alg. 1) moves C toward the gamma-quantile of the clients'
delta norms using a noised count of unclipped clients. ``clip_delta`` is also what a client
runs itself under local DP, or under secure aggregation where the server cannot clip.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

NamedArrays = dict[str, np.ndarray]


def global_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all tensors taken together as one vector."""
    return math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors.values()))


def delta_of(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> NamedArrays:
    """What a client changed: reply - sent, per name (float32)."""
    return {k: np.subtract(reply[k], sent[k], dtype=np.float32) for k in reply}


def clip_delta(delta: Mapping[str, np.ndarray], clip_norm: float) -> tuple[NamedArrays, float]:
    """``delta`` scaled by min(1, C / ||delta||) (McMahan et al. 2018, Alg. 1 ClipFn), and its norm before."""
    norm = global_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * np.float32(scale)).astype(np.float32) for k, v in delta.items()}, norm


class Gaussian(Protocol):
    """Where noise comes from: ``np.random.Generator`` (tests), or ``privacy.csprng.SecureGaussian`` (runs)."""

    def normal(self, loc: float = ..., scale: float = ..., size: Any = ...) -> Any: ...


def add_gaussian_noise(tensors: Mapping[str, np.ndarray], std: float, names: Collection[str],
                       rng: Gaussian) -> NamedArrays:
    """``tensors`` with N(0, std^2) added to every element of ``names`` only (the tensors that were trained)."""
    return {k: (v + rng.normal(0.0, std, size=v.shape)).astype(np.float32) if k in names else v.copy()
            for k, v in tensors.items()}


@dataclass(frozen=True)
class PrivateMean:
    """The noised mean delta of one round and what adaptive clipping needs to know about it."""

    delta: NamedArrays
    unclipped: int  # clients whose delta norm was <= C (their b_i = 1)
    norms: tuple[float, ...]  # each client's delta norm before clipping (stays on the server, not stored)


def private_mean(deltas: Sequence[Mapping[str, np.ndarray]], clip_norm: float, noise_multiplier: float,
                 noised: Collection[str], rng: Gaussian, denominator: float | None = None) -> PrivateMean:
    """(1/W) sum_i clip(delta_i, C) + N(0, (z C / W)^2) on the ``noised`` names (McMahan et al. 2018, Alg. 1).

    W is the fixed ``denominator`` q N, the expected number of sampled clients, as the accountant assumes
    (DP-FedAvg's fixed-denominator estimator: the sensitivity of the mean is then C / W whatever the realised
    sample); without one, the realised count m (not private under Poisson sampling: for tests and benches).
    """
    if not deltas:
        raise ValueError("no client delta to average")
    m = denominator if denominator is not None else len(deltas)
    total: NamedArrays = {k: np.zeros_like(v, dtype=np.float32) for k, v in deltas[0].items()}
    norms = []
    for delta in deltas:
        clipped, norm = clip_delta(delta, clip_norm)
        norms.append(norm)
        for k in total:
            total[k] += clipped[k]
    mean = {k: v / np.float32(m) for k, v in total.items()}
    noisy = add_gaussian_noise(mean, noise_multiplier * clip_norm / m, noised, rng)
    return PrivateMean(delta=noisy, unclipped=sum(n <= clip_norm for n in norms), norms=tuple(norms))


def default_count_stddev(clients: int, noise_multiplier: float) -> float:
    """sigma_b: Andrew et al. 2021 suggest m / 20; at least z, so the count costs at most 1/4 of the budget.

    With few clients m / 20 is smaller than z / 2, which no update noise can compensate (see
    ``update_noise_multiplier``); sigma_b = z raises the update noise by a factor 1 / sqrt(3/4) only.
    """
    return max(clients / 20, noise_multiplier)


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_delta such that updates (z_delta) and the noisy count (sigma_b) together spend what z alone would.

    Andrew et al. 2021, Thm. 1: z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2, so
    z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, defined while 2 sigma_b > z.
    """
    if noise_multiplier <= 0:
        return noise_multiplier
    rest = noise_multiplier ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"adaptive clipping with noise multiplier z = {noise_multiplier:.4g} needs "
                         f"privacy.clipped-count-stddev > z / 2 = {noise_multiplier / 2:.4g} (it is "
                         f"{count_stddev:.4g}); raise it, e.g. to {noise_multiplier:.4g}, or set it to 0 for the default")
    return rest ** -0.5


def next_clip_norm(clip_norm: float, unclipped: int, clients: float, count_stddev: float, target_quantile: float,
                   learning_rate: float, rng: Gaussian) -> tuple[float, float]:
    """Andrew et al. 2021, Alg. 1: C <- C exp(-eta_C (b~ - gamma)), b~ = (sum b_i + N(0, sigma_b^2)) / m.

    Returns the next C and the noised unclipped fraction b~ (the only thing released about the norms).
    """
    noisy_fraction = (unclipped + rng.normal(0.0, count_stddev)) / clients
    return clip_norm * math.exp(-learning_rate * (noisy_fraction - target_quantile)), float(noisy_fraction)
