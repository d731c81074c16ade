"""The randomness a DP guarantee rests on, drawn from the operating system's CSPRNG (``os.urandom``).

A seeded PCG64 (numpy's default) is fine for experiments but predictable: whoever learns or guesses its
state (a seed in the public run config, or enough of its output) can subtract the noise or know which nodes
were sampled, and the guarantee is gone. The accountant assumes noise and sampling nobody can predict.

- ``SecureGaussian``: Gaussian noise from OS entropy through Box-Muller. Each value is the sum of four such
  normals with half the standard deviation, as Opacus' ``secure_mode`` does, against the floating-point
  attack on textbook samplers (Mironov 2012; Holohan and Braghin 2021). It has numpy's ``normal`` signature,
  so it stands in for a ``np.random.Generator`` wherever central DP draws noise.
- ``poisson_sample``: every item kept independently with probability q, from ``secrets.SystemRandom``: the
  Poisson subsampling whose amplification the accountant applies (DP-FedAvg, McMahan et al. 2018, Alg. 1).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

_T = TypeVar("_T")
_SUMMED = 4  # normals summed per value: std sigma = sqrt(4) * sigma / 2


def secure_uniform(n: int) -> np.ndarray:
    """``n`` floats uniform on (0, 1], each from 53 bits of OS entropy (never 0: Box-Muller takes its log)."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 1.0) * 2.0 ** -53


def secure_standard_normal(n: int) -> np.ndarray:
    """``n`` draws of N(0, 1) from OS entropy (Box-Muller over ``secure_uniform``)."""
    u1, u2 = secure_uniform(n), secure_uniform(n)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


class SecureGaussian:
    """Gaussian noise from the OS CSPRNG, with ``np.random.Generator.normal``'s signature."""

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | Sequence[int] | None = None
               ) -> np.ndarray | float:
        shape = () if size is None else ((size,) if isinstance(size, int) else tuple(size))
        n = int(np.prod(shape, dtype=np.int64))
        summed = secure_standard_normal(n * _SUMMED).reshape(_SUMMED, n).sum(axis=0) / math.sqrt(_SUMMED)
        values = loc + scale * summed.reshape(shape)
        return float(values) if size is None else values


def poisson_sample(items: Sequence[_T], rate: float) -> list[_T]:
    """Each of ``items`` independently with probability ``rate``, from the OS CSPRNG (no seed can replay it)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"a Poisson sampling rate must be in (0, 1], got {rate}")
    draw = secrets.SystemRandom()
    return [item for item in items if draw.random() < rate]
