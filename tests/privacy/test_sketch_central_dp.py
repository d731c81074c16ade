"""sketch under client-level central DP: deltas of the nodes' own work, two clipped and noised means, one release.

The nodes here are pure functions of what they are sent (their "training" adds a random update), and the exchange
is in memory, as in tests/strategies/test_strategy_math.py; the means go through the server's real ``CentralPrivacy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pollinate.privacy.accountant import Release, calibrate_noise_multiplier, epsilon
from pollinate.privacy.central import global_norm
from pollinate.proto.instructions import Instructions
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.server.privacy_rounds import CentralPrivacy, check_privacy_config
from pollinate.server.store import RoundStore
from pollinate.strategies import ClientUpdate, MeanUpdate, Request, StrategyContext, build
from pollinate.strategies.base import lora_rank, mean_of
from pollinate.strategies.heterogeneous import at_rank
from pollinate.strategies.merged import DELTA_A, DELTA_B
from pollinate.strategies.sketch import SKETCH_Q, SKETCH_Y, SKETCH_Z, Sketch
from tests.support.adapters import B, HEAD, P, adapter, close, dense
from tests.support.inprocess import run_in_process

D_OUT, D_IN, RANK = 40, 30, 4
RANKS = {1: 1, 2: 2, 3: 3, 4: 4}  # sum 10: sum + R = 14 <= the default DP sketch size 2 R + 8 = 16


class NoNoise:
    """A ``privacy.central.Gaussian`` that draws zeros: the mechanism's arithmetic without its noise."""

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: object = None) -> np.ndarray:
        return np.zeros(size)


class Nodes:
    """The sampled nodes' halves of sketch: each trains once per round (a random step) and answers exchange 2."""

    def __init__(self, sketch: Sketch, rng: np.random.Generator, step: float = 0.5) -> None:
        self.sketch, self.rng, self.step = sketch, rng, step
        self.state: dict[int, dict] = {n: {} for n in RANKS}
        self.trained: dict[int, dict[str, np.ndarray]] = {}
        self.sent: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, requests: Mapping[int, Request]) -> list[ClientUpdate]:
        out = []
        for node, request in requests.items():
            ins = request.instructions
            if self.sketch.trains(ins):
                self.sent[node] = request.tensors
                self.trained[node] = {k: v + self.step * self.rng.standard_normal(v.shape).astype(np.float32)
                                      for k, v in request.tensors.items()  # the base deltas go into the base
                                      if not k.endswith((DELTA_A, DELTA_B))}
                tensors, _ = self.sketch.transform_upload(self.trained[node], request.tensors, ins, self.state[node])
            else:
                tensors = self.sketch.answer(request.tensors, ins, self.state[node])
            assert set(tensors) <= self.sketch.upload_names(request.tensors, ins)
            out.append(ClientUpdate(node, tensors, 10, ins.rank))  # equal counts: the plain mean is DP's too
        return out


class PrivateExchange:
    """``RoundExchange.mean`` without secure aggregation: the server's ``CentralPrivacy.mean`` of the replies."""

    def __init__(self, answer: Callable[[Mapping[int, Request]], list[ClientUpdate]], central: CentralPrivacy) -> None:
        self.answer, self.central = answer, central
        self.means: list[MeanUpdate] = []

    def __call__(self, requests: Mapping[int, Request]) -> list[ClientUpdate]:
        return self.answer(requests)

    def mean(self, requests: Mapping[int, Request]) -> MeanUpdate:
        self.means.append(self.central.mean(requests, self.answer(requests)))
        return self.means[-1]


class PlainExchange(PrivateExchange):
    def mean(self, requests: Mapping[int, Request]) -> MeanUpdate:
        return mean_of(self.answer(requests))


def _central(z: float, clip: float, rng: object, rounds: int = 3, sample_rate: float = 1.0,
             target: float = 1e9) -> CentralPrivacy:
    cfg = RunConfig().replace(**{"privacy.mode": "central", "privacy.noise-multiplier": z, "privacy.clip-norm": clip,
                                 "privacy.target-epsilon": target, "federation.strategy": "sketch",
                                 "federation.rounds": rounds})
    return CentralPrivacy(cfg.privacy, rounds, rng=rng, sample_rate=sample_rate,  # type: ignore[arg-type]
                          means_per_round=Sketch.private_means)


