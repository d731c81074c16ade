"""Epsilon of a history of (subsampled) Gaussian releases, and the noise that fits a budget.

Every mechanism pollinate runs is ``steps`` compositions of a Gaussian mechanism with noise
multiplier z (noise std / sensitivity), Poisson-subsampled at rate q: DP-SGD (Abadi et al.
2016; q = batch / local examples, one step per optimiser step), client-level DP-FedAvg
(McMahan et al. 2018; q = sampled / all clients, one step per round) and local DP (q = 1).
The accounting itself is dp-accounting's RDP accountant (Mironov 2017); this module only
turns our history into its ``DpEvent``s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # dp-accounting pulls in scipy (about 1 s): imported when epsilon is computed, not with the store
    import dp_accounting

# The RDP accountant logs a warning for every order whose series does not converge at small alpha and skips
# that order (a valid, slightly looser bound): hundreds of lines per calibration on every node.
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Release:
    """One entry of an accountant history: ``steps`` Gaussian releases, noise multiplier z, sample rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _event(release: Release) -> dp_accounting.DpEvent:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(release.noise_multiplier)
    sampled = (gaussian if release.sample_rate >= 1.0
               else dp_accounting.PoissonSampledDpEvent(release.sample_rate, gaussian))
    return dp_accounting.SelfComposedDpEvent(sampled, release.steps)


def epsilon(history: Iterable[Release], delta: float) -> float:
    """The (epsilon, delta)-DP epsilon of composing every release in ``history`` (0 for no release)."""
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    releases = [r for r in history if r.steps > 0]
    for release in releases:
        if release.noise_multiplier <= 0:
            return math.inf  # a noiseless release of a sensitive value has no finite epsilon
        accountant.compose(_event(release))
    return float(accountant.get_epsilon(delta)) if releases else 0.0


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest z whose ``steps`` releases at rate ``sample_rate`` spend at most ``target_epsilon``."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    z = dp_accounting.calibrate_dp_mechanism(
        RdpAccountant, lambda z: _event(Release(z, sample_rate, steps)), target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    # Brent's method stops within tol of the root on either side; step up until the budget holds.
    while epsilon([Release(z, sample_rate, steps)], delta) > target_epsilon:
        z *= 1.0001
    return float(z)
