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


def inconsistency(report: Mapping[str, float]) -> str | None:
    """Why a node's generation counts cannot all be true (a reply is untrusted input), or None."""
    if not any(k in report for k in all_keys()):
        return None
    missing = [k for k in COUNT_KEYS if k not in report]
    if missing:
        return f"generation counts {missing} are missing; a report carries all of {list(COUNT_KEYS)} or none"
    n, exact, labelled, correct = (report[k] for k in COUNT_KEYS)
    classes = [tuple(report.get(k, 0) for k in class_keys(i)) for i in range(MAX_LABEL_WORDS)]
    tp, fp, fn = (sum(c[j] for c in classes) for j in range(3))
    if n > report.get("num-examples", n) or exact > n or labelled > n or correct > labelled:
        return (f"generation counts do not nest: {GENERATED} {n:g} <= num-examples, {EXACT} {exact:g} and "
                f"{LABELLED} {labelled:g} <= {n:g}, {CORRECT} {correct:g} <= {labelled:g}")
    if tp != correct or tp + fn != labelled or fp > labelled - correct:
        return (f"per-class counts (tp {tp:g}, fp {fp:g}, fn {fn:g}) do not add up to {CORRECT} {correct:g} "
                f"of {LABELLED} {labelled:g}")
    return None


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
