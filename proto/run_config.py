"""The run configuration: one typed schema shared by the ServerApp and every ClientApp.

Flower carries a run's configuration to both sides as a flat mapping of scalars
(``context.run_config``, keys such as ``"adapter.r"``). This module is the single
definition of those keys: frozen dataclasses with defaults, parsed and validated once
at the edge (``RunConfig.from_flat`` / ``RunConfig.from_toml``) so the rest of the code
takes typed values. Enumerations are ``Literal`` types, checked by one generic rule.

Strategy options are not a section of this module: each strategy declares its own as a
frozen dataclass ``Options`` on its class (PEFT-style: fields with ``metadata["help"]``,
see ``option``), and its keys are ``strategy.<strategy-name>.<option>``. The strategy
registry is the one list of strategies, so the schema of the ``strategy`` section is read
from it when a config is parsed (imported lazily: ``strategies`` imports this module).
``RunConfig.strategy`` holds the chosen strategy's ``Options`` instance, never strings.

``pyproject.toml``'s ``[tool.flwr.app.config]`` mirrors every settable key with its default
(Flower passes on only the keys listed there); ``python -m pollinate.proto.pyproject_mirror
pyproject.toml`` regenerates it from this schema and a test checks it is current.
"""

from __future__ import annotations

import dataclasses
import json
import re
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cache, cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args, get_origin, get_type_hints

Scalar = bool | int | float | str

ModelTask = Literal["classification", "causal-lm"]
Quantization = Literal["none", "nf4", "int8"]  # the frozen base's weights (QLoRA); the adapter stays float32
Partitioning = Literal["iid", "dirichlet", "natural"]  # simulation only
WireDtype = Literal["float32", "float16"]  # bfloat16 does not travel in a Flower ArrayRecord
OnRoundFailure = Literal["stop", "continue"]
Weighting = Literal["examples", "equal", "capped"]  # how nodes' updates are weighted in a round (server/weighting.py)
UpdateBoundMode = Literal["absolute", "median"]
PrivacyMode = Literal["off", "sample", "central", "local"]
PRIVACY_MODES: tuple[str, ...] = get_args(PrivacyMode)

# Strategy options that were one shared bag before each strategy had its own ``Options``:
# old key -> (the option's new name, the strategies that have it). Only for the error that names the new key.
_RENAMED_STRATEGY_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "strategy.proximal-mu": ("proximal-mu", ("fedprox",)),
    "strategy.server-lr": ("server-lr", ("fedadam", "fedyogi")),
    "strategy.beta1": ("beta1", ("fedadam", "fedyogi")),
    "strategy.beta2": ("beta2", ("fedadam", "fedyogi")),
    "strategy.tau": ("tau", ("fedadam", "fedyogi")),
    "strategy.hetlora-prune": ("prune", ("hetlora",)),
    "strategy.hetlora-norm-weighting": ("norm-weighting", ("hetlora",)),
    "strategy.sketch-oversample": ("oversample", ("sketch",)),
}


