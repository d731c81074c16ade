"""Secure aggregation as wired into rounds: the server's SecureAggregation against the nodes' real handlers.

``LoopbackGrid`` delivers the server's Flower Messages straight to ``client.secure`` (training is
replaced by a fixed upload per node), so a test controls exactly who drops at which stage and which
replies are replayed or forged. The end-to-end runs on Flower's Simulation Engine are at the bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel

from pollinate.client import secure
from pollinate.models import adapter_state, build_peft_model, load_base_model
from pollinate.proto.adapter_record import ADAPTER, REPORT, to_record
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.proto.secagg_record import MASKED, SECAGG
from pollinate.server.rounds import RoundExchange, RoundFailed, RoundLedger
from pollinate.server.secure import SecureAggregation
from pollinate.server.weighting import round_weights
from pollinate.strategies import ClientUpdate, Request, build
from pollinate.strategies.base import mean_of, weighted_mean
from tests.support.paths import SCENARIOS
from tests.support.inprocess import InProcessGrid, serverapp_identity
from tests.support.commands import pollinate, simulated_run

SHAPES = {"m.lora_A.weight": (4, 30), "m.lora_B.weight": (20, 4), "head.weight": (2, 16)}
STAGES = ("train", "train.secagg_share", "train.secagg_mask", "train.secagg_unmask")
Tamper = Callable[[str, int, Message], list[Message]]


@pytest.fixture(autouse=True)
def identity():
    with serverapp_identity():
        yield


class LoopbackGrid(InProcessGrid):
    """A Grid whose nodes run pollinate's secure-aggregation handlers in this process.

    ``drop_at[node] = stage`` makes the node stop answering from that message type on.
    ``tamper(stage, node, reply)`` may replace a reply by any list of messages (replays, forgeries).
    """

    def __init__(self, uploads: dict[int, dict[str, np.ndarray]], examples: dict[int, int],
                 drop_at: dict[int, str] | None = None, tamper: Tamper | None = None) -> None:
        super().__init__({node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                          for node in uploads}, app=None)
        self.uploads, self.examples = uploads, examples
        self.drop_at, self.tamper = drop_at or {}, tamper
        self.adapters_received: list[int] = []  # nodes whose adapter tensors reached the server

    def deliver(self, msg: Message) -> list[Message]:
        node, stage = msg.metadata.dst_node_id, msg.metadata.message_type
        dropped = self.drop_at.get(node)
        if dropped is not None and STAGES.index(stage) >= STAGES.index(dropped):
            return []
        reply = self._answer(stage, msg, self.contexts[node])
        if ADAPTER in reply.content.array_records:
            self.adapters_received.append(node)
        return self.tamper(stage, node, reply) if self.tamper else [reply]

    def _answer(self, stage: str, msg: Message, context: Context) -> Message:
        if stage == "train":
            node = context.node_id
            report = MetricRecord({"num-examples": self.examples[node]})
            if secure.requested(msg):
                return secure.begin(msg, context, self.uploads[node], report)
            return Message(RecordDict({ADAPTER: to_record(self.uploads[node]), REPORT: report}), reply_to=msg)
        handler = {"train.secagg_share": secure.share, "train.secagg_mask": secure.mask,
                   "train.secagg_unmask": secure.unmask}[stage]
        return handler(msg, context)


def _setup(n: int = 5, seed: int = 0) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, int], dict[int, Request]]:
    rng = np.random.default_rng(seed)
    nodes = [int(x) for x in rng.choice(2**62, size=n, replace=False)]  # Flower ids are large, unordered
    uploads = {node: {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
               for node in nodes}
    examples = {node: int(rng.integers(10, 500)) for node in nodes}
    requests = {node: Request({k: np.zeros(s, np.float32) for k, s in SHAPES.items()}) for node in nodes}
    return uploads, examples, requests


def _cfg(**overrides: object) -> RunConfig:
    # The loopback nodes answer as the message is pushed: only a dropped node is waited for, until the timeout.
    return RunConfig().replace(**{"secagg.enabled": True, "federation.round-timeout": 1.0, **overrides})


def _secure_mean(grid: LoopbackGrid, cfg: RunConfig, requests: dict[int, Request], ledger: RoundLedger,
                 declared: dict[int, int] | None = None):
    secure = SecureAggregation(grid, cfg.secagg, cfg.federation, 1, ledger, seed=cfg.seed,  # type: ignore[arg-type]
                               declared=declared)
    exchange = RoundExchange(grid, cfg.federation, 1, ledger, secure=secure,  # type: ignore[arg-type]
                             declared=declared)
    return exchange.mean(requests)


def _expected(uploads, examples, nodes) -> dict[str, np.ndarray]:
    return mean_of([ClientUpdate(n, uploads[n], examples[n]) for n in nodes]).tensors


def _bound(cfg: RunConfig, included: int) -> float:
    """Stochastic rounding: |error of the weighted sum| < n * step per value; weights of the included sum to 1."""
    step = 2 * cfg.secagg.clip_range / (2**cfg.secagg.bits - 1)
    return included * step


@pytest.mark.parametrize("bits", [12, 24])
def test_secure_mean_equals_the_plaintext_mean_within_the_quantisation_bound(bits: int) -> None:
    uploads, examples, requests = _setup()
    cfg, ledger = _cfg(**{"secagg.bits": bits}), RoundLedger()
    grid = LoopbackGrid(uploads, examples)
    mean = _secure_mean(grid, cfg, requests, ledger)
    expected = _expected(uploads, examples, list(uploads))
    assert set(mean.node_ids) == set(uploads) and mean.num_examples == sum(examples.values())
    for k in SHAPES:
        err = np.abs(mean.tensors[k] - expected[k]).max()
        assert err < _bound(cfg, len(uploads)) + 1e-6, (k, err)
    assert grid.adapters_received == []  # no node's upload ever reached the server in the clear
    assert {c.status for c in ledger.clients} == {"accepted"} and len(ledger.clients) == 4 * len(uploads)
    # The mean really went through the ring: at 12 bits it is visibly quantised.
    if bits == 12:
        assert any(np.abs(mean.tensors[k] - expected[k]).max() > 1e-6 for k in SHAPES)


@pytest.mark.parametrize("stage", STAGES)
def test_a_node_dropping_at_any_stage_leaves_the_exact_mean_of_the_others(stage: str) -> None:
    uploads, examples, requests = _setup(seed=1)
    dropped = sorted(uploads)[2]
    cfg, ledger = _cfg(), RoundLedger()
    mean = _secure_mean(LoopbackGrid(uploads, examples, drop_at={dropped: stage}), cfg, requests, ledger)
    # Once its masked input is in (it drops at unmasking), the node's upload is part of the sum.
    included = [n for n in sorted(uploads) if n != dropped or stage == STAGES[3]]
    assert sorted(mean.node_ids) == included
    expected = _expected(uploads, examples, included)
    for k in SHAPES:
        assert np.abs(mean.tensors[k] - expected[k]).max() < _bound(cfg, len(included)) + 1e-6
    failed = [c for c in ledger.clients if c.status != "accepted"]
    assert [(c.node_id, c.phase, c.status) for c in failed] == [(dropped, stage, "failed")]
    assert "no reply" in (failed[0].reason or "")


def test_dropouts_beyond_the_threshold_fail_the_round_with_what_to_do() -> None:
    uploads, examples, requests = _setup(seed=2)
    nodes = sorted(uploads)
    # Degree 4 (complete graph on 5), threshold 3: three nodes silent at unmasking leave 2 shares.
    drop = {nodes[0]: STAGES[3], nodes[1]: STAGES[3], nodes[2]: STAGES[3]}
    with pytest.raises(RoundFailed, match="secure aggregation failed.*shares needed"):
        _secure_mean(LoopbackGrid(uploads, examples, drop_at=drop), _cfg(), requests, RoundLedger())


def test_replayed_and_forged_replies_are_rejected_and_recorded_and_the_round_survives() -> None:
    uploads, examples, requests = _setup(seed=3)
    nodes = sorted(uploads)
    replayer, forger = nodes[0], nodes[1]

    def tamper(stage: str, node: int, reply: Message) -> list[Message]:
        if stage == STAGES[1] and node == replayer:
            return [reply, reply]  # the same reply twice
        if stage == STAGES[0] and node == forger:
            reply.content.config_records[SECAGG]["sender"] = 0 if int(reply.content.config_records[SECAGG]["sender"]) \
                else 1  # claims another node's SecAgg id
        return [reply]

    cfg, ledger = _cfg(), RoundLedger()
    mean = _secure_mean(LoopbackGrid(uploads, examples, tamper=tamper), cfg, requests, ledger)
    rejected = [(c.node_id, c.phase) for c in ledger.clients if c.status == "rejected"]
    assert (forger, "train") in rejected and (replayer, STAGES[1]) in rejected
    assert any("replayed" in (c.reason or "") for c in ledger.clients if c.node_id == replayer)
    assert any("claims SecAgg id" in (c.reason or "") for c in ledger.clients if c.node_id == forger)
    included = [n for n in nodes if n != forger]  # the replayer's first reply counted; only its replay was refused
    assert sorted(mean.node_ids) == included
    expected = _expected(uploads, examples, included)
    assert all(np.abs(mean.tensors[k] - expected[k]).max() < _bound(cfg, 4) + 1e-6 for k in SHAPES)


def test_secure_weights_are_the_servers_capped_ones_and_a_count_above_its_declaration_is_rejected() -> None:
    uploads, examples, requests = _setup(seed=4)
    nodes = sorted(uploads)
    over, heavy = nodes[0], nodes[1]
    examples[heavy] = 10**9  # declared as much: its weight is capped at federation.max-weight-share
    declared = {**examples, over: examples[over] - 1}  # reports one more example than it declared
    cfg, ledger = _cfg(), RoundLedger()
    mean = _secure_mean(LoopbackGrid(uploads, examples), cfg, requests, ledger, declared)
    [rejected] = [c for c in ledger.clients if c.status != "accepted"]
    assert (rejected.node_id, rejected.phase) == (over, "train") and "declared" in (rejected.reason or "")
    included = [n for n in nodes if n != over]
    weights = round_weights({n: examples[n] for n in included}, cfg.federation, declared)
    assert weights[heavy] == cfg.federation.max_weight_share == 0.5
    expected = weighted_mean([uploads[n] for n in included], [weights[n] for n in included])
    assert sorted(mean.node_ids) == included
    assert all(np.abs(mean.tensors[k] - expected[k]).max() < _bound(cfg, len(included)) + 1e-6 for k in SHAPES)


def test_a_masked_input_outside_the_quantisation_range_fails_the_round_by_the_sum_check() -> None:
    uploads, examples, requests = _setup(seed=5)
    cheat = sorted(uploads)[0]

    def tamper(stage: str, node: int, reply: Message) -> list[Message]:
        if stage == STAGES[2] and node == cheat:  # adds 2^31 to every value of the ring vector (uint32)
            array = reply.content.array_records[MASKED]["masked"]
            values = np.frombuffer(array.data, "<u4") + np.uint32(2**31)
            reply.content.array_records[MASKED]["masked"] = Array(dtype="uint32", shape=array.shape,
                                                                  stype=array.stype, data=values.tobytes())
        return [reply]

    with pytest.raises(RoundFailed, match=r"unmasked sum lies outside 5 x the clip range"):
        _secure_mean(LoopbackGrid(uploads, examples, tamper=tamper), _cfg(), requests, RoundLedger())


FIELD_VALUES = st.one_of(st.integers(-2**63, 2**63 - 1), st.binary(max_size=40), st.floats(allow_nan=True),
                         st.text(max_size=5), st.lists(st.integers(0, 2**63 - 1), max_size=4),
                         st.lists(st.binary(max_size=20), max_size=4))


def _forge_stage(kind: str, key: str, value: object) -> Callable[[Message], None]:
    """One edit of a stage reply: empty it, drop or set a field of its SecAgg message, add a record, cut its vector."""
    def edit(reply: Message) -> None:
        content = reply.content
        message = content.config_records.get(SECAGG)
        if kind == "empty":
            for name in list(content.keys()):
                del content[name]
        elif kind == "drop" and message is not None and key in message:
            del message[key]
        elif kind == "set" and message is not None:
            message[key] = value  # type: ignore[assignment]
        elif kind == "extra":
            content["extra"] = ConfigRecord({"x": 1})
        elif kind == "examples" and REPORT in content.metric_records:
            number = value if isinstance(value, int | float) else 10**12  # a MetricRecord holds numbers only
            content.metric_records[REPORT]["num-examples"] = number
        elif kind == "cut" and MASKED in content.array_records:
            array = content.array_records[MASKED]["masked"]
            content.array_records[MASKED]["masked"] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype,
                                                             data=array.data[:-4])
    return edit


STAGE_EDITS = st.builds(_forge_stage, st.sampled_from(["empty", "drop", "set", "extra", "examples", "cut"]),
                        st.sampled_from(["round_id", "sender", "encryption_key", "masking_key", "receivers",
                                         "ciphertexts", "seed_owners", "shares", "undecryptable", "x"]),
                        FIELD_VALUES | st.sampled_from([0, 10**12, float("nan"), 2**31]))


@settings(max_examples=25, deadline=None)
@given(stage=st.sampled_from(STAGES), edits=st.lists(STAGE_EDITS, min_size=1, max_size=3),
       which=st.integers(0, 4))
def test_whatever_one_node_sends_at_any_stage_only_that_node_is_rejected(stage: str, edits, which: int) -> None:
    uploads, examples, requests = _setup(seed=6)
    hostile = sorted(uploads)[which]

    def tamper(at: str, node: int, reply: Message) -> list[Message]:
        if at == stage and node == hostile:
            for edit in edits:
                edit(reply)
        return [reply]

    cfg, ledger = _cfg(), RoundLedger()
    try:
        mean = _secure_mean(LoopbackGrid(uploads, examples, tamper=tamper), cfg, requests, ledger,
                            declared=dict(examples))
    except RoundFailed as failed:  # what a forged secret can do: an unmaskable round, failed with its reason
        assert "secure aggregation failed" in str(failed) or "outside" in str(failed)
        return
    assert set(mean.node_ids) >= set(uploads) - {hostile}  # the others' mean, the hostile one in it or not
    assert all(np.isfinite(v).all() for v in mean.tensors.values())
    for record in ledger.clients:
        assert record.status == "accepted" or (record.node_id == hostile and record.reason), record


def test_secure_aggregation_refuses_strategies_that_need_each_update(tiny_cfg) -> None:
    for name in ("flexlora", "flora", "fedex-lora", "hetlora"):
        with pytest.raises(ConfigError, match="learns only their sum; use a linear strategy"):
            build(tiny_cfg.replace(**{"secagg.enabled": True, "federation.strategy": name}))
    build(tiny_cfg.replace(**{"secagg.enabled": True, "federation.strategy": "hetlora",
                              "strategy.hetlora.norm-weighting": False}))  # example weights alone: linear
    with pytest.raises(ConfigError, match="secagg.bits"):
        tiny_cfg.replace(**{"secagg.bits": 32})


# ---- end to end on Flower's Simulation Engine -------------------------------------------------------


def test_simulation_with_secagg_survives_a_dropout_and_never_sees_an_adapter(tmp_path: Path) -> None:
    _, store, run = simulated_run("secagg-dropout.toml", tmp_path)
    assert run.status == "completed"
    rounds = store.rounds(run.id)
    # 5 nodes; one drops after sharing its keys, before masking: the mean is that of the other 4.
    assert [(r.participants, r.accepted) for r in rounds] == [(5, 4), (5, 4)]
    cfg = RunConfig.from_flat(run.config)
    model, _ = build_peft_model(cfg)
    values = sum(t.size for t in adapter_state(model).values())
    for number in (1, 2):
        this = store.client_updates(run.id, number)
        failed = sorted((u.phase, u.status) for u in this if u.status != "accepted")
        assert failed == [("train.secagg_mask", "failed")]
        # What each node sent in the training exchange: public keys and a report, never adapter tensors.
        assert all(u.bytes_up < 1024 for u in this if u.phase == "train")
        masked = [u.bytes_up for u in this if u.phase == "train.secagg_mask" and u.status == "accepted"]
        assert len(masked) == 4 and all(4 * values < up < 4 * values + 1024 for up in masked)  # uint32 + fields
    base = load_base_model(cfg.model, cfg.seed)
    PeftModel.from_pretrained(base.model, run.adapter_dir)  # the securely aggregated adapter loads


def test_simulate_refuses_secagg_with_a_non_linear_strategy_before_any_round(tmp_path: Path, capsys) -> None:
    code, said = pollinate(capsys, "simulate", str(SCENARIOS / "tiny.toml"), "--db",
                           f"sqlite:///{tmp_path / 'store.db'}", "--output", str(tmp_path / "out"),
                           "--secagg", "--strategy", "flexlora")
    assert code == 2 and "use a linear strategy" in said
    assert not (tmp_path / "out").exists()  # refused before any node data was written
