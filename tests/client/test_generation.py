"""Generation-based evaluation: greedy answers within a budget, counts that sum exactly across nodes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.client.data import Example
from pollinate.client.generation import count, generate
from pollinate.models import build_peft_model
from pollinate.proto.generation_metrics import scores, sum_counts
from pollinate.proto.reply_schema import EVALUATE, check_reply
from pollinate.proto.run_config import RunConfig

WORDS = ("negative", "positive", "neutral")


def test_counts_give_exact_match_accuracy_and_macro_f1() -> None:
    answers = ["Positive.", "negative", "positive, I think", "no idea", "neutral"]
    truth = ["positive", "positive", "positive", "negative", "neutral"]
    counts = count(answers, truth, WORDS)
    assert (counts["gen-count"], counts["gen-exact"], counts["gen-labelled"], counts["gen-correct"]) == (5, 2, 5, 3)
    # positive: tp 2 fn 1; negative: fp 1 fn 1; neutral: tp 1
    assert (counts["gen-tp-1"], counts["gen-fp-1"], counts["gen-fn-1"]) == (2, 0, 1)
    assert (counts["gen-tp-0"], counts["gen-fp-0"], counts["gen-fn-0"]) == (0, 1, 1)
    got = scores(counts, len(WORDS))
    assert got["gen-exact-match"] == 2 / 5 and got["gen-accuracy"] == 3 / 5
    assert abs(got["gen-macro-f1"] - (0 + 2 * 2 / (4 + 1) + 1) / 3) < 1e-12


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(WORDS + ("maybe",)), st.sampled_from(WORDS)), min_size=1, max_size=40),
       st.lists(st.integers(0, 3), min_size=40, max_size=40))
def test_summed_node_counts_score_the_pooled_set_exactly(pairs, owners) -> None:
    nodes = [[p for p, o in zip(pairs, owners) if o == k] for k in range(4)]
    per_node = [count([a for a, _ in n], [t for _, t in n], WORDS) for n in nodes if n]
    pooled = count([a for a, _ in pairs], [t for _, t in pairs], WORDS)
    assert sum_counts(per_node) == pooled
    assert scores(sum_counts(per_node), len(WORDS)) == scores(pooled, len(WORDS))


def test_generation_is_greedy_within_the_token_budget_and_the_report_passes_the_schema() -> None:
    cfg = RunConfig().replace(**{"model.name": "tiny-llama", "model.task": "causal-lm",
                                 "adapter.target-modules": "q_proj,v_proj"})
    model, base = build_peft_model(cfg)
    examples = [Example(text="", response="positive", turns=(("user", f"review {i}"),)) for i in range(3)]
    first = generate(model, base.tokenizer, examples, 4, 64, torch.device("cpu"))
    again = generate(model, base.tokenizer, examples, 4, 64, torch.device("cpu"), batch_size=2)
    assert first == again  # greedy and independent of batching (left padding)
    assert all(len(a.split()) <= 4 for a in first)  # a WordPiece token decodes to at most one word
    counts = count(first, [e.response for e in examples], ("negative", "positive"))
    from flwr.app import MetricRecord, RecordDict

    report = MetricRecord({"num-examples": 3, "loss": 1.0, "accuracy": 0.0, "token-accuracy": 0.5, **counts})
    assert check_reply(EVALUATE, RecordDict({"report": report}))["gen-count"] == 3


def test_generation_counts_that_cannot_all_be_true_are_rejected() -> None:
    import pytest
    from flwr.app import MetricRecord, RecordDict

    from pollinate.proto.adapter_record import UpdateRejected

    good = {"num-examples": 4, "loss": 1.0, "accuracy": 0.5, **count(["positive", "no", "negative", "x"],
                                                                    ["positive", "positive", "negative", "x"],
                                                                    ("negative", "positive"))}
    assert check_reply(EVALUATE, RecordDict({"report": MetricRecord(good)}))["gen-correct"] == 2
    for bad, why in [({"gen-correct": 4}, "do not nest"), ({"gen-tp-0": 3}, "do not add up"),
                     ({"gen-count": 9}, "do not nest")]:
        with pytest.raises(UpdateRejected, match=why):
            check_reply(EVALUATE, RecordDict({"report": MetricRecord({**good, **bad})}))
    partial = {k: v for k, v in good.items() if k != "gen-exact"}
    with pytest.raises(UpdateRejected, match="missing"):
        check_reply(EVALUATE, RecordDict({"report": MetricRecord(partial)}))