def _private_round(state: dict, central: CentralPrivacy, seed: int, step: float = 0.5,
                   connected: int = len(RANKS)) -> tuple[dict, Nodes, PrivateExchange]:
    sketch = Sketch(StrategyContext(rank=RANK, alpha=4.0, central_dp=True))
    nodes = Nodes(sketch, np.random.default_rng(seed), step)
    exchange = PrivateExchange(nodes, central)
    central.start_round(1, connected=connected)
    return sketch.run_round(state, RANKS, exchange, round_number=1), nodes, exchange


def _product(sketch: Sketch, state: dict) -> np.ndarray:
    exported = sketch.export(state)
    return dense(exported, sketch.ctx.scaling(lora_rank(exported)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_noise_or_clipping_central_dp_sketch_equals_the_plain_sketch(seed: int) -> None:
    # A zero B (PEFT's initial adapter): every node is sent the global product exactly, so the mean of the deltas
    # added to it is the mean of the trained products, which the plain sketch recovers.
    state = adapter(np.random.default_rng(seed), RANK, D_OUT, D_IN)
    state[B] = np.zeros_like(state[B])
    private, nodes, _ = _private_round(state, _central(1.0, 1e9, NoNoise()), seed)
    plain_sketch = Sketch(StrategyContext(rank=RANK, alpha=4.0))
    plain = plain_sketch.run_round(state, RANKS, PlainExchange(Nodes(plain_sketch, np.random.default_rng(seed)),
                                                               None), round_number=1)  # type: ignore[arg-type]
    assert close(_product(plain_sketch, private), _product(plain_sketch, plain), tol=1e-4)
    assert np.allclose(plain_sketch.export(private)[HEAD], plain_sketch.export(plain)[HEAD], atol=1e-5)
    mean_trained = sum(dense(nodes.trained[n], plain_sketch.ctx.scaling(r)) for n, r in RANKS.items()) / len(RANKS)
    assert close(_product(plain_sketch, private), mean_trained, tol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_noise_central_dp_sketch_is_dp_fedavg_global_plus_mean_delta_at_any_ranks(seed: int) -> None:
    # A random global adapter: nodes of rank < R are sent its truncation, and each uploads the change of its own
    # product. The new global is the old one plus the mean change, the part a low-rank node was not sent kept.
    state = adapter(np.random.default_rng(seed), RANK, D_OUT, D_IN)
    new, nodes, exchange = _private_round(state, _central(1.0, 1e9, NoNoise()), seed)
    ctx = StrategyContext(rank=RANK, alpha=4.0)
    changes = [dense(nodes.trained[n], ctx.scaling(r)) - dense(at_rank(state, r, ctx), ctx.scaling(r))
               for n, r in RANKS.items()]
    sketch = Sketch(StrategyContext(rank=RANK, alpha=4.0, central_dp=True))
    assert close(_product(sketch, new), dense(state, ctx.scaling(RANK)) + sum(changes) / len(RANKS), tol=1e-4)
    head = state[HEAD] + sum(nodes.trained[n][HEAD] - state[HEAD] for n in RANKS) / len(RANKS)
    assert np.allclose(sketch.export(new)[HEAD], head, atol=1e-5)
    assert exchange.means[0].tensors[P + SKETCH_Y].shape == (D_OUT, 2 * RANK + 8)  # the fixed DP size


def test_each_upload_is_clipped_to_c_as_a_delta_of_the_nodes_own_work() -> None:
    # A clip far below every node's change: each node's (Y_k, head change) and its Z_k are scaled to norm C, so
    # the mean over W = m nodes has norm at most C, and the same direction as the mean of the unclipped uploads
    # scaled each to C. Without the clip the same means are orders of magnitude larger.
    state = adapter(np.random.default_rng(3), RANK, D_OUT, D_IN)
    _, _, clipped = _private_round(state, _central(1.0, 1e-3, NoNoise()), 3)
    _, _, free = _private_round(state, _central(1.0, 1e9, NoNoise()), 3)
    for exchange in (clipped, free):
        y_and_head, z = exchange.means
        exchange.norms = (np.linalg.norm(np.concatenate([y_and_head.tensors[P + SKETCH_Y].ravel(),
                                                         (y_and_head.tensors[HEAD] - state[HEAD]).ravel()])),
                          np.linalg.norm(z.tensors[P + SKETCH_Z]))
    assert all(0 < n <= 1e-3 * (1 + 1e-5) for n in clipped.norms)
    assert all(n > 1.0 for n in free.norms)


def test_under_secure_aggregation_each_node_clips_its_own_sketch_and_projection_to_c() -> None:
    # The server sees only the masked sum, so the node clips: (Y_k, head change) and Z_k, each to norm C, the same
    # uploads the server would clip (same direction), the head sent back as received + clipped change.
    c = 1e-3
    state = adapter(np.random.default_rng(8), RANK, D_OUT, D_IN)
    sketch = Sketch(StrategyContext(rank=RANK, alpha=4.0, central_dp=True))
    plain, clipped = ({}, {}), ({}, {})
    request = Request(at_rank(state, 2, sketch.ctx), Instructions(round=1, rank=2, upload="sketch-y", sketch_seed=5,
                                                                 sketch_size=16, sketch_delta=True))
    trained = {k: v + 0.5 * np.random.default_rng(9).standard_normal(v.shape).astype(np.float32)
               for k, v in request.tensors.items()}
    for clip, (uploads, node_state) in ((0.0, plain), (c, clipped)):
        ins = replace(request.instructions, clip_norm=clip)
        uploads["y"], _ = sketch.transform_upload(trained, request.tensors, ins, node_state)
        q = {P + SKETCH_Q: np.linalg.qr(np.random.default_rng(10).standard_normal((D_OUT, 16)))[0]}
        uploads["z"] = sketch.answer(q, replace(ins, upload="sketch-z"), node_state)
    y_change = {k: v - state[k] if k == HEAD else v for k, v in plain[0]["y"].items()}
    assert global_norm(y_change) > 100 * c and global_norm(plain[0]["z"]) > 100 * c
    scale = c / global_norm(y_change)
    assert np.allclose(clipped[0]["y"][P + SKETCH_Y], scale * y_change[P + SKETCH_Y], rtol=1e-4, atol=1e-9)
    assert np.allclose(clipped[0]["y"][HEAD] - state[HEAD], scale * y_change[HEAD], rtol=1e-3, atol=1e-7)
    assert global_norm(clipped[0]["z"]) == pytest.approx(c, rel=1e-5)


def test_the_noise_on_both_exchanges_and_on_the_product_has_std_z_c_over_w() -> None:
    # Nodes that do not move: each exchange's mean is pure noise, std z C / W per entry (W = q N = 4).
    z, c = 1.7, 0.3
    state = adapter(np.random.default_rng(4), RANK, D_OUT, D_IN)
    central = _central(z, c, np.random.default_rng(5))
    new, _, exchange = _private_round(state, central, 4, step=0.0)
    sigma = z * c / len(RANKS)
    y_and_head, projection = exchange.means
    for noise in (y_and_head.tensors[P + SKETCH_Y], y_and_head.tensors[HEAD] - state[HEAD],
                  projection.tensors[P + SKETCH_Z]):
        assert abs(noise.std() - sigma) < 4 * sigma / math.sqrt(2 * noise.size)  # 4 standard errors
        assert abs(noise.mean()) < 4 * sigma / math.sqrt(noise.size)
    # The product moves by Q Z_noise, Q orthonormal: its squared norm is that of Z's noise, size x d_in draws.
    sketch = Sketch(StrategyContext(rank=RANK, alpha=4.0, central_dp=True))
    moved = _product(sketch, new) - dense(state, sketch.ctx.scaling(RANK))
    n = projection.tensors[P + SKETCH_Z].size
    assert abs(np.sum(moved ** 2) / (n * sigma ** 2) - 1) < 4 * math.sqrt(2 / n)
    assert central.entry is not None
    assert central.entry.metrics["noise-std"] == pytest.approx(sigma)
    assert central.entry.metrics["exchange-2-noise-std"] == pytest.approx(sigma)


def test_a_round_of_two_exchanges_is_one_release_at_the_joint_multiplier_z_over_sqrt2() -> None:
    z, q, rounds = 2.0, 0.5, 3
    central = _central(z, 0.5, NoNoise(), rounds=rounds, sample_rate=q)
    state = adapter(np.random.default_rng(6), RANK, D_OUT, D_IN)
    spent = []
    for number in range(1, rounds + 1):
        state, _, _ = _private_round(state, central, number, connected=8)  # 4 of 8 connected nodes sampled
        entry = central.entry
        assert entry is not None and entry.steps == 1 and entry.sample_rate == q
        assert entry.noise_multiplier == pytest.approx(z / math.sqrt(2))  # the ledger's release: joint
        assert entry.metrics["private-means"] == 2 and entry.metrics["update-noise-multiplier"] == z
        assert entry.metrics["exchange-2-update-noise-multiplier"] == z
        assert len(central.history) == number  # one release per round, not per exchange
        spent.append(entry.epsilon)
    assert spent == pytest.approx([epsilon([Release(z / math.sqrt(2), q, 1)] * n, 1e-5) for n in (1, 2, 3)])
    assert central.spent() == pytest.approx(spent[-1])


def test_the_calibrated_noise_spends_the_target_epsilon_over_the_planned_rounds() -> None:
    target, q, rounds = 8.0, 0.5, 3
    central = _central(0.0, 0.5, np.random.default_rng(7), rounds=rounds, sample_rate=q, target=target)
    state = adapter(np.random.default_rng(7), RANK, D_OUT, D_IN)
    for number in range(1, rounds + 1):
        state, _, _ = _private_round(state, central, number, connected=8)
    # Each exchange noises with z = sqrt(2) z_1, z_1 the multiplier one release per round would need.
    assert central.noise_multiplier == pytest.approx(math.sqrt(2) * calibrate_noise_multiplier(target, 1e-5, q, rounds))
    assert target * 0.99 <= central.spent() <= target


def test_check_privacy_config_takes_sketch_under_central_dp_with_fixed_clipping() -> None:
    cfg = RunConfig().replace(**{"privacy.mode": "central", "privacy.clip-norm": 1.0, "federation.strategy": "sketch"})
    check_privacy_config(cfg, build(cfg))
    assert build(cfg).ctx.central_dp
    secure = cfg.replace(**{"secagg.enabled": True})
    check_privacy_config(secure, build(secure))
    with pytest.raises(ConfigError, match=r"releases 2 means per round; use fixed clipping"):
        adaptive = cfg.replace(**{"privacy.adaptive-clipping": True})
        check_privacy_config(adaptive, build(adaptive))


def test_sketch_runs_end_to_end_under_central_dp_with_one_ledger_entry_per_round(tmp_path: Path) -> None:
    # Nodes of ranks 2, 4 and 8 (global 8): the real ServerApp and ClientApp in this process, through Flower's serde.
    run_in_process("tiny-hetero.toml", tmp_path, **{"federation.strategy": "sketch", "privacy.mode": "central",
                                                    "privacy.noise-multiplier": 1.0, "privacy.clip-norm": 0.5,
                                                    "privacy.target-epsilon": 100, "federation.rounds": 2})
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    [run] = store.runs()
    assert run.status == "completed" and run.strategy == "sketch", run.error
    ledger = store.privacy_ledger(run.id)
    assert [(n, e.node_id, e.mechanism, e.steps) for n, e in ledger] == [(1, None, "central-gaussian", 1),
                                                                         (2, None, "central-gaussian", 1)]
    for _, entry in ledger:
        assert entry.noise_multiplier == pytest.approx(1.0 / math.sqrt(2))
        assert entry.metrics["noise-std"] == entry.metrics["exchange-2-noise-std"] == pytest.approx(1.0 * 0.5 / 3)
        assert entry.metrics["clients"] == entry.metrics["exchange-2-clients"] == 3
    assert ledger[-1][1].epsilon == pytest.approx(epsilon([Release(1.0 / math.sqrt(2), 1.0, 1)] * 2, 1e-5))
    stored = store.adapter(run.id, 2).tensors()
    assert all(np.isfinite(v).all() for v in stored.values())
    updates = store.client_updates(run.id)
    assert all(u.num_examples == 0 for u in updates)  # nodes under DP send no count


def test_sketch_runs_end_to_end_under_central_dp_and_secure_aggregation(tmp_path: Path) -> None:
    # The nodes clip their own sketches and projections; the server sees only the masked sums and noises them.
    run_in_process("tiny.toml", tmp_path, **{"federation.strategy": "sketch", "privacy.mode": "central",
                                             "secagg.enabled": True, "privacy.noise-multiplier": 1.0,
                                             "privacy.clip-norm": 0.5, "privacy.target-epsilon": 100,
                                             "federation.rounds": 2})
    store = RoundStore(f"sqlite:///{tmp_path / 'store.db'}")
    [run] = store.runs()
    assert run.status == "completed" and run.strategy == "sketch", run.error
    ledger = store.privacy_ledger(run.id)
    assert [(n, e.node_id, e.steps) for n, e in ledger] == [(1, None, 1), (2, None, 1)]
    for _, entry in ledger:
        assert entry.noise_multiplier == pytest.approx(1.0 / math.sqrt(2))
        assert entry.metrics["secure-aggregation"] == entry.metrics["exchange-2-secure-aggregation"] == 1.0
        assert entry.metrics["noise-std"] == entry.metrics["exchange-2-noise-std"] == pytest.approx(1.0 * 0.5 / 4)
    assert all(np.isfinite(v).all() for v in store.adapter(run.id, 2).tensors().values())
