"""A simulation's global test set: a held-out slice of the corpus that no node trains on.

``hold_out`` takes it from the corpus before partitioning (seeded), ``simulate`` writes it beside the partitions
(``proto.node_config.global_test_file``) where no node reads it, and ``measure_rounds`` evaluates every round's
global adapter, as the round store holds it, on the coordinator's machine and stores the result beside the nodes'
local evaluation. Classification: accuracy and macro-F1 (the mean of the per-class F1, so a rare class weighs as
much as a common one); causal-LM: loss (mean token cross-entropy on the responses) and perplexity, exp(loss).

It runs in the simulation driver once the ServerApp has stored the rounds, not inside the round loop: the
ServerApp never imports the node's data reader or its evaluation (``client``; the two apps meet only on the
wire), and a stored round's adapter is exactly the one the loop evaluated.
"""

from __future__ import annotations

import random

import torch

from pollinate.client.data import Example, batches, read_examples
from pollinate.client.train import autocast, evaluate, resolve_device
from pollinate.models import build_peft_model, load_adapter_state
from pollinate.proto.node_config import global_test_file
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.server.store import GlobalTestMetrics, RoundStore
from pollinate.strategies.base import lora_rank

EVAL_BATCH = 64


def hold_out(rows: list[dict[str, object]], fraction: float, seed: int) -> tuple[list[dict[str, object]],
                                                                                  list[dict[str, object]]]:
    """(the rows the nodes share, the global test rows): a seeded ``fraction`` of the corpus, at least one row."""
    if fraction == 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(fraction * len(rows)))
    if n_test >= len(rows):
        raise ConfigError(f"data.test-fraction = {fraction:g} leaves no example of the corpus' {len(rows)} to train "
                          f"on; use a smaller share, e.g. 0.1")
    held = set(order[:n_test])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def macro_f1(predicted: list[int], actual: list[int]) -> float:
    """The unweighted mean over classes (those in ``actual`` or ``predicted``) of 2·TP / (2·TP + FP + FN).

    Written out rather than taken from scikit-learn (``f1_score(average="macro")``, the same classes and formula):
    it is the definition itself, and scikit-learn is no dependency of pollinate.
    """
    classes = sorted(set(actual) | set(predicted))
    scores = []
    for c in classes:
        tp = sum(1 for p, a in zip(predicted, actual) if p == c and a == c)
        fp = sum(1 for p, a in zip(predicted, actual) if p == c and a != c)
        fn = sum(1 for p, a in zip(predicted, actual) if p != c and a == c)
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def measure(model: torch.nn.Module, examples: list[Example], tokenizer, cfg: RunConfig,
            device: torch.device) -> GlobalTestMetrics:
    """The adapter ``model`` holds, measured on ``examples``."""
    if cfg.model.task == "causal-lm":
        result = evaluate(model, batches(examples, tokenizer, cfg.model, EVAL_BATCH, seed=None), device,
                          cfg.train.precision)
        return GlobalTestMetrics(loss=result.loss)
    model.to(device).eval()
    loss_sum, predicted, actual = 0.0, [], []
    for batch in batches(examples, tokenizer, cfg.model, EVAL_BATCH, seed=None):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.no_grad(), autocast(device, cfg.train.precision):
            logits = model(**batch).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predicted += logits.argmax(-1).tolist()
        actual += labels.tolist()
    accuracy = sum(p == a for p, a in zip(predicted, actual)) / len(actual)
    return GlobalTestMetrics(loss=loss_sum / len(actual), accuracy=accuracy, macro_f1=macro_f1(predicted, actual))


def measure_rounds(store: RoundStore, run_id: int, cfg: RunConfig) -> GlobalTestMetrics | None:
    """Every completed round's global adapter measured on the run's global test set and stored; the last one's
    measure (the final adapter's), or None when the run has no global test set or no completed round."""
    path = global_test_file(cfg.data.partition_dir)
    if not cfg.data.test_fraction or not path.is_file():
        return None
    examples = read_examples(path, cfg.data, cfg.model)
    device = resolve_device(cfg.train.device)
    models: dict[int, tuple] = {}  # rank -> (model, base): flora and fedex-lora export a larger rank
    last = None
    for stored in store.rounds(run_id):
        if stored.status != "completed" or stored.adapter_sha256 is None:
            continue
        tensors = store.adapter(run_id, stored.number).tensors()
        rank = lora_rank(tensors) or cfg.adapter.r
        if rank not in models:
            models[rank] = build_peft_model(cfg.replace(**{"adapter.r": rank}))
        model, base = models[rank]
        load_adapter_state(model, tensors)
        last = measure(model, examples, base.tokenizer, cfg, device)
        store.set_test_metrics(run_id, stored.number, last)
    return last
