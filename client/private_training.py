"""The node's side of differential privacy: its own budget, DP-SGD (sample) or a noised upload (local).

Before training, the node computes the epsilon it would have spent after this round from its
budget file (``privacy/budget.py``) and refuses when that exceeds ``privacy.target-epsilon`` (the
run's budget) or, with a node policy (``privacy/node_policy.py``: ``pollinate client --max-epsilon E
--delta D``), the node's own E at its own delta, over every run by default. The refusal is a Flower
error reply (code ``REFUSAL_CODE``) whose reason the server records. The spend is what this node runs:
its own z (the run's, or calibrated here), q = batch / its own examples, its own step count.
Sampling and noise draw from fresh OS entropy, never from the run's public seed: a server
that could replay the Poisson sample or the noise would void the guarantee.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from pollinate.client.data import Example, poisson_batches
from pollinate.client.dp_sgd import train_dp
from pollinate.privacy.accountant import Release, calibrate_noise_multiplier
from pollinate.privacy.budget import BudgetFile, Limit, SpentRound
from pollinate.privacy.central import add_gaussian_noise, clip_delta, delta_of
from pollinate.privacy.csprng import SecureGaussian
from pollinate.privacy.ledger import MECHANISMS
from pollinate.privacy.node_policy import NodePolicy
from pollinate.proto.instructions import Instructions, trained_names
from pollinate.proto.run_config import RunConfig

class BudgetRefused(RuntimeError):
    """This node will not train this round: its privacy budget would be exceeded, or DP cannot hold."""


@dataclass(frozen=True)
class PrivateRound:
    """What this node spends this round, and its epsilon afterwards."""

    run_key: str
    spent: SpentRound
    epsilon_after: float  # the run's epsilon at the run's delta, as the ledger reports it
    limits: tuple[Limit, ...] = ()  # checked again, under the budget file's lock, when the release is recorded

    def report(self, delta: float) -> dict[str, float]:
        """The training report's DP keys (privacy.ledger.REPORT_KEYS)."""
        return {"dp-epsilon": self.epsilon_after, "dp-delta": delta, "dp-noise-multiplier": self.spent.noise_multiplier,
                "dp-clip-norm": self.spent.clip_norm, "dp-sample-rate": self.spent.sample_rate,
                "dp-steps": self.spent.steps}


@functools.lru_cache(maxsize=16)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    return calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps)


def plan_round(cfg: RunConfig, instructions: Instructions, num_examples: int, budget: BudgetFile,
               policy: NodePolicy | None = None) -> PrivateRound:
    """This round's release under ``cfg.privacy`` (sample or local), or ``BudgetRefused`` with the reason.

    ``policy``: the node's own (``pollinate client --max-epsilon``); it refuses weaker runs before any budget.
    """
    p = cfg.privacy
    if policy is not None:
        own_key = instructions.privacy_run_key if policy.scope == "run" else None
        reason = policy.refusal(p.mode, p.delta, p.target_epsilon, budget.spent(own_key, policy.delta))
        if reason:
            raise BudgetRefused(reason)
    if not instructions.privacy_run_key:
        raise BudgetRefused("the server sent no privacy run key (instructions.privacy-run-key), so this node "
                            "cannot track its budget; use a pollinate coordinator")
    if p.mode == "sample":
        delta = max(p.delta, policy.delta if policy else 0.0)
        if delta >= 1 / num_examples:
            raise BudgetRefused(f"privacy.delta = {delta:g} is not below 1/n = 1/{num_examples} for this node's "
                                f"{num_examples} training examples: the guarantee would allow leaking an example "
                                f"outright; lower privacy.delta below {1 / num_examples:.2g}")
        rate, steps = min(1.0, cfg.train.batch_size / num_examples), cfg.train.local_steps
    else:  # local: one Gaussian release of the whole clipped delta per round
        rate, steps = 1.0, 1
    z = p.noise_multiplier or _calibrated(p.target_epsilon, p.delta, rate, steps * cfg.federation.rounds)
    release = Release(z, rate, steps)
    limits = (Limit(p.target_epsilon, p.delta, instructions.privacy_run_key),)
    if policy is not None:
        limits += (Limit(policy.max_epsilon, policy.delta,
                         instructions.privacy_run_key if policy.scope == "run" else None),)
    for limit in limits:
        before = budget.spent(limit.run_key, limit.delta)
        after = budget.epsilon_after(limit.run_key, limit.delta, release)
        if after > limit.epsilon * (1 + 1e-9):
            own = limit is not limits[0]
            raise BudgetRefused(
                f"privacy budget: round {instructions.round} would raise this node's epsilon from {before:.4g} to "
                f"{after:.4g}, over " + (f"its own --max-epsilon {limit.epsilon:g} (delta {limit.delta:g}, "
                                         + ("across every run)" if limit.run_key is None else "in this run)")
                                         if own else f"privacy.target-epsilon = {limit.epsilon:g} (delta "
                                         f"{limit.delta:g})") + "; this node trains no more in this run")
    spent = SpentRound(round=instructions.round, mechanism=MECHANISMS[p.mode], noise_multiplier=z,
                       sample_rate=rate, steps=steps, clip_norm=p.clip_norm)
    return PrivateRound(instructions.privacy_run_key, spent,
                        budget.epsilon_after(instructions.privacy_run_key, p.delta, release), limits)


def train_sample_dp(model: PeftModel, train_set: list[Example], tokenizer: PreTrainedTokenizerBase, cfg: RunConfig,
                    device: torch.device, instructions: Instructions, plan: PrivateRound) -> float:
    """DP-SGD for this round's planned steps: Poisson batches at the planned rate, clipping, noise."""
    secure = cfg.privacy.secure_mode
    batches = poisson_batches(train_set, tokenizer, cfg.model, plan.spent.sample_rate, seed=None, secure=secure)
    generator = torch.Generator(device=device)
    generator.seed()  # fresh entropy for the noise
    return train_dp(model, batches, cfg.train, device, noise_multiplier=plan.spent.noise_multiplier,
                    clip_norm=plan.spent.clip_norm, expected_batch_size=cfg.train.batch_size,
                    train_factors=instructions.train_factors, generator=generator, secure=secure)


def privatise_upload(received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], train_factors: str,
                     plan: PrivateRound, freeze_head: bool = False) -> dict[str, np.ndarray]:
    """Local DP: received + clip(trained - received, C) + N(0, (2 z C)^2) on the trained tensors only.

    A node's whole update is the unit: two clipped deltas differ by at most 2C in L2, so the Gaussian
    mechanism with multiplier z needs std 2 z C (Dwork & Roth 2014, Thm. A.1 with sensitivity 2C).
    A frozen factor comes back exactly as received.
    """
    names = trained_names(trained, train_factors, freeze_head)
    clipped, _ = clip_delta(delta_of({k: trained[k] for k in names}, received), plan.spent.clip_norm)
    std = 2 * plan.spent.noise_multiplier * plan.spent.clip_norm
    noisy = add_gaussian_noise(clipped, std, names, SecureGaussian())  # the OS CSPRNG, as central DP's noise
    return {k: (received[k] + noisy[k]).astype(np.float32) if k in noisy else np.array(trained[k]) for k in trained}
