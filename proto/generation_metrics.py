"""Generation-based evaluation of an instruction-tuned model: the counts a node reports, the scores they give.

A node generates greedily for its held-out prompts and counts: examples, exact matches, and, for label-like
responses (one of ``data.label-words``), correct labels and per-class true/false positives and false negatives.
Counts are sufficient statistics: summed over nodes they give exactly the scores of the pooled evaluation
set (a mean of per-node macro-F1s would not).
"""

from __future__ import annotations

from collections.abc import Mapping

MAX_LABEL_WORDS = 8  # keeps a report within reply_schema.MAX_METRICS (3 counts per class)
GENERATED, EXACT, LABELLED, CORRECT = "gen-count", "gen-exact", "gen-labelled", "gen-correct"
COUNT_KEYS = (GENERATED, EXACT, LABELLED, CORRECT)


def class_keys(i: int) -> tuple[str, str, str]:
    """The report keys of class ``i``'s true positives, false positives and false negatives."""
    return f"gen-tp-{i}", f"gen-fp-{i}", f"gen-fn-{i}"


def all_keys() -> tuple[str, ...]:
    """Every count key a report may hold."""
    return COUNT_KEYS + tuple(k for i in range(MAX_LABEL_WORDS) for k in class_keys(i))


def normalise(text: str) -> str:
    """What exact match compares: lower case, single spaces, no surrounding punctuation."""
    return " ".join(text.lower().split()).strip(" .!?,;:\"'")


def sum_counts(reports: list[Mapping[str, float]]) -> dict[str, int]:
    """The nodes' counts added key by key (only keys of ``all_keys``)."""
    keys = set(all_keys())
    total: dict[str, int] = {}
    for report in reports:
        for key, value in report.items():
            if key in keys:
                total[key] = total.get(key, 0) + int(value)
    return total


def scores(counts: Mapping[str, int], classes: int) -> dict[str, float]:
    """exact-match, and with label words accuracy and macro-F1 (mean over classes of 2tp / (2tp + fp + fn))."""
    out: dict[str, float] = {}
    if counts.get(GENERATED, 0):
        out["gen-exact-match"] = counts.get(EXACT, 0) / counts[GENERATED]
    if classes and counts.get(LABELLED, 0):
        out["gen-accuracy"] = counts.get(CORRECT, 0) / counts[LABELLED]
        f1s = []
        for i in range(classes):
            tp, fp, fn = (counts.get(k, 0) for k in class_keys(i))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        out["gen-macro-f1"] = sum(f1s) / classes
    return out
