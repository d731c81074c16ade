"""DP-SGD on the adapter (Abadi et al. 2016) with Opacus: Poisson-sampled batches, per-example clipping, noise.

Only the adapter tensors being trained get per-example gradients and noise: Opacus wraps the
PEFT model in a ``GradSampleModule`` (hooks only on modules with trainable parameters, so the
frozen base and a frozen LoRA factor get neither gradient nor noise) and the optimiser in a
``DPOptimizer`` over exactly the trained parameters. The loss is a mean of per-example losses,
so an example's clipped gradient does not depend on the others (for causal LMs the token mean
is taken per example first; Hugging Face's batch token mean would couple them). The hooks are
removed afterwards: the same PeftModel serves evaluation and the next round.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import pollinate.client.opacus_logging  # noqa: F401 - before Opacus: undoes its logging.basicConfig()
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from peft import PeftModel

from pollinate.client.train import autocast, trainable_parameters
from pollinate.privacy.csprng import SecureGaussian
from pollinate.proto.run_config import TrainConfig

# Importing Opacus runs logging.basicConfig(), which gives the root logger a handler at level NOTSET. Flower's
# logger (level DEBUG, with its own INFO console handler) propagates to it, so every Flower DEBUG record would
# be printed a second time, with timestamps, in every process that imports this module.
logging.getLogger("flwr").propagate = False

Batch = dict[str, torch.Tensor]


def per_example_mean_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The mean over examples of each example's own loss (classification: cross-entropy; causal LM: token mean)."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels)
    logits, labels = logits[:, :-1], labels[:, 1:]  # predict token t+1 from the prefix
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (b, t)
    mask = (labels != -100).float()
    return ((tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with its Gaussian noise drawn from the OS CSPRNG (``privacy.csprng.SecureGaussian``).

    What Opacus' own ``secure_mode`` is for, without its torchcsprng dependency (archived, no build for this
    torch): a seeded torch generator's noise can be predicted by whoever recovers its state.
    """

    def add_noise(self) -> None:
        gaussian = SecureGaussian()
        for p in self.params:
            _check_processed_flag(p.summed_grad)  # Opacus' own guard against noising a gradient twice
            noise = gaussian.normal(0.0, self.noise_multiplier * self.max_grad_norm, size=tuple(p.summed_grad.shape))
            p.grad = (p.summed_grad + torch.as_tensor(noise, dtype=p.summed_grad.dtype,
                                                      device=p.summed_grad.device)).view_as(p)
            _mark_as_processed(p.summed_grad)


def train_dp(model: PeftModel, batches: Iterator[Batch | None], cfg: TrainConfig, device: torch.device,
             noise_multiplier: float, clip_norm: float, expected_batch_size: int,
             train_factors: str = "all", generator: torch.Generator | None = None, secure: bool = False) -> float:
    """``cfg.local_steps`` DP-AdamW steps on the adapter; returns the mean training loss of non-empty batches.

    ``batches`` yields Poisson-sampled batches (``client.data.poisson_batches``); ``None`` is an empty
    batch, which still takes a noise-only step: skipping it would reveal that no example was sampled.
    The update is (sum_i clip(g_i, C) + N(0, (z C)^2)) / expected_batch_size (Abadi et al. 2016, Alg. 1).
    ``secure`` (privacy.secure-mode): the noise from the OS CSPRNG (``SecureNoiseDPOptimizer``).
    """
    model.to(device).train()
    params = trainable_parameters(model, train_factors, cfg.freeze_head)
    optimiser = (SecureNoiseDPOptimizer if secure else DPOptimizer)(torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
                            noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                            expected_batch_size=expected_batch_size, generator=generator)
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    total, counted = 0.0, 0
    try:
        for _ in range(cfg.local_steps):
            batch = next(batches)
            if batch is None:
                for p in params:  # zero per-example gradients: the step adds noise only
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            else:
                # fp32 on a CPU: per-example norms in bf16 could let a clipped gradient exceed C; CUDA as before.
                with autocast(device, cfg.precision if device.type == "cuda" else "fp32"):
                    loss = per_example_mean_loss(private, {k: v.to(device) for k, v in batch.items()})
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr (now {cfg.lr})")
                with warnings.catch_warnings():  # the frozen base's inputs need no grad: expected, not a problem
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                total, counted = total + loss.item(), counted + 1
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
    finally:
        private.cleanup()  # removes Opacus' hooks and per-parameter attributes from the shared model
    model.eval()
    return total / max(1, counted)
