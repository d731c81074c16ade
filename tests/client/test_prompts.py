"""Instruction data: columns or conversations, rendered by the model's chat template or the plain one."""

from __future__ import annotations

import copy
import json

import pytest

from pollinate.client.data import DataError, batches, read_examples
from pollinate.client.prompts import PLAIN, encode, prompt_ids
from pollinate.models import load_base_model
from pollinate.proto.run_config import RunConfig

CFG = RunConfig().replace(**{"model.name": "tiny-llama", "model.task": "causal-lm", "model.max-length": 64,
                             "adapter.target-modules": "q_proj,v_proj"})
# A chat template in the WordPiece vocabulary of the tiny models: each turn "[CLS] role content [SEP]".
TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}[CLS] assistant {% endif %}")


@pytest.fixture(scope="module")
def tokenizers():
    plain = load_base_model(CFG.model, 0).tokenizer
    chat = copy.deepcopy(plain)
    chat.chat_template = TEMPLATE
    return plain, chat


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_chat_template_renders_the_prompt_and_the_loss_covers_only_the_response(tokenizers, tmp_path) -> None:
    _, chat = tokenizers
    path = _write(tmp_path, [{"instruction": "is it good?", "input": "a fine film", "response": "positive"}] * 2)
    examples = read_examples(path, CFG.data, CFG.model)
    assert examples[0].turns == (("user", "is it good?\n\na fine film"),)
    batch = next(batches(examples, chat, CFG.model, 2, seed=None))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt = prompt_ids(chat, examples[0].turns)
    assert ids[: len(prompt)] == prompt and chat.decode(prompt).endswith("[CLS] assistant")
    assert all(label == -100 for label in labels[: len(prompt)])
    assert chat.decode([t for t in labels if t != -100]) == "positive [SEP]"  # the response through its end token


def test_without_a_chat_template_the_plain_template_is_used(tokenizers) -> None:
    plain, _ = tokenizers
    prompt, target = encode(plain, (("user", "is it good?"),), "negative")
    assert prompt == plain(PLAIN.format(instruction="is it good?"), add_special_tokens=False)["input_ids"]
    assert target[-1] == plain.eos_token_id and plain.decode(target[:-1]) == "negative"


def test_configured_columns_and_message_lists_are_read(tokenizers, tmp_path) -> None:
    cfg = CFG.replace(**{"data.instruction-field": "question", "data.response-field": "answer"})
    (example,) = read_examples(_write(tmp_path, [{"question": "2+2?", "answer": "4"}]), cfg.data, cfg.model)
    assert (example.turns, example.response) == ((("user", "2+2?"),), "4")
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}]
    (chat,) = read_examples(_write(tmp_path, [{"messages": conversation}], "chat.jsonl"), CFG.data, CFG.model)
    assert chat.turns == (("system", "be brief"), ("user", "hi")) and chat.response == "hello"


@pytest.mark.parametrize("row, message", [
    ({"question": "x"}, "lacks 'instruction' or 'response'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "at least two"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}, "end with a user turn"),
])
def test_malformed_instruction_rows_are_refused_with_the_row_and_the_fix(row, message, tmp_path) -> None:
    with pytest.raises(DataError, match=message):
        read_examples(_write(tmp_path, [row]), CFG.data, CFG.model)
