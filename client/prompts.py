"""How an instruction example becomes a prompt and a response: the model's chat template, or the plain one.

An example is a conversation: ``turns`` (role, content) ending with the user's turn, and the response the
model should give. A tokenizer with a chat template renders it the way the model was instruction-tuned
(SmolLM2's ``<|im_start|>user ... <|im_end|>``); one without gets the plain ``### Instruction:`` template.
Either way the loss is on the response tokens only, and generation starts from exactly the prompt tokens.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

PLAIN = "### Instruction:\n{instruction}\n\n### Response:\n"
ROLES = ("system", "user", "assistant")

Turns = tuple[tuple[str, str], ...]  # (role, content), the last one the user's


def plain_prompt(turns: Turns) -> str:
    """The plain template: every turn's text in order (a system turn first, as an instruction would read)."""
    return PLAIN.format(instruction="\n\n".join(content for _, content in turns))


def uses_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, turns: Turns) -> list[int]:
    """The prompt's token ids, ending where the model's answer begins."""
    return tokenizer(_prompt_text(tokenizer, turns), add_special_tokens=False)["input_ids"]


def encode(tokenizer: PreTrainedTokenizerBase, turns: Turns, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the response as the template renders it, through its end-of-turn token."""
    prompt = _prompt_text(tokenizer, turns)
    if uses_chat_template(tokenizer):
        full = tokenizer.apply_chat_template(_messages(turns) + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        if not full.startswith(prompt):  # a template that rewrites earlier turns: fall back on the plain answer
            target_text = response + (tokenizer.eos_token or "")
        else:
            target_text = full[len(prompt):]
        if tokenizer.eos_token and tokenizer.eos_token in target_text:  # stop at the end of the turn
            target_text = target_text[: target_text.index(tokenizer.eos_token) + len(tokenizer.eos_token)]
        target = tokenizer(target_text, add_special_tokens=False)["input_ids"]
    else:
        target = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer(prompt, add_special_tokens=False)["input_ids"], target


def _messages(turns: Turns) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def _prompt_text(tokenizer: PreTrainedTokenizerBase, turns: Turns) -> str:
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(_messages(turns), tokenize=False, add_generation_prompt=True)
    return plain_prompt(turns)
