"""PEFT wiring: any PEFT method named in the run config, its trainable state as named arrays, export.

Named arrays are keyed exactly as PEFT saves them (``get_peft_model_state_dict``), so the
same names are the wire keys, the round-store keys and the keys of the exported
``adapter_model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from pollinate.models.base import BASE_MODELS, BaseModel, load_base_model
from pollinate.proto.run_config import AdapterConfig, ConfigError, RunConfig

NamedArrays = dict[str, np.ndarray]

# Our common fields and the names PEFT config classes give them.
_ALIASES = {"r": ("r",), "alpha": ("lora_alpha", "alpha"), "dropout": ("lora_dropout", "module_dropout")}


def peft_config(adapter: AdapterConfig, task: str) -> PeftConfig:
    """The PEFT config class for ``adapter.method`` (``dora`` = LoRA with ``use_dora``), filled from our fields."""
    method = adapter.method.lower()
    extra = adapter.option_dict
    if method == "dora":
        method, extra = "lora", {"use_dora": True, **extra}
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(method.upper())
    if config_cls is None:
        known = sorted(str(k).lower().removeprefix("pefttype.") for k in PEFT_TYPE_TO_CONFIG_MAPPING)
        raise ConfigError(f"adapter.method = {adapter.method!r} is not a PEFT method; use one of dora, {known}")
    field_names = {f.name for f in dataclasses.fields(config_cls)}
    kwargs: dict[str, object] = {"task_type": "SEQ_CLS" if task == "classification" else "CAUSAL_LM",
                                 "target_modules": list(adapter.target_modules)}
    for ours, theirs in _ALIASES.items():
        for name in theirs:
            if name in field_names:
                kwargs[name] = getattr(adapter, ours)
                break
    unknown = sorted(set(extra) - field_names)
    if unknown:
        raise ConfigError(f"adapter.options {unknown} are not fields of PEFT's {config_cls.__name__}")
    kwargs.update(extra)
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"PEFT rejected the adapter config for {adapter.method!r}: {e}") from e


def build_peft_model(cfg: RunConfig) -> tuple[PeftModel, BaseModel]:
    """The base model (frozen) wrapped with a fresh adapter; adapter init is seeded by ``cfg.seed``."""
    base = load_base_model(cfg.model, cfg.seed, cfg.data.labels)
    config = peft_config(cfg.adapter, cfg.model.task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        try:
            model = get_peft_model(base.model, config)
        except ValueError as e:
            hint = BASE_MODELS.get(cfg.model.name, (None, "the model's module names"))[1]
            raise ConfigError(f"adapter.target-modules = {','.join(cfg.adapter.target_modules)!r} does not fit "
                              f"{cfg.model.name}: {e}. Try {hint!r}") from e
    return model, base


def adapter_state(model: PeftModel) -> NamedArrays:
    """The adapter's trainable state as float32 numpy arrays, keyed as PEFT saves it."""
    return {name: t.detach().to("cpu", torch.float32).numpy().copy()
            for name, t in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, tensors: NamedArrays) -> None:
    """Set the adapter to ``tensors``; every adapter key must be present (nothing is left stale)."""
    expected = set(get_peft_model_state_dict(model))
    missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unknown:
        raise ValueError(f"adapter tensors do not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    device = next(model.parameters()).device
    state = {name: torch.from_numpy(np.asarray(t, dtype=np.float32)).to(device) for name, t in tensors.items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"PEFT did not place adapter tensors {unexpected[:3]}")


_BASE_WEIGHTS: weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def set_base_deltas(model: PeftModel, deltas: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Frozen base weight of each LoRA module = its original W0 + B_d @ A_d (modules not named: W0 again).

    Keys are module prefixes as in PEFT's state-dict names (``base_model.model.<path>``).
    """
    modules = {name: m for name, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    unknown = sorted(set(deltas) - set(modules))
    if unknown:
        raise ValueError(f"base deltas for modules the model has no LoRA on: {unknown[:3]}")
    for prefix, module in modules.items():
        layer = module.base_layer
        original = _BASE_WEIGHTS.get(layer)
        if prefix not in deltas and original is None:
            continue
        if original is None:
            original = _BASE_WEIGHTS[layer] = layer.weight.detach().clone()
        with torch.no_grad():
            if prefix in deltas:
                a, b = (torch.from_numpy(np.asarray(t, dtype=np.float32)) for t in deltas[prefix])
                layer.weight.copy_(original + (b @ a).to(original.dtype))
            else:
                layer.weight.copy_(original)


def export_adapter(model: PeftModel, tensors: NamedArrays, directory: str | Path) -> Path:
    """Write ``tensors`` in PEFT's format (adapter_config.json + adapter_model.safetensors), and the base model's
    ``config.json`` beside them: for a classifier it carries the class names (id2label / label2id)."""
    load_adapter_state(model, tensors)
    directory = Path(directory)
    model.save_pretrained(str(directory))
    model.get_base_model().config.save_pretrained(str(directory))
    return directory


def write_adapter_dir(cfg: RunConfig, safetensors_bytes: bytes, directory: str | Path) -> Path:
    """A PEFT adapter directory from a stored global adapter: its safetensors bytes written verbatim.

    ``adapter_config.json`` is what ``export_adapter`` writes for ``cfg``, at the rank the tensors
    carry: strategies that merge into the base (flora, fedex-lora) store a LoRA larger than adapter.r.
    The tensors are first placed into that model, so a file that does not fit the config is refused.
    """
    from safetensors.numpy import load as load_safetensors

    from pollinate.strategies.base import lora_rank

    tensors = dict(load_safetensors(safetensors_bytes))
    rank = lora_rank(tensors) or cfg.adapter.r
    model, _ = build_peft_model(cfg.replace(**{"adapter.r": rank}) if rank != cfg.adapter.r else cfg)
    directory = export_adapter(model, tensors, directory)
    (directory / "adapter_model.safetensors").write_bytes(safetensors_bytes)  # byte-identical to the store
    return directory
