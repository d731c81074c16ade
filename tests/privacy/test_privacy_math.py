"""Privacy math on its own: the server's noise, clipping, adaptive clipping, the accountant, budgets, config errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from pollinate.client.private_training import BudgetRefused, PrivateRound, plan_round, privatise_upload
from pollinate.privacy.accountant import Release, calibrate_noise_multiplier, epsilon
from pollinate.privacy.budget import BudgetFile
from pollinate.privacy.central import clip_delta, global_norm, next_clip_norm, private_mean, update_noise_multiplier
from pollinate.proto.instructions import Instructions
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.server.privacy_rounds import CentralPrivacy, check_privacy_config, private_federation
from pollinate.strategies import ClientUpdate, Request, build

B, A = "m.lora_B.weight", "m.lora_A.weight"


def test_the_noise_on_the_mean_has_std_z_c_over_m_and_only_on_trained_tensors() -> None:
    rng = np.random.default_rng(0)
    m, z, c = 5, 1.3, 0.7
    deltas = [{A: np.zeros((8, 64), np.float32), B: np.full((64, 8), 0.01, np.float32)} for _ in range(m)]
    result = private_mean(deltas, c, z, noised=[B], rng=rng)
    noise = result.delta[B] - 0.01  # every delta is under C, so the noiseless mean is exactly 0.01
    expected = z * c / m
    # 512 draws: the sample std is within 4 standard errors (std / sqrt(2 n)) of the configured one.
    assert abs(noise.std() - expected) < 4 * expected / math.sqrt(2 * noise.size)
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    assert np.array_equal(result.delta[A], np.zeros((8, 64), np.float32))  # the frozen factor: no noise at all
    assert result.unclipped == m


def test_the_server_path_adds_the_configured_noise_to_what_it_sent(tiny_cfg) -> None:
    cfg = tiny_cfg.replace(**{"privacy.mode": "central", "privacy.noise-multiplier": 2.0, "privacy.clip-norm": 0.5,
                              "federation.strategy": "ffa-lora"})
    central = CentralPrivacy(cfg.privacy, cfg.federation.rounds, rng=np.random.default_rng(1))
    sent = {A: np.ones((4, 256), np.float32), B: np.zeros((256, 4), np.float32)}
    request = Request(sent, Instructions(train_factors="B"))
    big = {A: sent[A], B: np.full((256, 4), 1.0, np.float32)}  # ||delta|| = 32 >> C: clipped to 0.5
    updates = [ClientUpdate(node_id=n, tensors=big, num_examples=10 * n) for n in (1, 2, 3, 4)]
    central.start_round(1, connected=4)
    mean = central.mean({n: request for n in (1, 2, 3, 4)}, updates)
    assert np.array_equal(mean.tensors[A], sent[A])
    clipped_mean = 0.5 / 32  # each clipped delta element; equal weights 1/m despite different example counts
    noise = mean.tensors[B] - clipped_mean
    expected = 2.0 * 0.5 / 4
    assert abs(noise.std() - expected) < 4 * expected / math.sqrt(2 * noise.size)
    assert central.entry is not None and central.entry.epsilon == pytest.approx(epsilon([Release(2.0, 1.0, 1)], 1e-5))


def test_central_dp_puts_no_noise_on_a_frozen_classifier_head(tiny_cfg) -> None:
    cfg = tiny_cfg.replace(**{"privacy.mode": "central", "privacy.noise-multiplier": 2.0, "privacy.clip-norm": 0.5})
    head = "base_model.model.classifier.weight"
    sent = {A: np.ones((4, 256), np.float32), B: np.zeros((256, 4), np.float32), head: np.ones((2, 64), np.float32)}
    updates = [ClientUpdate(node_id=n, tensors={**sent, B: np.full((256, 4), 1.0, np.float32)}, num_examples=10)
               for n in (1, 2, 3, 4)]
    for freeze, noised in ((True, False), (False, True)):
        central = CentralPrivacy(cfg.privacy, cfg.federation.rounds, rng=np.random.default_rng(1), freeze_head=freeze)
        central.start_round(1, connected=4)
        mean = central.mean({n: Request(sent, Instructions()) for n in (1, 2, 3, 4)}, updates)
        assert np.array_equal(mean.tensors[head], sent[head]) is not noised
        assert not np.array_equal(mean.tensors[B], sent[B])


def test_central_dp_drops_the_median_relative_update_bound_and_keeps_an_absolute_one() -> None:
    central = RunConfig().replace(**{"privacy.mode": "central", "privacy.clip-norm": 1.0})
    assert central.federation.update_bound == 3.0 and central.federation.update_bound_mode == "median"
    assert private_federation(central).update_bound == 0.0
    absolute = central.replace(**{"federation.update-bound-mode": "absolute", "federation.update-bound": 2.0})
    assert private_federation(absolute) is absolute.federation
    plain = RunConfig()
    assert private_federation(plain) is plain.federation  # no DP: the default bound stays


def test_clipping_scales_a_delta_to_the_norm_and_leaves_a_small_one_alone() -> None:
    delta = {A: np.full((3, 4), 2.0, np.float32), B: np.full((4, 3), -2.0, np.float32)}
    clipped, norm = clip_delta(delta, 1.0)
    assert norm == pytest.approx(global_norm(delta)) and global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    same, _ = clip_delta(delta, 100.0)
    assert all(np.array_equal(same[k], delta[k]) for k in delta)


def test_adaptive_clipping_moves_c_toward_the_target_quantile() -> None:
    rng = np.random.default_rng(0)
    norms = rng.uniform(0.0, 2.0, size=1000)  # the median is 1
    c = 0.1
    for _ in range(200):
        unclipped = int(np.sum(rng.choice(norms, 100) <= c))
        c, _ = next_clip_norm(c, unclipped, 100, count_stddev=100 / 20, target_quantile=0.5,
                              learning_rate=0.2, rng=rng)
    assert 0.8 < c < 1.2


def test_adaptive_clipping_spends_the_same_total_as_z_alone() -> None:
    z, count_std = 1.0, 2.0
    update_z = update_noise_multiplier(z, count_std)
    assert (update_z ** -2 + (2 * count_std) ** -2) ** -0.5 == pytest.approx(z)  # Andrew et al. 2021, Thm. 1
    with pytest.raises(ValueError, match="clipped-count-stddev > z / 2"):
        update_noise_multiplier(1.0, 0.4)


@pytest.mark.parametrize("z, q, steps", [(1.1, 0.01, 1000), (0.8, 0.006, 120), (1.0, 1.0, 3), (3.0, 0.5, 50)])
def test_epsilon_matches_the_reference_accountant(z: float, q: float, steps: int) -> None:
    reference = RDPAccountant()  # Opacus' own RDP accountant, an independent implementation
    reference.history = [(z, q, steps)]
    # The two search different grids of Renyi orders, so their (upper-bound) epsilons differ slightly.
    assert epsilon([Release(z, q, steps)], 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=5e-3)
    # Composing per round is the same as composing once: the history may be split at any round.
    assert epsilon([Release(z, q, steps // 2), Release(z, q, steps - steps // 2)], 1e-5) == \
        pytest.approx(epsilon([Release(z, q, steps)], 1e-5), rel=1e-9)


def test_calibration_spends_the_budget_and_no_more() -> None:
    z = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 600)
    spent = epsilon([Release(z, 0.01, 600)], 1e-5)
    assert 2.99 < spent <= 3.0
    assert epsilon([], 1e-5) == 0.0 and epsilon([Release(0.0, 0.1, 1)], 1e-5) == math.inf


def _sample_cfg(**extra: object) -> RunConfig:
    flat = {"privacy.mode": "sample", "privacy.clip-norm": 1.0, "privacy.noise-multiplier": 0.5,
            "privacy.target-epsilon": 4.05, "train.local-steps": 4, "train.batch-size": 8, **extra}
    return RunConfig().replace(**flat)


def test_the_budget_stops_training_at_the_right_round_and_survives_new_processes(tmp_path: Path) -> None:
    cfg, path = _sample_cfg(), tmp_path / "node.privacy.json"
    trained = []
    for number in range(1, 6):
        budget = BudgetFile(path)  # a fresh ClientApp process reads the file again
        try:
            plan = plan_round(cfg, Instructions(round=number, privacy_run_key="run-a"), 2562, budget)
        except BudgetRefused as e:
            assert "would raise this node's epsilon from 3.991 to 4.103" in str(e)
            continue
        budget.record(plan.run_key, plan.spent)
        trained.append((number, round(plan.epsilon_after, 3)))
    assert trained == [(1, 3.805), (2, 3.991)]  # epsilon after round 3 would be 4.103 > 4.05
    other_run = plan_round(cfg, Instructions(round=1, privacy_run_key="run-b"), 2562, BudgetFile(path))
    assert round(other_run.epsilon_after, 3) == 3.805  # budgets are per run key


def test_local_dp_clips_and_noises_only_the_trained_factor() -> None:
    received = {A: np.ones((4, 32), np.float32), B: np.zeros((32, 4), np.float32)}
    trained = {A: received[A], B: np.full((32, 4), 5.0, np.float32)}
    plan = PrivateRound("run", _spent(z=1e-6, c=0.5), 1.0)
    upload = privatise_upload(received, trained, "B", plan)
    assert np.array_equal(upload[A], received[A])
    assert global_norm({B: upload[B] - received[B]}) == pytest.approx(0.5, rel=1e-3)  # clipped to C, ~no noise


def _spent(z: float, c: float):
    from pollinate.privacy.budget import SpentRound

    return SpentRound(round=1, mechanism="local-gaussian", noise_multiplier=z, sample_rate=1.0, steps=1, clip_norm=c)


@pytest.mark.parametrize("flat, says", [
    ({"privacy.mode": "sample"}, "privacy.mode = 'sample' needs a clip norm C (missing)"),
    ({"privacy.mode": "central"}, "needs a clip norm C (missing): the bound on each client's adapter delta"),
    ({"privacy.mode": "sample", "privacy.clip-norm": 1.0, "privacy.target-epsilon": 0.0},
     "privacy.target-epsilon = 0.0 is invalid: the privacy budget epsilon must be a finite number > 0"),
    ({"privacy.target-epsilon": -1.0}, "privacy.target-epsilon = -1.0 is invalid"),
    ({"privacy.delta": 1.0}, "privacy.delta = 1.0 is invalid: delta must be in (0, 1) and below 1/n"),
    ({"privacy.mode": "everything"}, "use one of off, sample, central, local"),
    ({"privacy.mode": "sample", "privacy.clip-norm": 1.0, "privacy.adaptive-clipping": True},
     "adaptive clipping is for privacy.mode = 'central' only"),
])
def test_dp_config_errors_say_how_to_fix(flat: dict, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig().replace(**flat)
    assert says in str(e.value)


def test_delta_must_be_below_one_over_n() -> None:
    with pytest.raises(BudgetRefused, match=r"privacy.delta = 0.01 is not below 1/n = 1/200"):
        plan_round(_sample_cfg(**{"privacy.delta": 0.01}), Instructions(round=1, privacy_run_key="k"), 200,
                   BudgetFile("/nonexistent/never-written.json"))
    cfg = RunConfig().replace(**{"privacy.mode": "central", "privacy.clip-norm": 1.0, "privacy.delta": 0.3})
    central = CentralPrivacy(cfg.privacy, cfg.federation.rounds)
    with pytest.raises(ConfigError, match=r"privacy.delta = 0.3 is not below 1/n = 1/4 for 4 clients"):
        central.start_round(1, connected=4)


@pytest.mark.parametrize("strategy", ["flexlora", "flora", "fedex-lora", "hetlora"])  # sketch: test_sketch_central_dp
def test_central_dp_refuses_strategies_whose_uploads_are_not_deltas_in_a_plain_mean(strategy: str) -> None:
    cfg = RunConfig().replace(**{"privacy.mode": "central", "privacy.clip-norm": 1.0,
                                 "federation.strategy": strategy})
    with pytest.raises(ConfigError, match=f"{strategy!r} does not aggregate a plain mean of deltas"):
        check_privacy_config(cfg, build(cfg))


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "ffa-lora", "rolora", "fedsa-lora"])
def test_central_dp_accepts_every_linear_homogeneous_strategy(strategy: str) -> None:
    cfg = RunConfig().replace(**{"privacy.mode": "central", "privacy.clip-norm": 1.0,
                                 "federation.strategy": strategy})
    check_privacy_config(cfg, build(cfg))
