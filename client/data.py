"""A node's local data: its examples, a seeded train/eval split, and tokenised batches.

A data file is CSV, JSONL, Parquet, Arrow, or a directory a ``datasets.Dataset.save_to_disk`` wrote (the last
three read by the ``datasets`` library). Classification examples carry a text column and a label, an integer id
or one of the run's class names (``data.labels``); causal-LM examples carry an instruction (plus an optional
input) and a response, or a ``messages`` conversation whose last turn is the assistant's. Every column name is a
``data.*-field`` key. The loss is on the response tokens only; how the prompt is rendered (the model's chat
template, else a plain one) is ``client/prompts.py``. Data is read from the node's
disk and never leaves it.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import pollinate.client.opacus_logging  # noqa: F401 - before Opacus: undoes its logging.basicConfig()
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from transformers import PreTrainedTokenizerBase

from pollinate.privacy.csprng import poisson_sample
from pollinate.client.prompts import ROLES, Turns, encode, plain_prompt
from pollinate.proto.run_config import ConfigError, DataConfig, ModelConfig


class DataError(ConfigError):
    """The node's data is missing or malformed; the message names the file, row and fix (a user error, no traceback)."""


@dataclass(frozen=True)
class Example:
    text: str  # classification text, or the causal-LM prompt in the plain template
    label: int = -1  # classification label
    response: str = ""  # causal-LM target
    turns: Turns = ()  # causal-LM: the conversation up to the user's last turn, (role, content)


FORMATS = "CSV, JSONL, Parquet, Arrow or a `datasets` save_to_disk directory"


def read_examples(path: str | Path, data: DataConfig, model: ModelConfig) -> list[Example]:
    """Examples from a data file (any of ``FORMATS``), validated against the task."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist on this node; pass --data PATH "
                        f"({FORMATS} with {_fields(data, model)})")
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no examples; add rows below the header")
    return examples_of(rows, path, data, model)


def read_rows(path: Path) -> list[dict[str, object]]:
    """The rows of a UTF-8 .csv (header first) or .jsonl (one JSON object a line) file, or of a Parquet, Arrow or
    ``save_to_disk`` dataset; a DataError naming the file and line otherwise. ``simulate --corpus`` reads a corpus
    with it too."""
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        return _dataset_rows(path)
    if path.suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"data file {path} must be {FORMATS} (.csv, .jsonl, .parquet, .arrow or a directory)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: byte 0x{raw[e.start]:02x} is not UTF-8 text; save the file as UTF-8 "
                        f"(e.g. `iconv -f latin1 -t utf-8`)") from None
    if path.suffix == ".csv":
        try:
            return _csv_rows(text, path)
        except csv.Error as e:
            raise DataError(f"{path}: not a valid CSV file ({e}); quote fields that hold commas or line breaks") \
                from None
    rows: list[dict[str, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                            f"one JSON object such as {{\"text\": \"...\", \"label\": 0}}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: a JSON {type(row).__name__}, not an object; each line must be one "
                            f"JSON object such as {{\"text\": \"...\", \"label\": 0}}")
        rows.append(row)
    return rows


def _csv_rows(text: str, path: Path) -> list[dict[str, object]]:
    """CSV rows; a row with more or fewer fields than the header is a broken line, refused with its number."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[dict[str, object]] = []
    for number, row in enumerate(reader, start=1):
        if None in row or None in row.values():
            many = "more" if None in row else "fewer"
            raise DataError(f"{path} row {number} (line {reader.line_num}): {many} fields than the header's "
                            f"{len(reader.fieldnames or [])}; quote fields that hold commas, or fix the line")
        rows.append(dict(row))
    return rows


def _dataset_rows(path: Path) -> list[dict[str, object]]:
    """Rows of a Parquet or Arrow file or a ``save_to_disk`` directory, read by the ``datasets`` library.

    Its cache goes to a temporary directory: a node's data is not copied anywhere that outlives this call.
    """
    import tempfile

    import datasets

    datasets.disable_progress_bars()  # a node's console (and a test's) shows our lines, not the library's bars
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
            if isinstance(loaded, datasets.DatasetDict):
                if len(loaded) != 1 and "train" not in loaded:
                    raise DataError(f"{path} holds the splits {sorted(loaded)}; save the one split to use "
                                    f"(dataset_dict['name'].save_to_disk(DIR)) or name it 'train'")
                loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            return loaded.to_list()
        with tempfile.TemporaryDirectory(prefix="pollinate-data-") as cache:
            kind = path.suffix.removeprefix(".")
            return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True).to_list()
    except DataError:
        raise
    except Exception as e:  # the library's own errors (a truncated file, a directory of something else)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable {FORMATS} ({first}); check the file, or re-save it with "
                        f"datasets' save_to_disk / to_parquet") from None