def upgrade_stored(flat: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """A run config stored before strategies had their own ``Options``, with today's keys (for a resume).

    Such a config holds every shared option: the chosen strategy's move to ``strategy.<chosen>.<option>``, and
    the others, which that strategy never read, are dropped.
    """
    chosen = str(flat.get("federation.strategy", FederationConfig.strategy))
    upgraded: dict[str, Scalar] = {}
    for key, value in flat.items():
        if key not in _RENAMED_STRATEGY_KEYS:
            upgraded[key] = value
            continue
        name, owners = _RENAMED_STRATEGY_KEYS[key]
        if chosen in owners:
            upgraded.setdefault(f"strategy.{chosen}.{name}", value)
    return upgraded


class ConfigError(ValueError):
    """A run configuration value is missing, unknown or out of range; the message says how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "minilm"  # a name from pollinate.models.BASE_MODELS, or a local HF model directory
    task: ModelTask = "classification"
    # classification only; 0: inferred (len(data.labels); in a simulation, from the corpus; else 2)
    num_labels: int = 0
    max_length: int = 64  # tokens per example (longer text is truncated)
    # Load the frozen base through bitsandbytes (QLoRA): nf4 (4-bit NormalFloat) or int8, on CUDA or CPU.
    # Needs `pip install "pollinate[qlora]"`. The adapter on the wire and the export are the same as with none.
    quantization: Quantization = "none"

    @property
    def classes(self) -> int:
        """The number of classes a classifier has: ``num_labels``, or 2 when it was left to inference."""
        return self.num_labels or 2

    def validate(self) -> None:
        _require(self.num_labels == 0 or self.num_labels >= 2, "model.num-labels", self.num_labels,
                 "use 2 or more (0: inferred from data.labels or the corpus)")
        _require(self.max_length >= 8, "model.max-length", self.max_length, "use at least 8 tokens")
        _require(self.quantization == "none" or self.task == "causal-lm", "model.quantization", self.quantization,
                 "QLoRA quantises a causal LM's base: set model.task = 'causal-lm', or model.quantization = 'none'")


@dataclass(frozen=True)
class AdapterConfig:
    method: str = "lora"  # any PEFT method: lora, dora, ia3, lokr, loha, bone, ...
    r: int = 8  # rank (ignored by methods without one, such as ia3)
    alpha: float = 16.0  # scaling numerator (lora_alpha, alpha); ignored where PEFT has none
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")  # flat form: "query,value" or a TOML list
    # Extra fields for the PEFT config class, e.g. '{"use_rslora": true}'. A JSON object string on the wire
    # (PEFT's fields are open-ended, Flower's config holds scalars only); ``option_dict`` is it parsed.
    options: str = ""

    def validate(self) -> None:
        _require(self.r > 0, "adapter.r", self.r, "the LoRA rank must be a positive integer, e.g. 8")
        _require(0.0 <= self.dropout < 1.0, "adapter.dropout", self.dropout, "use a value in [0, 1)")
        _require(bool(self.target_modules), "adapter.target-modules", ",".join(self.target_modules),
                 "name at least one module, e.g. 'query,value'")
        self.option_dict  # parses, or raises ConfigError

    @cached_property
    def option_dict(self) -> Mapping[str, Any]:
        """``options`` parsed once: the extra PEFT config fields (read-only)."""
        if not self.options:
            return MappingProxyType({})
        try:
            parsed = json.loads(self.options)
        except json.JSONDecodeError as e:
            raise ConfigError(f"adapter.options must be a JSON object, got {self.options!r} ({e})") from e
        if not isinstance(parsed, dict):
            raise ConfigError(f"adapter.options must be a JSON object such as '{{\"use_rslora\": true}}', "
                              f"got {self.options!r}")
        return MappingProxyType(parsed)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-3
    batch_size: int = 16
    local_steps: int = 40  # optimiser steps per round on each client
    eval_max_examples: int = 256  # cap on each client's evaluation set
    # causal-lm: tokens each held-out prompt may generate greedily for exact match / accuracy / macro-F1;
    # 0 evaluates loss and perplexity only
    eval_max_new_tokens: int = 8
    weight_decay: float = 0.0
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N (a node's --device overrides it)
    # Recompute activations in the backward pass: less memory (a 7B base on one GPU), about a third more time.
    gradient_checkpointing: bool = False
    # Classification: keep the classifier head at the global adapter's initial (random) head and train only the
    # adapter layers (FedBABU, Oh et al. 2022). Under label skew each node's head drifts to its own classes and the
    # averaged head flips between them (docs/strategies-bench.md); a fixed head removes that drift. Under central DP
    # the head then carries no noise either.
    freeze_head: bool = False
    # Training batches of examples of similar token length (shuffled, sorted within windows of 50 batches, the
    # batches shuffled), so less of each batch is padding: the default scenario's forward/backward computed 44%
    # padding without it. Poisson batches (privacy.mode = 'sample') are never grouped. false: plain shuffled batches.
    group_by_length: bool = True
    # auto: mixed precision where the device computes bf16 natively: bf16 autocast on a CUDA GPU that has it (else
    # fp16 with a grad scaler) and on a CPU with AVX512-BF16 or AMX (2.1x the fp32 forward/backward of MiniLM here);
    # the weights and AdamW stay fp32. fp32: none. DP-SGD on a CPU always runs fp32 (its per-example clipping).
    precision: str = "auto"

    def validate(self) -> None:
        _require(self.lr > 0, "train.lr", self.lr, "use a positive learning rate, e.g. 1e-3")
        _require(self.batch_size > 0, "train.batch-size", self.batch_size, "use a positive batch size")
        _require(self.local_steps > 0, "train.local-steps", self.local_steps, "use at least 1 step")
        _require(self.eval_max_examples > 0, "train.eval-max-examples", self.eval_max_examples, "use at least 1")
        _require(self.precision in ("auto", "fp32"), "train.precision", self.precision,
                 "use 'auto' (bf16 where the device has it natively) or 'fp32'")
        _require(0 <= self.eval_max_new_tokens <= 512, "train.eval-max-new-tokens", self.eval_max_new_tokens,
                 "use 0 (no generation) to 512 tokens")
        _require(valid_device(self.device), "train.device", self.device, "use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class DataConfig:
    # a bundled corpus name, or a path (simulation): CSV, JSONL, Parquet, Arrow or a `datasets` save_to_disk directory
    dataset: str = "rotten-tomatoes"
    partitioning: Partitioning = "iid"
    dirichlet_alpha: float = 0.5
    partition_dir: str = ""  # where the simulation wrote one JSONL file per partition
    eval_fraction: float = 0.2  # share of each client's local data held out for evaluation
    # simulation: share of the corpus held out as a global test set that no node trains on; each round's global
    # adapter is measured on it (accuracy and macro-F1, or loss and perplexity). 0: no global test set
    test_fraction: float = 0.0
    text_field: str = "text"
    label_field: str = "label"
    # causal-lm: the instruction, its optional input and the response; or a conversation list of
    # {"role": system|user|assistant, "content": ...} ending with the assistant's turn (JSONL).
    instruction_field: str = "instruction"
    input_field: str = "input"
    response_field: str = "response"
    messages_field: str = "messages"
    # causal-lm: the responses that are class labels (e.g. "negative,positive"): generation-based evaluation
    # then reports accuracy and macro-F1 over them, besides exact match. At most 8.
    label_words: tuple[str, ...] = ()
    group_field: str = "group"  # natural partitioning: the column whose values are kept together on one node
    # Class names in id order (id i is labels[i]); empty: labels are integer ids. A simulation fills it with the
    # corpus' sorted names when its labels are names; in a deployment it is the run's, never a node's own.
    labels: tuple[str, ...] = ()

    def validate(self) -> None:
        _require(len(set(self.labels)) == len(self.labels), "data.labels", ",".join(self.labels),
                 "list each class name once")
        _require(len(self.labels) != 1, "data.labels", ",".join(self.labels), "list at least 2 class names")
        _require(self.dirichlet_alpha > 0, "data.dirichlet-alpha", self.dirichlet_alpha, "use a positive alpha")
        _require(0.0 < self.eval_fraction < 1.0, "data.eval-fraction", self.eval_fraction, "use a value in (0, 1)")
        _require(0.0 <= self.test_fraction < 1.0, "data.test-fraction", self.test_fraction,
                 "use a share in [0, 1), e.g. 0.1 (0: no global test set)")
        _require(len(self.label_words) <= 8, "data.label-words", ",".join(self.label_words),
                 "name at most 8 label words (macro-F1 is reported over them)")


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 3
    strategy: str = "fedavg"  # a name from `pollinate strategies`
    min_nodes: int = 2  # a round needs at least this many connected nodes (and accepted updates)
    fraction_train: float = 1.0  # share of connected nodes sampled per round (central DP: each one's Poisson rate q)
    wait_for_nodes: float = 120.0  # seconds to wait for min-nodes before failing the round
    round_timeout: float = 900.0  # seconds to wait for replies in one exchange
    wire_dtype: WireDtype = field(default="float32", metadata={
        "hint": "bfloat16 does not travel in a Flower ArrayRecord"})  # adapter tensors on the wire
    on_round_failure: OnRoundFailure = field(default="stop", metadata={
        "hint": "'stop' (the run fails) or 'continue' (the next round starts from the last completed round's "
                "adapter)"})  # what follows a failed round (it is stored either way)
    max_consecutive_failures: int = 3  # continue: the run fails after this many failed rounds in a row
    weighting: Weighting = field(default="capped", metadata={
        "hint": "'examples' (n_k / n, FedAvg), 'equal' (1 / m) or 'capped' (examples, at most the count the node "
                "declared when first asked and at most federation.max-weight-share of the round)"})
    max_weight_share: float = 0.5  # capped: no node carries more than this share of a round's weight
    # A node's update norm ||B'A' - BA||_F above this is rejected (0: off). On by default at 3 x the round's median
    # (docs/robustness-bench.md: a x100 or weight-inflating node then leaves the model where the clean run ends).
    update_bound: float = 3.0
    update_bound_mode: UpdateBoundMode = field(default="median", metadata={
        "hint": "'absolute' (the bound is a norm) or 'median' (the bound is a multiple of the round's median "
                "update norm)"})

    def validate(self) -> None:
        _require(self.rounds > 0, "federation.rounds", self.rounds, "use at least 1 round")
        _require(self.min_nodes > 0, "federation.min-nodes", self.min_nodes, "use at least 1 node")
        _require(0.0 < self.fraction_train <= 1.0, "federation.fraction-train", self.fraction_train,
                 "use a value in (0, 1]")
        _require(self.wait_for_nodes > 0, "federation.wait-for-nodes", self.wait_for_nodes, "use seconds > 0")
        _require(self.round_timeout > 0, "federation.round-timeout", self.round_timeout, "use seconds > 0")
        _require(self.max_consecutive_failures >= 1, "federation.max-consecutive-failures",
                 self.max_consecutive_failures, "use at least 1")
        _require(0.0 < self.max_weight_share <= 1.0, "federation.max-weight-share", self.max_weight_share,
                 "use a share in (0, 1], e.g. 0.5")
        _require(self.update_bound >= 0.0 and math.isfinite(self.update_bound), "federation.update-bound",
                 self.update_bound, "use a norm >= 0 (0: off), or a multiple of the median such as 3 with "
                 "federation.update-bound-mode = 'median'")
        _require(self.update_bound_mode != "median" or self.update_bound == 0 or self.update_bound >= 1,
                 "federation.update-bound", self.update_bound, "in 'median' mode the bound is a multiple of the "
                 "round's median norm and must be >= 1 (below 1 it rejects most honest nodes), e.g. 3")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (``privacy/``): which mechanism, its budget and its parameters.

    sample: DP-SGD on each client (Opacus), the budget is per client over its local examples.
    central: client-level DP on the server (DP-FedAvg, McMahan et al. 2018), the budget is the run's.
    local: each client clips and noises its own adapter delta before upload (trusts no server).
    """

    mode: PrivacyMode = "off"
    target_epsilon: float = 8.0  # the budget: per client (sample, local) or for the run (central)
    delta: float = 1e-5  # must stay below 1/n: n = a client's examples (sample) or the number of clients
    # z per noised mean; 0: calibrated so that federation.rounds rounds spend target-epsilon. sketch's two means per
    # round (one sample) are one release at z / sqrt(2), which is what its ledger records.
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0  # C, required: per-example gradient bound (sample) or adapter-delta bound (central, local)
    adaptive_clipping: bool = False  # central: C tracks the target-unclipped-quantile (Andrew et al. 2021)
    target_unclipped_quantile: float = 0.5  # gamma: share of clients whose delta should fit under C
    clip_learning_rate: float = 0.2  # eta_C: C <- C * exp(-eta_C * (unclipped fraction - gamma))
    clipped_count_stddev: float = 0.0  # sigma_b of the noisy unclipped count; 0: max(clients / 20, z)
    secure_mode: bool = False  # sample: DP-SGD's noise and batch sampling from the OS CSPRNG (Opacus secure_mode's aim)

    def validate(self) -> None:
        _require(self.target_epsilon > 0 and self.target_epsilon != float("inf"), "privacy.target-epsilon",
                 self.target_epsilon, "the privacy budget epsilon must be a finite number > 0, e.g. 8 (no DP: "
                 "privacy.mode = 'off')")
        _require(0 < self.delta < 1, "privacy.delta", self.delta,
                 "delta must be in (0, 1) and below 1/n (n: examples per client for sample, clients for central), "
                 "e.g. 1e-5")
        _require(self.noise_multiplier >= 0, "privacy.noise-multiplier", self.noise_multiplier,
                 "use a value >= 0 (0: calibrate it from pollinate.privacy.target-epsilon)")
        _require(self.clip_norm >= 0, "privacy.clip-norm", self.clip_norm, "use a positive norm bound, e.g. 1.0")
        _require(self.mode == "off" or self.clip_norm > 0, "privacy.clip-norm", self.clip_norm,
                 f"privacy.mode = {self.mode!r} needs a clip norm C (missing): the bound on each "
                 + ("per-example gradient, e.g. --clip-norm 1.0" if self.mode == "sample" else
                    "client's adapter delta, e.g. --clip-norm 0.5") + " (or --set privacy.clip-norm=...)")
        _require(not self.adaptive_clipping or self.mode == "central", "privacy.adaptive-clipping",
                 self.adaptive_clipping, "adaptive clipping is for privacy.mode = 'central' only; set it false")
        _require(0 < self.target_unclipped_quantile < 1, "privacy.target-unclipped-quantile",
                 self.target_unclipped_quantile, "use a value in (0, 1), e.g. 0.5")
        _require(self.clip_learning_rate > 0, "privacy.clip-learning-rate", self.clip_learning_rate,
                 "use a positive rate, e.g. 0.2")
        _require(not self.secure_mode or self.mode == "sample", "privacy.secure-mode", self.secure_mode,
                 "secure mode is for privacy.mode = 'sample' (central DP always draws from the OS CSPRNG); set it "
                 "false")
        _require(self.clipped_count_stddev >= 0, "privacy.clipped-count-stddev", self.clipped_count_stddev,
                 "use a value >= 0 (0: max(clients / 20, z))")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (SecAgg+): the server learns only the sum of the nodes' uploads (linear strategies)."""

    enabled: bool = False
    clip_range: float = 1.0  # c: each example-weighted upload value is clipped to [-c, c] before quantisation
    bits: int = 24  # quantisation levels 2^bits over [-c, c]; error per value <= n * c / 2^bits
    modulus_bits: int = 32  # the ring Z_{2^b} the masks live in: 32 or 64 (payload 4 or 8 bytes per value)
    degree: int = 0  # neighbours per node (0: 2 ceil(log2 n), Bell et al. 2020)
    threshold: int = 0  # shares needed to unmask (0: the smallest secure value, floor(k/2) + 1)

    def validate(self) -> None:
        _require(self.clip_range > 0, "secagg.clip-range", self.clip_range,
                 "use a positive range that covers the adapter values, e.g. 1.0")
        _require(self.modulus_bits in (32, 64), "secagg.modulus-bits", self.modulus_bits, "use 32 or 64")
        _require(1 <= self.bits < self.modulus_bits, "secagg.bits", self.bits,
                 f"use 1..{self.modulus_bits - 1}: n nodes x 2^bits must fit in 2^modulus-bits")
        _require(self.degree >= 0, "secagg.degree", self.degree, "use 0 (automatic) or a positive degree")
        _require(self.threshold >= 0, "secagg.threshold", self.threshold,
                 "use 0 (automatic) or a count of shares above half the degree")


@dataclass(frozen=True)
class StoreConfig:
    db: str = "sqlite:///pollinate.db"  # any SQLAlchemy URL
    output_dir: str = "runs"  # the final adapter is exported to <output-dir>/run-<id>/adapter
    resume_run: int = 0  # continue this stored run from its last completed round (`pollinate server --resume`); 0: new
    lease_ttl: float = 60.0  # s: a dead coordinator's run can be resumed this long after its last lease heartbeat

    def validate(self) -> None:
        _require(self.resume_run >= 0, "store.resume-run", self.resume_run, "use a run id from `pollinate runs`, "
                 "or 0 for a new run")
        _require(1.0 <= self.lease_ttl <= 86400.0, "store.lease-ttl", self.lease_ttl,
                 "use a lease of 1 to 86400 seconds, e.g. 60 (the heartbeat renews it every quarter of that)")


def _default_strategy_options() -> Any:
    return options_class(FederationConfig.strategy)()


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    # The chosen strategy's ``Options`` instance (``strategy.<federation.strategy>.<option>`` keys).
    strategy: Any = field(default_factory=_default_strategy_options)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def validate(self) -> RunConfig:
        for name, _ in _sections():
            section = getattr(self, name)
            _check_literals(name, section)
            _check_finite(name, section)
            validate = getattr(section, "validate", None)
            if validate is not None:
                validate()
        chosen = self.federation.strategy
        if not isinstance(self.strategy, options_class(chosen)):
            raise ConfigError(f"the strategy options are {type(self.strategy).__qualname__}, but federation.strategy "
                              f"= {chosen!r} takes {options_class(chosen).__qualname__}; build the config with "
                              f"RunConfig.from_flat or .replace so that they match")
        return self

    @classmethod
    def from_flat(cls, flat: Mapping[str, Scalar]) -> RunConfig:
        """Parse Flower's flat run config (``{"adapter.r": 8, ...}``); missing keys take defaults."""
        known = _flat_fields()
        strategy_keys = {k: v for k, v in flat.items() if k.startswith("strategy.")}
        unknown = sorted(set(flat) - set(known) - set(strategy_keys))
        if unknown:
            raise ConfigError(f"unknown run config key(s) {unknown}; known keys: {sorted(known)} and "
                              f"strategy.<federation.strategy>.<option> (the chosen strategy's options)")
        values: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            if key in strategy_keys:
                continue
            section, name, typ = known[key]
            coerced = _coerce(key, value, typ)
            (values.setdefault(section, {}) if section else top)[name] = coerced
        for name, section_type in _sections():
            top[name] = section_type(**values.get(name, {}))
        top["model"] = _labelled(top["model"], top["data"])
        top["strategy"] = _parse_strategy_options(top["federation"].strategy, strategy_keys)
        return cls(**top).validate()

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Scalar] | None = None) -> RunConfig:
        return cls.from_flat({**flatten(load_toml(path)), **(overrides or {})})

    def to_flat(self) -> dict[str, Scalar]:
        """The flat form Flower carries: every section's keys and the chosen strategy's options."""
        return _flat(self, options_flat(self.federation.strategy, self.strategy))

    def replace(self, **flat_overrides: Scalar) -> RunConfig:
        """A copy with some flat keys changed, e.g. ``cfg.replace(**{"federation.rounds": 5})``."""
        return RunConfig.from_flat({**self.to_flat(), **flat_overrides})


