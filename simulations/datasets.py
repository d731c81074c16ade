"""Corpora for simulations: the bundled Rotten Tomatoes snippets, or the user's own data file.

``rotten-tomatoes``: 12,808 review snippets labelled fresh (1) / rotten (0), each with the
movie it reviews (a natural non-IID key). It ships in ``simulations/data/`` under
Apache-2.0 (see ``simulations/data/DATA_NOTE.md``). ``rotten-tomatoes-instruct`` is the
same text as instruction/response pairs for the causal-LM scenario.
"""

from __future__ import annotations

import bz2
import csv
import io
from pathlib import Path

from pollinate.proto.run_config import ConfigError

DATA_DIR = Path(__file__).parent / "data"
INSTRUCTION = "Is this movie review positive or negative?\n\n{text}"


def _rotten_tomatoes() -> list[dict[str, object]]:
    with bz2.open(DATA_DIR / "rotten_tomatoes_corpus_full.csv.bz2") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    return [{"text": r["text"], "label": int(r["category"] == "fresh"), "group": r["movie_name"]}
            for r in rows if r["category"] in ("fresh", "rotten")]


def load_corpus(name: str) -> list[dict[str, object]]:
    """Rows for ``data.dataset``: a bundled corpus name or a path the node reader reads (client.data.FORMATS)."""
    if name == "rotten-tomatoes":
        return _rotten_tomatoes()
    if name == "rotten-tomatoes-instruct":
        return [{"instruction": INSTRUCTION.format(text=r["text"]),
                 "response": "positive" if r["label"] else "negative", "label": r["label"], "group": r["group"]}
                for r in _rotten_tomatoes()]
    path = Path(name)
    if not path.exists():
        raise ConfigError(f"data.dataset = {name!r} is neither a bundled corpus (rotten-tomatoes, "
                          f"rotten-tomatoes-instruct) nor an existing data file; pass --corpus PATH")
    from pollinate.client.data import read_rows  # the node's reader: the same errors, naming file and line

    return read_rows(path)