def examples_of(rows: list[dict[str, object]], path: str | Path, data: DataConfig,
                model: ModelConfig) -> list[Example]:
    """``rows`` (from ``path``) checked against the task: row i is the i-th example of the file."""
    return [_example(row, i, Path(path), data, model) for i, row in enumerate(rows, start=1)]


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded (train, eval) split; both sides get at least one example."""
    if len(examples) < 2:
        raise DataError(f"a node needs at least 2 examples to train and evaluate, it has {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = len(examples) - train_size(len(examples), eval_fraction)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def train_size(n: int, eval_fraction: float) -> int:
    """How many of a node's ``n`` examples ``split`` trains on (the n of DP-SGD's sampling rate and delta < 1/n)."""
    return n - min(n - 1, max(1, round(eval_fraction * n)))


WINDOW_BATCHES = 50  # length grouping sorts within windows of this many batches: batches stay a mix of the data


def token_lengths(examples: list[Example], tokenizer: PreTrainedTokenizerBase, model: ModelConfig) -> list[int]:
    """Each example's token count as ``_collate`` builds it (truncated to ``model.max_length``): what its batch
    is padded against. Tokenises every example once; a node keeps the result (``client/resident.py``)."""
    if model.task == "classification":
        enc = tokenizer([e.text for e in examples], truncation=True, max_length=model.max_length)
        return [len(ids) for ids in enc["input_ids"]]
    return [min(model.max_length, sum(map(len, encode(tokenizer, e.turns or (("user", e.text),), e.response))))
            for e in examples]


def batch_order(n: int, batch_size: int, seed: int | None, lengths: list[int] | None = None) -> list[list[int]]:
    """The example indices of each batch of one pass over ``n`` examples.

    ``seed`` shuffles, None keeps the file's order. With ``lengths`` examples of similar length share a batch, so a
    batch padded to its longest computes little padding: shuffled, then sorted by length within windows of
    ``WINDOW_BATCHES`` batches, cut into batches, the batches shuffled (the idea of transformers'
    ``group_by_length``, written out here because it is a few lines over our own batches). Without a seed (evaluation)
    the whole pass is sorted by length; evaluation sums its loss and counts over examples, so order is free.
    """
    rng = random.Random(seed)
    order = list(range(n))
    if seed is not None:
        rng.shuffle(order)
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} examples: token_lengths must come from the same list")
    window = n if seed is None else WINDOW_BATCHES * batch_size
    grouped: list[list[int]] = []
    for start in range(0, n, window):
        part = sorted(order[start:start + window], key=lengths.__getitem__)  # stable: ties keep the shuffle
        grouped += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if seed is not None:
        rng.shuffle(grouped)  # else every pass would run its short batches first
    return grouped


def batches(examples: list[Example], tokenizer: PreTrainedTokenizerBase, model: ModelConfig, batch_size: int,
            seed: int | None, lengths: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches padded to the longest example, one pass; shuffled when ``seed`` is given, grouped by
    length when the examples' ``lengths`` (``token_lengths``) are (``batch_order``)."""
    for indices in batch_order(len(examples), batch_size, seed, lengths):
        yield _collate([examples[i] for i in indices], tokenizer, model)


