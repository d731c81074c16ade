"""The studies' corpus (bench/federation_runs.py): a synthetic, seeded, sentiment-like text classification task.

Why synthetic: the benches measure aggregation rules and privacy mechanisms, not the model. tiny-bert (random init, 2 layers) with LoRA
does not learn the real Rotten Tomatoes reviews in a few rounds (the first pass ended at the majority class), so
an attack could not lower its accuracy and "within 2 points of clean" meant nothing. Here the label is carried by
words, as in a review, and the model learns it in a few rounds of a few steps:

- a text is 8-12 words: 3-5 words of its class' vocabulary, with probability 0.3 one word of the other class'
  (a hedge: "good but dull"), the rest neutral filler words, shuffled;
- 10% of the labels are then flipped (label noise), so no model scores above ~0.9 on held-out data;
- classes are balanced (majority ~0.5); every word is one token of the tiny models' WordPiece vocabulary.

``write_corpus(path, size)`` always writes the same rows (seed ``CORPUS_SEED``; a larger size appends rows to the
same first ones); the run's seed then splits them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CORPUS_SEED = 13
SIZE = 3200  # the robustness bench's: 400 per node of 8, 320 to train on, 80 held out
LABEL_NOISE = 0.10
POSITIVE = ("good great excellent wonderful superb delightful brilliant moving charming funny beautiful fresh clever "
            "touching gripping enjoyable lovely smart warm perfect").split()
NEGATIVE = ("bad awful boring dull terrible weak tedious clumsy bland messy poor stale silly flat lifeless annoying "
            "ugly painful shallow worst").split()
NEUTRAL = ("the a an movie film story plot actor actress scene director script camera music ending character audience "
           "of and with is was this that it in on for as by from at about its his her their one two first second "
           "time year people city house night day family friend man woman child war love life world end part minutes "
           "hour screen cast role series book version studio summer winter town road school team game show sound "
           "light color voice words running length title set").split()


def rows(size: int = SIZE, seed: int = CORPUS_SEED) -> list[dict[str, object]]:
    """The corpus: ``size`` rows of ``{"text", "label", "group"}``, label 1 positive, 0 negative."""
    rng = random.Random(seed)
    out = []
    for i in range(size):
        label = i % 2  # balanced
        own, other = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        words = rng.choices(own, k=rng.randint(3, 5))
        if rng.random() < 0.3:
            words.append(rng.choice(other))
        words += rng.choices(NEUTRAL, k=rng.randint(8, 12) - len(words))
        rng.shuffle(words)
        if rng.random() < LABEL_NOISE:
            label = 1 - label
        out.append({"text": " ".join(words), "label": label, "group": f"synthetic-{i}"})
    return out


def write_corpus(path: Path, size: int = SIZE) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(size)), encoding="utf-8")
    return path
