"""Generation-based evaluation on a node: greedy answers to its held-out prompts, counted against the responses.

The counts (``proto/generation_metrics.py``) leave the node; the prompts and the generated text do not.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from pollinate.client.data import Example
from pollinate.client.prompts import prompt_ids
from pollinate.proto.generation_metrics import CORRECT, EXACT, GENERATED, LABELLED, class_keys, normalise


@torch.no_grad()
def generate(model: PeftModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_new_tokens: int,
             max_length: int, device: torch.device, batch_size: int = 16) -> list[str]:
    """Each example's greedy answer (at most ``max_new_tokens``), prompts left-padded in batches."""
    model.to(device).eval()
    answers: list[str] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        prompts = [prompt_ids(tokenizer, e.turns or (("user", e.text),))[-max_length:]
                   for e in examples[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


def count(answers: list[str], references: list[str], label_words: tuple[str, ...]) -> dict[str, int]:
    """Exact matches, and for label-like references (one of ``label_words``) the per-class confusion counts.

    An answer names the label its first word is; anything else is a miss (a false negative of the true class).
    """
    labels = [normalise(w) for w in label_words]
    counts = {GENERATED: len(answers), EXACT: 0, LABELLED: 0, CORRECT: 0}
    for i in range(len(labels)):
        counts.update(dict.fromkeys(class_keys(i), 0))
    for answer, reference in zip(answers, references, strict=True):
        said, truth = normalise(answer), normalise(reference)
        counts[EXACT] += said == truth
        if truth not in labels:
            continue
        counts[LABELLED] += 1
        first = said.split(" ")[0].strip(" .!?,;:\"'") if said else ""
        predicted, actual = (labels.index(first) if first in labels else None), labels.index(truth)
        if predicted == actual:
            counts[CORRECT] += 1
            counts[class_keys(actual)[0]] += 1
        else:
            counts[class_keys(actual)[2]] += 1
            if predicted is not None:
                counts[class_keys(predicted)[1]] += 1
    return counts