def endless_batches(examples: list[Example], tokenizer: PreTrainedTokenizerBase, model: ModelConfig,
                    batch_size: int, seed: int, lengths: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Reshuffled passes over the data, forever (training takes a fixed number of steps); grouped by length when
    ``lengths`` are given."""
    epoch = 0
    while True:
        yield from batches(examples, tokenizer, model, batch_size, seed * 1_000_003 + epoch, lengths)
        epoch += 1


def poisson_batches(examples: list[Example], tokenizer: PreTrainedTokenizerBase, model: ModelConfig,
                    sample_rate: float, seed: int | None,
                    secure: bool = False) -> Iterator[dict[str, torch.Tensor] | None]:
    """Batches with every example drawn independently with probability ``sample_rate``, forever.

    Poisson sampling is what DP-SGD's privacy amplification by subsampling assumes (Abadi et al.
    2016; Opacus' sampler); batch sizes vary and an empty batch is ``None``. ``seed`` None: fresh entropy.
    ``secure`` (privacy.secure-mode): every draw from the OS CSPRNG (``privacy.csprng.poisson_sample``).
    Never grouped by length (``train.group-by-length`` does not apply): the accountant assumes each example is drawn
    independently of every other, and sorting a window by length would couple the draws.
    """
    if secure:
        while True:
            indices = poisson_sample(range(len(examples)), sample_rate)
            yield _collate([examples[i] for i in indices], tokenizer, model) if indices else None
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    sampler = UniformWithReplacementSampler(num_samples=len(examples), sample_rate=sample_rate, generator=generator)
    while True:
        for indices in sampler:
            yield _collate([examples[i] for i in indices], tokenizer, model) if len(indices) else None


def _collate(chunk: list[Example], tokenizer: PreTrainedTokenizerBase, model: ModelConfig) -> dict[str, torch.Tensor]:
    if model.task == "classification":
        enc = tokenizer([e.text for e in chunk], padding=True, truncation=True, max_length=model.max_length,
                        return_tensors="pt")
        enc["labels"] = torch.tensor([e.label for e in chunk], dtype=torch.long)
        return dict(enc)
    # Causal LM: prompt + response through its end token, loss only on the response (labels -100 elsewhere).
    ids, labels = [], []
    for e in chunk:
        prompt, target = encode(tokenizer, e.turns or (("user", e.text),), e.response)
        seq = (prompt + target)[: model.max_length]
        ids.append(seq)
        labels.append(([-100] * len(prompt) + target)[: model.max_length])
    width = max(len(s) for s in ids)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids]),
        "labels": torch.tensor([s + [-100] * (width - len(s)) for s in labels]),
    }


def _fields(data: DataConfig, model: ModelConfig) -> str:
    if model.task == "classification":
        return f"columns {data.text_field!r} and {data.label_field!r}"
    return (f"columns {data.instruction_field!r} and {data.response_field!r} (optionally {data.input_field!r}), "
            f"or {data.messages_field!r}")


def _example(row: dict[str, object], i: int, path: Path, data: DataConfig, model: ModelConfig) -> Example:
    where = f"{path} row {i}"
    if model.task == "causal-lm":
        turns, response = (_conversation(row[data.messages_field], where, data) if row.get(data.messages_field)
                           else _instruction(row, where, data))
        return Example(text=plain_prompt(turns), response=response, turns=turns)
    text, label = row.get(data.text_field), row.get(data.label_field)
    if text is None or label is None:
        raise DataError(f"{where} lacks {_fields(data, model)}; set data.text-field / data.label-field "
                        f"to your column names")
    _require_text(text, f"{where}: {data.text_field!r}")
    return Example(text=str(text), label=label_id(label, where, data, model))


def label_id(label: object, where: str, data: DataConfig, model: ModelConfig) -> int:
    """A row's class id: its name's position in ``data.labels``, or an integer id below the number of classes."""
    if data.labels and isinstance(label, (str, int)) and not isinstance(label, bool) and str(label) in data.labels:
        return data.labels.index(str(label))
    value = _integer(label)
    if value is not None and 0 <= value < model.classes:
        return value
    if data.labels:
        raise DataError(f"{where}: label {_shown(label)} is not one of the run's classes {list(data.labels)} "
                        f"(data.labels); fix the row, or add the class to data.labels on the coordinator")
    if isinstance(label, str) and value is None:
        raise DataError(f"{where}: label {_shown(label)} is a name, but the run has no class names; set "
                        f"data.labels (e.g. --set data.labels=a,b) so every node maps names to the same ids")
    raise DataError(f"{where}: label {_shown(label)} is not an integer in [0, {model.classes}); map your labels "
                    f"to 0..{model.classes - 1}, name them in data.labels, or set model.num-labels")


def _instruction(row: dict[str, object], where: str, data: DataConfig) -> tuple[Turns, str]:
    """An instruction/input/response row as one user turn and the response."""
    names = (data.instruction_field, data.response_field)
    if not row.get(data.instruction_field) or not row.get(data.response_field):
        raise DataError(f"{where} lacks {names[0]!r} or {names[1]!r} (causal-lm examples need both, or a "
                        f"{data.messages_field!r} list); set data.instruction-field / data.response-field / "
                        f"data.messages-field to your column names")
    for name in names:
        _require_text(row[name], f"{where}: {name!r}")
    extra = row.get(data.input_field)
    if extra:
        _require_text(extra, f"{where}: {data.input_field!r}")
    user = str(row[data.instruction_field]) + (f"\n\n{extra}" if extra else "")
    return (("user", user),), str(row[data.response_field])


def _conversation(messages: object, where: str, data: DataConfig) -> tuple[Turns, str]:
    """A ``messages`` list [{"role", "content"}, ...] ending with the assistant's turn: the prompt turns and it."""
    field = f"{where}: {data.messages_field!r}"
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{field} must be a list of at least two {{\"role\": ..., \"content\": ...}} objects "
                        f"(the user's turn, then the assistant's); got {_shown(messages)[:80]}")
    turns = []
    for n, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{field} message {n} must be {{\"role\": one of {list(ROLES)}, \"content\": text}}; "
                            f"got {_shown(m)[:80]}")
        turns.append((str(m["role"]), str(m["content"])))
    if turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise DataError(f"{field} must end with a user turn followed by the assistant's (the response to learn); "
                        f"it ends with {turns[-2][0]!r}, {turns[-1][0]!r}")
    return tuple(turns[:-1]), turns[-1][1]


def _require_text(value: object, where: str) -> None:
    """Text is a non-empty string: a JSON number or boolean is a column mix-up, not text to train on."""
    if not isinstance(value, str):
        raise DataError(f"{where} is {_shown(value)}, not a string of text; write it as a JSON string (in quotes) "
                        f"or check that the columns are the right way round")
    if not value.strip():
        raise DataError(f"{where} is empty; remove the row or fill in its text")


def _shown(value: object) -> str:
    """A value as the file holds it: JSON's ``true`` and ``1.7``, a string in quotes."""
    return repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _integer(label: object) -> int | None:
    """A class label: an int, an integral float (1.0) or a string of one (CSV); never a bool or 1.7."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, float):
        return int(label) if label.is_integer() else None
    if isinstance(label, str):
        try:
            return int(label.strip())
        except ValueError:
            return None
    return None
