"""The shipped instruction-tuning scenario: SmolLM2 + LoRA on attention, judged on generated label words."""

from __future__ import annotations

from pollinate.simulations.datasets import load_corpus
from pollinate.simulations.scenario import load_scenario


def test_the_smollm2_scenario_instruction_tunes_the_llm_and_scores_its_generated_labels() -> None:
    cfg, sim = load_scenario("smollm2")
    assert (cfg.model.name, cfg.model.task, cfg.model.quantization) == ("smollm2", "causal-lm", "none")
    assert set(cfg.adapter.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert cfg.train.eval_max_new_tokens > 0 and sim.clients == 2
    responses = {row["response"] for row in load_corpus(cfg.data.dataset)}
    assert responses == set(cfg.data.label_words), "every response is a label word: accuracy and macro-F1 apply"
    quantised, _ = load_scenario("smollm2", {"model.quantization": "nf4"})
    assert quantised.model.quantization == "nf4"
