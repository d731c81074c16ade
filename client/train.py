"""Local training and evaluation of the adapter: a plain PyTorch loop over a fixed number of steps.

CUDA when present (autocast: bf16 where supported, else fp16 with a grad scaler), CPU otherwise; the node
picks its device (``pollinate client --device cuda:1``, else the run's ``train.device``). Gradient
checkpointing trades compute for activation memory (``train.gradient-checkpointing``). Running out of GPU
memory is a ``NodeOutOfMemory`` naming the fixes, which the coordinator records as this node's failure.
Only adapter parameters have ``requires_grad``; the base stays frozen.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from pollinate.proto.instructions import frozen_factor_tag, is_head
from pollinate.proto.run_config import TrainConfig


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean per example (classification) or per target token (causal LM)
    accuracy: float  # per example (classification) or per target token (causal LM)
    num_examples: int


class NodeOutOfMemory(RuntimeError):
    """The node's device ran out of memory while training or evaluating; the message says what to lower."""


def resolve_device(device: str, cuda_devices: int | None = None) -> torch.device:
    """The torch device for a node's ``device`` setting; a refusal naming the fix when this node lacks it.

    ``cuda_devices``: how many CUDA devices the node has (default: ask torch).
    """
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if device == "auto":
        return torch.device("cuda" if count else "cpu")
    if not device.startswith("cuda"):
        return torch.device(device)
    if not count:
        raise RuntimeError(f"device {device!r} was asked for, but this node has no CUDA device; "
                           f"use --device cpu (or auto), or train.device = 'cpu'")
    index = torch.device(device).index or 0
    if index >= count:
        raise RuntimeError(f"device {device!r} was asked for, but this node has {count} CUDA device(s), "
                           f"cuda:0..cuda:{count - 1}; pick one of them with --device")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str = "auto",
                   bf16_supported: bool | None = None) -> torch.dtype | None:
    """Mixed precision for the forward pass. ``precision`` "auto" (train.precision): bf16 where the device computes it
    natively, a CUDA GPU that has it (else fp16) or a CPU with AVX512-BF16 / AMX; "fp32": none.

    bf16 keeps fp32's range (no loss scaling); fp16 needs the grad scaler ``train`` adds. A CPU without native bf16
    would emulate it, slower than fp32, so it gets none. The weights and the optimiser stay fp32 either way.
    """
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        return torch.bfloat16 if supported else torch.float16
    supported = cpu_has_native_bf16() if bf16_supported is None else bf16_supported
    return torch.bfloat16 if supported else None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (the avx512_bf16 or amx_bf16 flag, Linux); False where unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager[None]:
    dtype = autocast_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def out_of_memory_as_failure(device: torch.device, cfg: TrainConfig) -> Iterator[None]:
    """A device OOM becomes a ``NodeOutOfMemory`` whose reason (recorded as this node's failure) says the fix."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        hints = ["lower train.batch-size (now %d)" % cfg.batch_size]
        if not cfg.gradient_checkpointing:
            hints.append("set train.gradient-checkpointing = true")
        hints.append("load the base quantised with model.quantization = 'nf4'")
        raise NodeOutOfMemory(f"{device} ran out of memory ({first}); " + ", or ".join(hints)) from None


def trainable_parameters(model: PeftModel, train_factors: str, freeze_head: bool = False) -> list[torch.nn.Parameter]:
    """The adapter parameters to train: all, or with LoRA's A or B held frozen, or the classifier head held frozen
    (train.freeze-head); the others stay as received."""
    tag = f".{model.active_adapter}"  # PEFT keeps every adapter parameter under its adapter name
    frozen = frozen_factor_tag(train_factors)
    params = []
    for name, p in model.named_parameters():
        if f"{tag}." not in name and not name.endswith(tag):
            continue  # the frozen base model
        p.requires_grad_((frozen is None or frozen not in name) and not (freeze_head and is_head(name)))
        if p.requires_grad:
            params.append(p)
    return params


def train(model: PeftModel, batches: Iterator[dict[str, torch.Tensor]], cfg: TrainConfig,
          device: torch.device, train_factors: str = "all", proximal_mu: float = 0.0) -> float:
    """``cfg.local_steps`` AdamW steps on the adapter; returns the mean training loss.

    ``train_factors`` = "A" or "B" trains only that LoRA factor; ``proximal_mu`` > 0 adds FedProx's
    mu/2 ||w - w_received||^2 over the trained tensors (Li et al. 2020, Eq. 2).
    """
    model.to(device).train()
    if cfg.gradient_checkpointing:  # recompute activations in backward: memory for compute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad for checkpointing
    params = trainable_parameters(model, train_factors, cfg.freeze_head)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    total = 0.0
    for _ in range(cfg.local_steps):
        batch = {k: v.to(device) for k, v in next_with_targets(batches).items()}
        with out_of_memory_as_failure(device, cfg), autocast(device, cfg.precision):
            loss = model(**batch).loss
        if anchors:
            loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr (now {cfg.lr})")
        with out_of_memory_as_failure(device, cfg):
            scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        optimiser.zero_grad(set_to_none=True)
        total += loss.item()
    model.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()  # the cached model is also evaluated and generates
    return total / cfg.local_steps


MAX_EMPTY_BATCHES = 10_000  # consecutive batches without a token to learn before the node gives up


def next_with_targets(batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The next batch that has a token to learn. A causal LM's labels are -100 on the prompt and on padding, so a
    batch whose responses were all truncated away at model.max-length has none, and its mean loss is NaN; length
    grouping puts the longest examples, the truncated ones, together. Such batches are passed over."""
    for _ in range(MAX_EMPTY_BATCHES):
        batch = next(batches)
        labels = batch.get("labels")
        if labels is None or labels.dim() < 2 or bool((labels != -100).any()):
            return batch
    raise ValueError(f"{MAX_EMPTY_BATCHES} training batches in a row had no response token to learn: the responses "
                     f"are truncated away at model.max-length; raise model.max-length or shorten the prompts")


@torch.no_grad()
def evaluate(model: PeftModel, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
             precision: str = "fp32") -> EvalResult:
    """Loss and accuracy summed exactly over the evaluation set (weighted means across nodes stay exact);
    ``precision`` as ``autocast_dtype``'s (fp32 unless the caller passes the run's train.precision)."""
    model.to(device).eval()
    loss_sum, correct, count, examples = 0.0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast(device, precision):
            logits = model(**batch).logits.float()
        examples += labels.shape[0]
        if logits.dim() == 2:  # classification: one label per example
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            count += labels.shape[0]
        else:  # causal LM: predict token t+1 from the prefix, on target tokens only
            logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
            correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
            count += int(mask.sum())
    if count == 0:
        return EvalResult(loss=math.nan, accuracy=math.nan, num_examples=0)
    return EvalResult(loss=loss_sum / count, accuracy=correct / count, num_examples=examples)
