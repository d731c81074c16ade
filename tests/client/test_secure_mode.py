"""privacy.secure-mode: DP-SGD's noise from the OS CSPRNG (what Opacus' secure_mode is for), at Opacus' scale."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.optimizers import DPOptimizer

from pollinate.client.dp_sgd import SecureNoiseDPOptimizer
from pollinate.proto.run_config import ConfigError, RunConfig

SIZE, Z, C = 20000, 1.5, 2.0


def _noise_only_step(kind: type[DPOptimizer], generator: torch.Generator | None = None) -> torch.Tensor:
    """The update of one DP step with no example in the batch: -(noise) / expected batch size, with lr 1."""
    p = torch.nn.Parameter(torch.zeros(SIZE))
    optimiser = kind(torch.optim.SGD([p], lr=1.0), noise_multiplier=Z, max_grad_norm=C, expected_batch_size=1,
                     generator=generator)
    p.grad_sample = torch.zeros((0, SIZE))  # an empty Poisson batch: the step adds noise only
    optimiser.step()
    return -p.detach().clone()


def test_secure_noise_has_opacus_std_z_c() -> None:
    noise = _noise_only_step(SecureNoiseDPOptimizer)
    assert abs(noise.std().item() - Z * C) < 8 * Z * C / math.sqrt(2 * SIZE)
    assert abs(noise.mean().item()) < 8 * Z * C / math.sqrt(SIZE)


def test_secure_noise_is_not_replayed_by_a_seed_as_torch_generator_noise_is() -> None:
    seeded = [_noise_only_step(DPOptimizer, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*seeded)  # whoever knows a generator's seed (or state) knows its noise
    torch.manual_seed(7)
    first = _noise_only_step(SecureNoiseDPOptimizer)
    torch.manual_seed(7)
    assert not torch.equal(first, _noise_only_step(SecureNoiseDPOptimizer))


def test_secure_mode_is_a_sample_level_setting() -> None:
    with pytest.raises(ConfigError, match="privacy.secure-mode"):
        RunConfig().replace(**{"privacy.mode": "central", "privacy.clip-norm": 1.0, "privacy.secure-mode": True})
    cfg = RunConfig().replace(**{"privacy.mode": "sample", "privacy.clip-norm": 1.0, "privacy.secure-mode": True})
    assert cfg.privacy.secure_mode
