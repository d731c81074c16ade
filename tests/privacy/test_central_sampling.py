"""Central DP as the accountant assumes it: secret Poisson sampling at rate q, a fixed denominator q N, CSPRNG noise.

Statistical checks use a fixed number of draws and bounds of 8 binomial standard deviations: a false failure
has probability below 1e-14, so they cannot be flaky, yet a sampler off by a few points of q fails them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pollinate.privacy.accountant import Release, epsilon
from pollinate.privacy.csprng import SecureGaussian
from pollinate.proto.instructions import Instructions
from pollinate.proto.run_config import RunConfig
from pollinate.server.privacy_rounds import CentralPrivacy
from pollinate.server.rounds import sample_nodes
from pollinate.strategies import ClientUpdate, MeanUpdate, Request

B, A = "m.lora_B.weight", "m.lora_A.weight"
NODES = list(range(101, 121))  # 20 connected nodes


class NoNoise:
    """A noise source that adds nothing, so the mean's arithmetic can be read exactly (noise is tested apart)."""

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: object = None) -> np.ndarray | float:
        return 0.0 if size is None else np.zeros(size)


def _federation(q: float):
    return RunConfig().replace(**{"federation.fraction-train": q, "federation.min-nodes": 2}).federation


def test_nodes_are_sampled_at_rate_q_each_independently() -> None:
    q, draws = 0.3, 1000
    counts = {node: 0 for node in NODES}
    sizes = []
    for number in range(draws):
        sample = sample_nodes(NODES, _federation(q), seed=0, round_number=number, secret=True)
        sizes.append(len(sample))
        for node in sample:
            counts[node] += 1
    total, n = sum(sizes), draws * len(NODES)
    assert abs(total - q * n) < 8 * math.sqrt(n * q * (1 - q))  # 6000 +- 518
    for node, count in counts.items():  # every node at rate q, none favoured: 300 +- 116
        assert abs(count - q * draws) < 8 * math.sqrt(draws * q * (1 - q)), node
    assert min(sizes) < q * len(NODES) < max(sizes)  # the sample size varies, as Poisson sampling's does


def test_the_public_seed_does_not_determine_the_sample() -> None:
    federation = _federation(0.5)
    secret = {tuple(sample_nodes(NODES, federation, seed=7, round_number=1, secret=True)) for _ in range(20)}
    # 20 draws of 20 fair coins with the same seed and round: all equal has probability 2^-380.
    assert len(secret) > 1
    seeded = {tuple(sample_nodes(NODES, federation, seed=7, round_number=1)) for _ in range(20)}
    assert len(seeded) == 1  # the contrast: without DP, the seeded sample is reproducible (and public)


def _central(q: float, z: float = 2.0, rng: object = None) -> CentralPrivacy:
    cfg = RunConfig().replace(**{"privacy.mode": "central", "privacy.noise-multiplier": z, "privacy.clip-norm": 0.5,
                                 "federation.strategy": "ffa-lora"})
    return CentralPrivacy(cfg.privacy, cfg.federation.rounds, rng=rng, sample_rate=q)  # type: ignore[arg-type]


SENT = {A: np.ones((4, 16), np.float32), B: np.zeros((16, 4), np.float32)}
REQUEST = Request(SENT, Instructions(train_factors="B"))
BIG = {A: SENT[A], B: np.full((16, 4), 1.0, np.float32)}  # ||delta|| = 8 >> C = 0.5: every delta clipped to C


@pytest.mark.parametrize("realised", [2, 4, 7])
def test_the_mean_divides_by_the_expected_count_whatever_the_realised_one(realised: int) -> None:
    central = _central(q=0.5, rng=NoNoise())
    central.start_round(1, connected=8)  # W = q N = 4, fixed before anyone is sampled
    updates = [ClientUpdate(node_id=n, tensors=BIG, num_examples=10) for n in range(realised)]
    mean = central.mean({n: REQUEST for n in range(realised)}, updates)
    clipped = 0.5 / 8  # each element of a clipped delta
    assert np.allclose(mean.tensors[B], realised * clipped / 4)  # sum over the realised m, divided by W = 4
    assert central.entry is not None
    assert central.entry.metrics["noise-std"] == pytest.approx(2.0 * 0.5 / 4)  # z C / W, not z C / m
    assert central.entry.metrics["expected-clients"] == 4 and central.entry.metrics["clients"] == realised
    # The accountant's q is the sampling rate, not realised / connected.
    assert central.entry.sample_rate == 0.5
    assert central.entry.epsilon == pytest.approx(epsilon([Release(2.0, 0.5, 1)], central.p.delta))


def test_under_secure_aggregation_the_unmasked_mean_is_rescaled_to_the_fixed_denominator() -> None:
    central = _central(q=0.5, rng=NoNoise())
    central.start_round(1, connected=8)
    d = np.full((16, 4), 0.01, np.float32)
    unmasked = MeanUpdate({A: SENT[A], B: SENT[B] + d}, (1, 2), 20, {})  # the equal-weight mean of m = 2 uploads
    out = central.noised_mean({1: REQUEST, 2: REQUEST}, unmasked)
    assert np.allclose(out.tensors[B], 2 * 0.01 / 4) and np.array_equal(out.tensors[A], SENT[A])
    assert central.entry is not None and central.entry.metrics["noise-std"] == pytest.approx(2.0 * 0.5 / 4)


def test_central_noise_comes_from_the_os_csprng_with_the_configured_std() -> None:
    central = _central(q=1.0)
    assert isinstance(central.rng, SecureGaussian)  # the default: no seed, no PCG64 state to recover
    central.start_round(1, connected=4)
    updates = [ClientUpdate(node_id=n, tensors=BIG, num_examples=10) for n in range(4)]
    noise = central.mean({n: REQUEST for n in range(4)}, updates).tensors[B] - 4 * (0.5 / 8) / 4
    expected = 2.0 * 0.5 / 4
    assert abs(noise.std() - expected) < 8 * expected / math.sqrt(2 * noise.size)
    assert abs(noise.mean()) < 8 * expected / math.sqrt(noise.size)
    gaussian = SecureGaussian()
    draws = gaussian.normal(0.0, 3.0, size=20000)
    assert abs(draws.std() - 3.0) < 8 * 3.0 / math.sqrt(2 * draws.size)
    assert not np.array_equal(draws[:100], SecureGaussian().normal(0.0, 3.0, size=100))  # nothing replays it
