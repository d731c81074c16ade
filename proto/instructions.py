"""What the server asks of a node in one exchange: the typed ``instructions`` ConfigRecord.

Strategies express their client-side needs only through these fields, so the ClientApp
stays one code path: train at this rank, keep this factor frozen, add a proximal term,
fold these base deltas into the frozen weights, upload the adapter or a sketch of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields

from pollinate.proto.run_config import Scalar

TRAIN_FACTORS = ("all", "A", "B")  # which LoRA factors the node trains (the others stay as sent)
UPLOADS = ("adapter", "sketch-y", "sketch-z")


def frozen_factor_tag(train_factors: str) -> str | None:
    """The state-dict name fragment of the LoRA factor held frozen when training ``train_factors`` (None: none)."""
    return {"all": None, "A": ".lora_B.", "B": ".lora_A."}[train_factors]


# The classifier head: the modules PEFT trains in full beside the adapter for sequence classification
# (its modules_to_save for SEQ_CLS), named "classifier" (BERT family) or "score" (decoder models).
HEAD_MODULES = ("classifier", "score")


def is_head(name: str) -> bool:
    """Whether the parameter or state-dict name ``name`` belongs to the classifier head."""
    return any(part in HEAD_MODULES for part in name.split("."))


def trained_names(names: Iterable[str], train_factors: str, freeze_head: bool = False) -> list[str]:
    """The adapter tensors a node trains under ``train_factors`` (and train.freeze-head): noise goes on these only."""
    frozen = frozen_factor_tag(train_factors)
    return [k for k in names if (frozen is None or frozen not in k) and not (freeze_head and is_head(k))]


@dataclass(frozen=True)
class Instructions:
    round: int = 0
    rank: int = 0  # LoRA rank of the adapter sent (0: the run config's adapter.r)
    train_factors: str = "all"
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 on the trainable adapter tensors
    upload: str = "adapter"  # adapter | sketch-y (exchange 1 of `sketch`) | sketch-z (exchange 2)
    sketch_seed: int = 0
    sketch_size: int = 0
    personal_factors: str = ""  # "B": the node keeps its own LoRA B across rounds and never uploads it
    prune_gamma: float = 0.0  # hetlora self-pruning: drop the LoRA tail whose share of ||B A|| is <= gamma
    # The stable pollinate run key a node files its privacy budget under (privacy/budget.py); it survives a
    # resume, which gets a new Flower run id.
    privacy_run_key: str = ""
    upload_rank: int = 0  # linear hetlora: zero-pad the uploaded LoRA factors to this rank, B in its scaling
    clip_norm: float = 0.0  # central DP under secure aggregation: clip ||upload - received|| to this (0: off)
    # sketch under central DP: sketch and project the node's delta s_k (B_k A_k - B_sent A_sent), not its product
    sketch_delta: bool = False

    def __post_init__(self) -> None:
        if self.train_factors not in TRAIN_FACTORS:
            raise ValueError(f"instructions.train-factors = {self.train_factors!r}; expected one of {TRAIN_FACTORS}")
        if self.personal_factors not in ("", "B"):
            raise ValueError(f"instructions.personal-factors = {self.personal_factors!r}; expected '' or 'B'")
        if self.upload not in UPLOADS:
            raise ValueError(f"instructions.upload = {self.upload!r}; expected one of {UPLOADS}")

    def to_record_values(self) -> dict[str, Scalar]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_record_values(cls, values: Mapping[str, object]) -> Instructions:
        known = {f.name for f in fields(cls)}
        kwargs = {k.replace("-", "_"): v for k, v in values.items() if k.replace("-", "_") in known}
        return cls(**kwargs)  # type: ignore[arg-type]
