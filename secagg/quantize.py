"""Fixed-point encoding of float32 vectors into the ring Z_{2^b}, where masks add and cancel exactly.

A client's value x (times its weight w, folded in here, before masking) is clipped to [-c, c], shifted
by +c so it is non-negative, and rounded to one of ``levels`` points ``k * step`` with
``step = 2c / (levels - 1)``: the integer k in [0, levels - 1] is what gets masked. Summing n such
integers never wraps the ring when ``n * (levels - 1) < 2^b``, so the server's unmasked total is the
true integer sum, and ``dequantize_sum`` maps it back with ``total * step - n * c``.

Error bound, per coordinate, for values inside [-c, c] after weighting:
    deterministic rounding: |dequantize_sum - sum_u w_u x_u| <= n * step / 2
    stochastic rounding:    |error| < n * step, and the error is zero-mean (unbiased)
Values outside [-c, c] are clipped first, which adds |w x| - c for each clipped term; float64
rounding adds a relative 2^-52 of the sum (negligible at levels <= 2^50, which is enforced).

The weight: pass ``w_u`` already normalised (for FedAvg, n_u / expected total examples, so
sum_u w_u x_u is the weighted mean and stays within [-c, c]); raw example counts would need a clip
range as large as the counts. To recover the weighted mean when the total is unknown, append the
weight as one more coordinate (quantised the same way) and divide by its dequantised sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RING_DTYPES = {32: np.uint32, 64: np.uint64}


@dataclass(frozen=True)
class Quantization:
    """How floats map to ring elements: clip range c, number of levels, ring Z_{2^modulus_bits}."""

    clip: float = 1.0
    """c: weighted values are clipped to [-c, c] before rounding."""
    levels: int = 2**16
    """Number of representable points over [-c, c]; step = 2c / (levels - 1)."""
    modulus_bits: int = 32
    """b of the ring Z_{2^b}: 32 (numpy uint32) or 64 (numpy uint64); arithmetic wraps natively."""

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"quantization clip range must be a positive finite float, got {self.clip}")
        if self.modulus_bits not in RING_DTYPES:
            raise ValueError(f"modulus_bits must be 32 or 64 (numpy uint32/uint64 wrap natively), "
                             f"got {self.modulus_bits}")
        if not 2 <= self.levels < 2**self.modulus_bits:
            raise ValueError(f"levels must be in [2, 2^{self.modulus_bits}), got {self.levels}")
        if self.levels > 2**50:
            # float64 carries 53 bits: past ~2^50 levels its rounding of k * step rivals step itself.
            raise ValueError(f"levels {self.levels} > 2^50 is finer than float64 can carry; use <= 2^50")

    @property
    def step(self) -> float:
        return 2.0 * self.clip / (self.levels - 1)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return RING_DTYPES[self.modulus_bits]

    def check_fits(self, n_clients: int) -> None:
        """Raise ValueError if the sum of n_clients quantised vectors could wrap around the modulus."""
        if n_clients < 1:
            raise ValueError(f"n_clients must be >= 1, got {n_clients}")
        if n_clients * (self.levels - 1) >= 2**self.modulus_bits:
            most = (2**self.modulus_bits - 1) // (self.levels - 1)
            raise ValueError(
                f"{n_clients} clients x {self.levels} levels can overflow the 2^{self.modulus_bits} ring "
                f"(the sum would wrap around): use at most {most} clients at this many levels, fewer levels "
                f"(<= {(2**self.modulus_bits - 1) // n_clients + 1}), or modulus_bits=64")


def quantize(values: np.ndarray, weight: float, q: Quantization,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """Ring encoding of ``weight * values``: (len,) uint32/uint64 in [0, levels). ``rng`` set = stochastic rounding."""
    if values.ndim != 1:
        raise ValueError(f"quantize expects a flat vector, got shape {values.shape}; flatten the named arrays first")
    if not np.isfinite(weight):
        raise ValueError(f"weight must be finite, got {weight}")
    # float64: k up to 2^50 is exact, where float32 would lose the low bits of k past 2^24.
    scaled = np.clip(values.astype(np.float64) * weight, -q.clip, q.clip)
    scaled += q.clip
    scaled /= q.step
    if rng is None:
        np.rint(scaled, out=scaled)
    else:
        # Stochastic rounding: floor(v + U[0,1)) rounds up with probability frac(v), so E[k] = v.
        scaled += rng.random(scaled.shape)
        np.floor(scaled, out=scaled)
    if not np.isfinite(scaled).all():
        raise ValueError("quantize got NaN values; the client's update is not a number")
    np.clip(scaled, 0, q.levels - 1, out=scaled)
    return scaled.astype(q.dtype)


def dequantize_sum(total: np.ndarray, n_clients: int, q: Quantization) -> np.ndarray:
    """float64 sum of n_clients' weighted values from the ring sum of their encodings (removes n * c offset)."""
    q.check_fits(n_clients)
    if total.dtype != q.dtype:
        raise ValueError(f"ring sum has dtype {total.dtype}, expected {np.dtype(q.dtype)} "
                         f"for a 2^{q.modulus_bits} ring")
    return total.astype(np.float64) * q.step - n_clients * q.clip
