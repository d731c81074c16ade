"""What a node keeps loaded between messages: the base model with its adapter slots, the tokenizer, its examples.

One home for the node's process-level state. A deployed node runs every message in one long-lived process
(``client/warm.py``), and a simulated node in a long-lived Ray actor, so what is loaded once here serves every
message and round of a run. Entries are keyed by (Flower run id, the run config, data path): a new run or a
changed model/adapter config loads again, and a new run drops the previous run's entries first, so two runs'
models are never resident together. Nothing of one message's adapter survives into the next: the ClientApp
overwrites the whole adapter state and the merged base deltas from the received arrays on every message.
The examples' token lengths (for batches grouped by length) are kept beside the examples.

``model_loads()`` counts base-model builds in this process; the node reports it (``model-loads``) so the
coordinator stores it and a test or bench reads "one load per node per run" instead of inferring it.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from pollinate.client.data import Example, read_examples, split, token_lengths
from pollinate.models import BaseModel, build_peft_model
from pollinate.proto.reply_schema import MODEL_LOADS
from pollinate.proto.run_config import RunConfig

__all__ = ["MODEL_LOADS", "local_lengths", "local_split", "model", "model_loads"]
MAX_MODELS = 2  # (rank variants) per run: a node trains one rank, a Ray actor may serve nodes of two ranks
MAX_SPLITS = 16  # local datasets per run: a simulated Ray actor, or the in-process driver (8 nodes in the
# robustness bench), serves several partitions; re-reading one per message was a quarter of an in-process run

K = TypeVar("K")
V = TypeVar("V")


class _Slots(OrderedDict[K, V]):
    """A small least-recently-used map; the evicted value is simply dropped (garbage-collected)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


_run: int | None = None
_models: _Slots[RunConfig, tuple[PeftModel, BaseModel]] = _Slots(MAX_MODELS)
_splits: _Slots[tuple[str, RunConfig], tuple[list[Example], list[Example]]] = _Slots(MAX_SPLITS)
_lengths: _Slots[tuple[str, RunConfig], tuple[list[int], list[int]]] = _Slots(MAX_SPLITS)
_loads = 0


def _enter_run(run_id: int) -> None:
    """A new run: release the previous run's models and data before anything of the new one loads."""
    global _run
    if run_id == _run:
        return
    had = bool(_models or _splits)
    _models.clear()
    _splits.clear()
    _lengths.clear()
    _run = run_id
    if had:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def model(run_id: int, cfg: RunConfig) -> tuple[PeftModel, BaseModel]:
    """The run's PEFT model (base frozen, adapter at ``cfg.adapter.r``), built once per (run, config)."""
    _enter_run(run_id)

    def load() -> tuple[PeftModel, BaseModel]:
        global _loads
        built = build_peft_model(cfg)
        _loads += 1
        return built

    return _models.get_or_make(cfg, load)


def local_split(run_id: int, path: str, cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    """The node's (train, eval) examples from ``path``, read and split once per (run, path, config)."""
    _enter_run(run_id)
    return _splits.get_or_make((path, cfg),
                               lambda: split(read_examples(path, cfg.data, cfg.model), cfg.data.eval_fraction,
                                             cfg.seed))


def local_lengths(run_id: int, path: str, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) \
        -> tuple[list[int], list[int]]:
    """The token lengths of ``local_split``'s (train, eval) examples, tokenised once per (run, path, config)."""
    def tokenise() -> tuple[list[int], list[int]]:
        train, held_out = local_split(run_id, path, cfg)
        return token_lengths(train, tokenizer, cfg.model), token_lengths(held_out, tokenizer, cfg.model)

    return _lengths.get_or_make((path, cfg), tokenise)


def model_loads() -> int:
    """How many base models this process has built (one per run and configuration when warm)."""
    return _loads
