"""A quantised frozen base for QLoRA (Dettmers et al. 2023): NF4 or int8 weights through bitsandbytes.

Only the base is quantised. The LoRA on top stays float32, so the adapter tensors that travel, the
strategies, DP and SecAgg see exactly what they see on an unquantised base, and the exported adapter is a
plain PEFT adapter that loads on the unquantised base. bitsandbytes (>= 0.49) quantises on CPU as well as
on CUDA, which is what lets the tests run QLoRA on these machines.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

from pollinate.proto.run_config import ConfigError, ModelConfig

INSTALL_HINT = 'pip install "pollinate[qlora]"  (bitsandbytes==0.50.2)'


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for ``cfg.quantization``, or None for an unquantised base."""
    if cfg.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization = {cfg.quantization!r} needs bitsandbytes; install it with "
                          f"`{INSTALL_HINT}`, or set model.quantization = 'none'")
    if cfg.quantization == "nf4":
        # float32 compute: bf16 is not faster on a CPU and fp16 matmuls are not supported there; on CUDA
        # the training loop's autocast picks bf16/fp16 for the matmuls anyway.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantised(cfg: ModelConfig, load: Callable[..., PreTrainedModel],
              build: Callable[[], PreTrainedModel] | None = None) -> PreTrainedModel:
    """The base loaded through bitsandbytes and made ready for k-bit training.

    ``load(**kwargs)`` is the model's ``from_pretrained``; a model built in memory (``build``, the random-init
    tiny ones) is first written to a temporary directory, because transformers quantises only while loading.
    """
    from peft import prepare_model_for_kbit_training

    config = quantization_config(cfg)
    assert config is not None
    kwargs = dict(quantization_config=config, device_map={"": _load_device()})
    if build is not None:
        with tempfile.TemporaryDirectory(prefix="pollinate-base-") as tmp:
            build().save_pretrained(tmp)
            model = load(tmp, **kwargs)
    else:
        model = load(**kwargs)
    # Casts the few unquantised weights (norms, embeddings) to float32 for stable training. Gradient
    # checkpointing is a separate choice (train.gradient-checkpointing), not forced on here.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _load_device() -> str:
    # bitsandbytes quantises where the weights land; a node on CUDA trains there (train.device decides later,
    # and a quantised model moves between devices only as a whole).
    return "cuda:0" if torch.cuda.is_available() else "cpu"