def option(default: Scalar, help: str, valid: Callable[[Any], bool] | None = None, how: str = "") -> Any:
    """A strategy option field with its help text and, optionally, its range (``valid``, and ``how`` to fix).

    Used as ``proximal_mu: float = option(0.01, "weight mu of the proximal term", lambda v: v >= 0, "use >= 0")``
    in a strategy's ``Options`` dataclass (as PEFT's LoraConfig carries ``metadata={"help": ...}``).
    """
    return field(default=default, metadata={"help": help, "valid": valid, "how": how})


def options_class(strategy: str) -> type:
    """The ``Options`` dataclass of a registered strategy (ConfigError naming the strategies if unknown)."""
    from pollinate.strategies import builtin, get  # lazily: strategies import this module

    # Built-ins first: they take precedence in the registry, and finding them needs no entry-point scan.
    return (builtin().get(strategy) or get(strategy)).Options


def option_fields(strategy: str, options: type) -> dict[str, dataclasses.Field]:
    """``"strategy.fedprox.proximal-mu" -> its dataclass field``, for one strategy's ``Options``."""
    return {f"strategy.{strategy}.{f.name.replace('_', '-')}": f for f in fields(options)}


def options_flat(strategy: str, options: Any) -> dict[str, Scalar]:
    """A strategy's ``Options`` instance as flat keys."""
    return {key: _flat_value(getattr(options, f.name)) for key, f in option_fields(strategy, type(options)).items()}


