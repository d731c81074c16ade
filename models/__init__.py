"""Base models (loaded offline) and PEFT adapters around them; shared by the ServerApp and ClientApp."""

from pollinate.models import console  # noqa: F401  first: silences library noise before those libraries load
from pollinate.models.adapter import (adapter_state, build_peft_model, export_adapter, load_adapter_state, peft_config,
                            set_base_deltas, write_adapter_dir)
from pollinate.models.base import BASE_MODELS, BaseModel, check_model_config, load_base_model

__all__ = ["BASE_MODELS", "BaseModel", "adapter_state", "build_peft_model", "check_model_config", "export_adapter", "load_adapter_state",
           "load_base_model", "peft_config", "set_base_deltas", "write_adapter_dir"]