def schema_defaults() -> dict[str, Scalar]:
    """Every settable key with its default: the sections and every built-in strategy's options.

    This is what ``[tool.flwr.app.config]`` must list: Flower passes on only the keys listed there.
    """
    from pollinate.strategies import builtin

    return _flat(RunConfig(), {key: value for name, cls in sorted(builtin().items())
                               for key, value in options_flat(name, cls.Options()).items()})


def _flat(cfg: RunConfig, strategy_flat: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """``cfg``'s flat keys in the schema's order, with ``strategy_flat`` where the strategy section sits."""
    flat: dict[str, Scalar] = {}
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        if f.name == "strategy":
            flat.update(strategy_flat)
        elif dataclasses.is_dataclass(value):
            flat.update({f"{f.name}.{g.name.replace('_', '-')}": _flat_value(getattr(value, g.name))
                         for g in fields(value)})
        else:
            flat[f.name] = _flat_value(value)
    return flat


def _parse_strategy_options(chosen: str, flat: Mapping[str, Scalar]) -> Any:
    """The chosen strategy's ``Options`` from its ``strategy.<chosen>.<option>`` keys, checked.

    Flower delivers every key of ``[tool.flwr.app.config]``, which lists every strategy's options at their
    defaults, so another strategy's option at its default value is indistinguishable from an unset one and is
    accepted; a value that differs is refused, since it would silently do nothing.
    """
    cls = options_class(chosen)
    valid = option_fields(chosen, cls)
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key in valid:
            values[valid[key].name] = _coerce(key, value, _hints(cls)[valid[key].name])
            continue
        if key in _RENAMED_STRATEGY_KEYS:
            name, owners = _RENAMED_STRATEGY_KEYS[key]
            new = [f"strategy.{s}.{name}" for s in ((chosen,) if chosen in owners else owners)]
            raise ConfigError(f"{key} is an old key: each strategy has its own options now; use "
                              f"{' or '.join(new)} (e.g. [strategy.{new[0].split('.')[1]}] {name} = {value!r} "
                              f"in a scenario, or --set {new[0]}={value})")
        owner = key.split(".")[1] if key.count(".") == 2 else ""
        if owner and owner != chosen:
            other = _other_options(owner)
            if other is not None and key in option_fields(owner, other):
                f = option_fields(owner, other)[key]
                if _coerce(key, value, _hints(other)[f.name]) == f.default:
                    continue
                raise ConfigError(f"{key} = {value!r} is an option of strategy {owner!r}, but federation.strategy = "
                                  f"{chosen!r}: choose {owner} or remove the key ({_valid_options(chosen, valid)})")
        raise ConfigError(f"unknown strategy option {key!r} for federation.strategy = {chosen!r}: "
                          f"{_valid_options(chosen, valid)}")
    options = cls(**values)
    for key, f in valid.items():
        check = f.metadata.get("valid")
        value = getattr(options, f.name)
        _check_literal(key, value, _hints(cls)[f.name], "")
        _require_finite(key, value)
        if check is not None:
            _require(check(value), key, value, f.metadata.get("how") or f"see {chosen}'s Options: {f.metadata.get('help', '')}")
    return options


def _other_options(strategy: str) -> type | None:
    from pollinate.strategies import builtin, registry

    found = builtin().get(strategy) or registry().get(strategy)
    return found.Options if found is not None else None


def _valid_options(strategy: str, valid: Mapping[str, dataclasses.Field]) -> str:
    if not valid:
        return f"{strategy} has no options"
    return f"{strategy}'s options are " + ", ".join(
        f"{key} ({f.metadata.get('help', '')})" if f.metadata.get("help") else key for key, f in valid.items())


def valid_device(device: str) -> bool:
    """A torch device pollinate can train on: auto (CUDA when present), cpu, cuda or cuda:N."""
    return device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", device) is not None


def parse_assignments(items: list[str], example: str = "train.lr=5e-4") -> dict[str, Scalar]:
    """``--set KEY=VALUE`` arguments as flat run-config keys (values coerced later by ``from_flat``)."""
    flat: dict[str, Scalar] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE, e.g. --set {example}")
        flat[key.strip()] = value.strip()
    return flat


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"scenario file {path} does not exist; pass a path to a TOML scenario "
                          f"(see simulations/scenarios/)")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"scenario file {path} is not valid TOML: {e}") from e


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Nested TOML tables to Flower's dotted keys, as Flower flattens [tool.flwr.app.config]."""
    flat: dict[str, Scalar] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted))
        elif isinstance(value, list):
            flat[dotted] = ",".join(str(v) for v in value)  # lists travel as comma-separated strings
        else:
            flat[dotted] = value
    return flat


def _labelled(model: ModelConfig, data: DataConfig) -> ModelConfig:
    """``model.num-labels`` inferred from ``data.labels`` when unset; the two must agree when both are set."""
    if not data.labels:
        return model
    if model.num_labels == 0:
        return dataclasses.replace(model, num_labels=len(data.labels))
    _require(model.num_labels == len(data.labels), "model.num-labels", model.num_labels,
             f"data.labels names {len(data.labels)} classes; set model.num-labels = {len(data.labels)} or leave it "
             f"unset (0) to infer it")
    return model


def _require(ok: bool, key: str, value: Any, how: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: {how}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's resolved field types (resolving them is slow, and every message parses a config)."""
    return get_type_hints(cls)


def _sections() -> list[tuple[str, type]]:
    """(name, dataclass) of every section of RunConfig, in order."""
    hints = _hints(RunConfig)
    return [(f.name, hints[f.name]) for f in fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])]


@cache
def _flat_fields() -> dict[str, tuple[str, str, type]]:
    """``"adapter.target-modules" -> ("adapter", "target_modules", tuple[str, ...])`` for every section field."""
    out: dict[str, tuple[str, str, type]] = {"seed": ("", "seed", int)}
    for name, section_type in _sections():
        section_hints = _hints(section_type)
        for f in fields(section_type):
            out[f"{name}.{f.name.replace('_', '-')}"] = (name, f.name, section_hints[f.name])
    return out


def _flat_value(value: Any) -> Scalar:
    return ",".join(value) if isinstance(value, tuple) else value  # lists travel as comma-separated strings


def _check_literals(section: str, values: Any) -> None:
    hints = _hints(type(values))
    for f in fields(values):
        _check_literal(f"{section}.{f.name.replace('_', '-')}", getattr(values, f.name), hints[f.name],
                       f.metadata.get("hint", ""))


def _check_finite(section: str, values: Any) -> None:
    """The one check that no float of a section is NaN or infinite (``--set train.lr=inf`` parses as a float)."""
    for f in fields(values):
        _require_finite(f"{section}.{f.name.replace('_', '-')}", getattr(values, f.name))


def _require_finite(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        _require(False, key, value, "use a finite number")


def _check_literal(key: str, value: Any, typ: Any, hint: str) -> None:
    """The one check of every enumeration (a ``Literal`` type): the value is one of its allowed values."""
    if get_origin(typ) is Literal and value not in get_args(typ):
        _require(False, key, value, f"use one of {', '.join(map(str, get_args(typ)))}" + (f" ({hint})" if hint else ""))


def _coerce(key: str, value: Scalar, typ: Any) -> Any:
    if get_origin(typ) is Literal:
        typ = type(get_args(typ)[0])  # the allowed values are checked by _check_literal
    if get_origin(typ) is tuple:  # tuple[str, ...]: a comma-separated string or a list
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a comma-separated string or a list, got {type(value).__name__} "
                              f"{value!r}")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if typ in (int, float) and isinstance(value, str):
        try:
            return typ(value)
        except ValueError:
            pass
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        how = {bool: "; use true or false", int: "; use a whole number", float: "; use a number"}.get(typ, "")
        raise ConfigError(f"{key} must be {typ.__name__}, got {type(value).__name__} {value!r}{how}")
    return value
