"""The coordinator's side of differential privacy: the run key, client-level central DP, the ledger entries.

``CentralPrivacy`` plugs into ``RoundExchange.mean``: it clips each node's adapter delta (its reply
minus what it was sent), sums them, divides by the fixed expected count q N and adds Gaussian noise to the
trained tensors only (``privacy/central.py``). A strategy whose nodes compute their deltas themselves
(``Strategy.uploads_own_deltas``: sketch's Y_k and Z_k) uploads tensors it was not sent; those are clipped as they
are. A round may take several private means of the same sample (``Strategy.private_means``): one release,
accounted jointly (``CentralPrivacy.start_round``). The nodes were Poisson-sampled at rate q from the OS CSPRNG
(``sample_nodes``), and the noise comes from it too (``privacy/csprng.py``): what the accountant assumes.
Its state (accountant history, adaptive clip norm) is rebuilt
from the privacy ledger, so a resumed run continues where the stored rounds left off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC

import numpy as np

from pollinate.privacy.accountant import Release, calibrate_noise_multiplier, epsilon
from pollinate.privacy.central import (Gaussian, add_gaussian_noise, default_count_stddev, delta_of, next_clip_norm,
                                      private_mean, update_noise_multiplier)
from pollinate.privacy.csprng import SecureGaussian
from pollinate.privacy.ledger import MECHANISMS, REFUSAL_CODE, REPORT_KEYS, PrivacyEntry, entry_from_report, releases
from pollinate.proto.instructions import trained_names
from pollinate.proto.run_config import ConfigError, FederationConfig, PrivacyConfig, RunConfig
from pollinate.server.store import ClientRecord, RoundStore, RunSummary
from pollinate import strategies
from pollinate.strategies import ClientUpdate, MeanUpdate, Request, Strategy


class BudgetSpent(RuntimeError):
    """The privacy budget (the run's, or too many nodes' own) is spent: the run ends cleanly here."""


def privacy_run_key(run: RunSummary) -> str:
    """The key nodes file their budget under: stable across a resume (same store row), unique across stores."""
    started = run.started_at.replace(tzinfo=UTC) if run.started_at.tzinfo is None else run.started_at.astimezone(UTC)
    return f"pollinate-run-{run.id}-{started:%Y%m%dT%H%M%S%f}"


def check_privacy_config(cfg: RunConfig, strategy: Strategy) -> None:
    """Refuse, before round 1, a privacy mode the strategy cannot honour; the message says what to use."""
    if cfg.privacy.mode != "central":
        return
    if not takes_central_dp(type(strategy)):
        usable = sorted(n for n, c in strategies.registry().items() if takes_central_dp(c))
        raise ConfigError(f"privacy.mode = 'central' clips and noises each node's adapter delta inside the mean, but "
                          f"{strategy.name!r} does not aggregate a plain mean of deltas of what it sent (it is "
                          f"{'not linear' if not strategy.linear else 'rank-heterogeneous'}); use one of "
                          f"{', '.join(usable)}, or privacy.mode = 'sample' or 'local'")
    if cfg.secagg.enabled and cfg.privacy.adaptive_clipping:
        raise ConfigError("privacy.adaptive-clipping needs each node's clipped-or-not bit, which secure aggregation "
                          "hides; use fixed clipping (privacy.adaptive-clipping = false) with secagg.enabled")
    if strategy.private_means > 1 and cfg.privacy.adaptive_clipping:
        raise ConfigError(f"privacy.adaptive-clipping adapts one clip norm from one noisy count per round, but "
                          f"{strategy.name!r} releases {strategy.private_means} means per round; use fixed clipping "
                          f"(privacy.adaptive-clipping = false, privacy.clip-norm = C)")


def private_federation(cfg: RunConfig) -> FederationConfig:
    """The federation config a round runs under: under central DP without the median-relative update bound.

    ``federation.update-bound`` in median mode rejects a node by comparing its norm with the others': whether one
    node's update enters the mean then depends on the other nodes' data, a selection the accountant does not count
    (removing one node can move the median and flip others in or out). Under central DP the clip already bounds
    every node's influence to C, so the relative bound is dropped; an absolute bound depends on the node's own update
    alone (its rejection equals its absence) and stays."""
    federation = cfg.federation
    if cfg.privacy.mode == "central" and federation.update_bound > 0 and federation.update_bound_mode != "absolute":
        return replace(cfg.federation, update_bound=0.0)
    return cfg.federation


def takes_central_dp(strategy: type[Strategy]) -> bool:
    """Whether every mean the strategy asks for is of deltas a clip bounds: a linear strategy whose nodes are all sent
    the same tensors, or one whose nodes upload deltas of their own work (``Strategy.uploads_own_deltas``)."""
    return strategy.linear and (not strategy.heterogeneous_ranks or strategy.uploads_own_deltas)


class CentralPrivacy:
    """DP-FedAvg on the server (McMahan et al. 2018) with optional adaptive clipping (Andrew et al. 2021)."""

    def __init__(self, privacy: PrivacyConfig, rounds: int, ledger: Sequence[PrivacyEntry] = (),
                 rng: Gaussian | None = None, sample_rate: float = 1.0, freeze_head: bool = False,
                 means_per_round: int = 1) -> None:
        """``rounds``: the run's planned rounds (federation.rounds), over which a calibrated z spends the budget;
        ``sample_rate``: q, each connected node's chance to be sampled in a round (federation.fraction-train);
        ``freeze_head``: train.freeze-head, the nodes do not train the classifier head, so it gets no noise;
        ``means_per_round``: the strategy's private means of one round's sample (``Strategy.private_means``)."""
        if means_per_round < 1 or (means_per_round > 1 and privacy.adaptive_clipping):
            raise ValueError(f"central DP takes 1 private mean per round, or more with fixed clipping; got "
                             f"{means_per_round} with adaptive clipping {privacy.adaptive_clipping}")
        self.p, self.rounds, self.sample_rate, self.freeze_head = privacy, rounds, sample_rate, freeze_head
        self.means_per_round, self._means_left = means_per_round, 0
        self.expected_clients = 0.0  # q N of the planned round: the mean's fixed denominator
        self.history = releases(ledger, node_id=None)
        own = [e for e in ledger if e.node_id is None and e.status == "spent"]
        self.clip_norm = float(own[-1].metrics.get("next-clip-norm", own[-1].clip_norm)) if own else self.p.clip_norm
        self.rng: Gaussian = rng if rng is not None else SecureGaussian()  # unpredictable noise
        self.noise_multiplier = self.p.noise_multiplier
        self._pending: tuple[Release, float] | None = None
        self.entry: PrivacyEntry | None = None

    def spent(self) -> float:
        return epsilon(self.history, self.p.delta)

    def start_round(self, number: int, connected: int) -> None:
        """Plan this round's release over ``connected`` nodes, each Poisson-sampled at q; ``BudgetSpent`` when it
        would take epsilon over the target."""
        if self.p.delta >= 1 / connected:
            raise ConfigError(f"privacy.delta = {self.p.delta:g} is not below 1/n = 1/{connected} for {connected} "
                              f"clients: lower privacy.delta below {1 / connected:.2g}")
        rate = self.sample_rate  # the accountant's q is the rate the sample was drawn at, not a realised ratio
        self.expected_clients = rate * connected
        # k means of one sample, each with noise z C on a sum whose sensitivity is C (one node's clipped upload), are
        # one Gaussian mechanism on the k-fold vector: sensitivity sqrt(k) C, noise z C per coordinate, so
        # multiplier z / sqrt(k); that stays true when a later mean depends on an earlier one's output (adaptive
        # composition of Gaussians, Dong, Roth & Su 2022, Cor. 3.3), and Poisson subsampling then amplifies the
        # whole round once. Counting k releases of z as separately sampled would assume independent samples:
        # with the same sample a node is in all k means or none, which k independent samplings under-count.
        joint = math.sqrt(self.means_per_round)
        if not self.noise_multiplier:  # calibrated once, for every planned round at this sampling rate
            self.noise_multiplier = joint * calibrate_noise_multiplier(self.p.target_epsilon, self.p.delta, rate,
                                                                       self.rounds)
        release = Release(self.noise_multiplier / joint, rate, 1)
        after = epsilon([*self.history, release], self.p.delta)
        if after > self.p.target_epsilon * (1 + 1e-9):
            raise BudgetSpent(f"round {number} would take the run's epsilon from {self.spent():.4g} to {after:.4g}, "
                              f"over privacy.target-epsilon = {self.p.target_epsilon:g} (delta {self.p.delta:g})")
        self._pending, self.entry, self._means_left = (release, after), None, self.means_per_round

    def _spend(self, metrics: dict[str, float], clip_norm: float) -> None:
        """Count the round's release at its first private mean; a later mean of the round (the same sample and
        release) adds its metrics to the entry, under ``exchange-<i>-``."""
        if self._pending is None:
            raise RuntimeError(f"central DP: {self.means_per_round} private mean(s) per round (start_round first)")
        release, after = self._pending
        index = self.means_per_round - self._means_left + 1
        if index == 1:
            if self.means_per_round > 1:
                metrics = {**metrics, "private-means": float(self.means_per_round)}
            self.entry = PrivacyEntry(node_id=None, mechanism=MECHANISMS["central"], status="spent",
                                      noise_multiplier=release.noise_multiplier, clip_norm=clip_norm,
                                      sample_rate=release.sample_rate, steps=1, epsilon=after, delta=self.p.delta,
                                      metrics=metrics)
            self.history.append(release)
        elif self.entry is not None:
            later = {f"exchange-{index}-{k}": v for k, v in metrics.items() if k != "next-clip-norm"}
            self.entry = replace(self.entry, metrics={**self.entry.metrics, **later})
        self._means_left -= 1
        if self._means_left == 0:
            self._pending = None

    def noised_mean(self, requests: Mapping[int, Request], mean: MeanUpdate) -> MeanUpdate:
        """Under secure aggregation: nodes clipped their own deltas to C (``Instructions.clip_norm``) and the
        server holds only their equal-weight mean over the m that took part. The result is
        sent + (m / W) (mean - sent) + N(0, (z C / W)^2) on the trained tensors, W = q N fixed; for a tensor the
        nodes were not sent (sketch's Y, Z: deltas already, which the nodes clip in ``Sketch.transform_upload`` and
        ``answer``), (m / W) mean + the same noise.

        The guarantee assumes nodes clip honestly (as with Flower's client-side clipping): a node that
        does not is bounded only by secagg.clip-range.
        """
        if self._pending is None:
            raise RuntimeError("central DP: one private mean per round (start_round first)")
        sent = requests[mean.node_ids[0]]
        if any(not np.array_equal(requests[n].tensors[k], sent.tensors[k])
               for n in mean.node_ids for k in mean.tensors if k in sent.tensors):
            raise ConfigError("central DP needs every node sent the same tensors; this strategy sends others")
        m, z, w = len(mean.node_ids), self.noise_multiplier, self.expected_clients
        noised = trained_names(mean.tensors, sent.instructions.train_factors, self.freeze_head)
        # The sum of clipped deltas over W, not over m; a tensor not sent (sketch's Y, Z) is a mean delta itself.
        rescaled = {k: (sent.tensors[k] + (v - sent.tensors[k]) * np.float32(m / w) if k in sent.tensors
                        else v * np.float32(m / w)).astype(np.float32)
                    for k, v in mean.tensors.items()}
        tensors = add_gaussian_noise(rescaled, z * self.clip_norm / w, noised, self.rng)
        metrics = {"clients": float(m), "expected-clients": w, "update-noise-multiplier": z,
                   "noise-std": z * self.clip_norm / w,
                   "next-clip-norm": self.clip_norm, "secure-aggregation": 1.0}
        self._spend(metrics, self.clip_norm)
        return MeanUpdate(tensors, mean.node_ids, mean.num_examples, mean.node_metrics)

    def mean(self, requests: Mapping[int, Request], updates: Sequence[ClientUpdate]) -> MeanUpdate:
        """sent + (1/W) sum_i clip(reply_i - sent, C) + N(0, (z C / W)^2) on the trained tensors, W = q N.

        A reply tensor the node was not sent (sketch's Y_k, Z_k) is a delta already, computed by the node from
        its own work (``Strategy.uploads_own_deltas``, which ``check_privacy_config`` requires): it is clipped
        with the rest as it is, and its mean is returned without a ``sent`` to add it to."""
        if self._pending is None:
            raise RuntimeError("central DP: one private mean per round (start_round first)")
        sent = requests[updates[0].node_id]
        for u in updates:
            if any(not np.array_equal(requests[u.node_id].tensors[k], sent.tensors[k])
                   for k in u.tensors if k in sent.tensors):
                raise ConfigError(f"central DP needs every node sent the same tensors; node {u.node_id} got others")
        m, w = len(updates), self.expected_clients
        z = self.noise_multiplier
        count_std = (self.p.clipped_count_stddev or default_count_stddev(w, z)) if self.p.adaptive_clipping else 0.0
        update_z = update_noise_multiplier(z, count_std) if self.p.adaptive_clipping else z
        noised = trained_names(updates[0].tensors, sent.instructions.train_factors, self.freeze_head)
        private = private_mean([own_delta(u.tensors, sent.tensors) for u in updates], self.clip_norm, update_z,
                               noised, self.rng, denominator=w)
        metrics = {"clients": float(m), "expected-clients": w, "update-noise-multiplier": update_z,
                   "noise-std": update_z * self.clip_norm / w}
        next_clip = self.clip_norm
        if self.p.adaptive_clipping:
            next_clip, fraction = next_clip_norm(self.clip_norm, private.unclipped, w, count_std,
                                                 self.p.target_unclipped_quantile, self.p.clip_learning_rate, self.rng)
            metrics.update({"count-stddev": count_std, "unclipped-fraction": fraction})
        metrics["next-clip-norm"] = next_clip
        self._spend(metrics, self.clip_norm)
        self.clip_norm = next_clip
        tensors = {k: (sent.tensors[k] + v if k in sent.tensors else v).astype(np.float32)
                   for k, v in private.delta.items()}
        return MeanUpdate(tensors, tuple(u.node_id for u in updates), sum(u.num_examples for u in updates),
                          {u.node_id: dict(u.metrics) for u in updates})


def own_delta(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What one node changed: reply - sent for a tensor it was sent, the reply itself for one it computed as a delta
    of its own work (``Strategy.uploads_own_deltas``)."""
    changed = delta_of({k: v for k, v in reply.items() if k in sent}, sent)
    return {k: changed[k] if k in changed else np.asarray(v, dtype=np.float32) for k, v in reply.items()}


class NodeLedger:
    """Turns a round's client records into ledger entries (sample, local): spent as reported, or refused."""

    def __init__(self, privacy: PrivacyConfig, ledger: Sequence[PrivacyEntry] = ()) -> None:
        self.mode, self.delta = privacy.mode, privacy.delta
        self.epsilon = {e.node_id: e.epsilon for e in ledger if e.node_id is not None and e.status == "spent"}

    def entries(self, clients: Sequence[ClientRecord]) -> list[PrivacyEntry]:
        out = []
        for c in clients:
            if c.phase != "train":
                continue
            entry = entry_from_report(c.node_id, self.mode, c.metrics) if c.status == "accepted" else None
            if entry is not None:
                self.epsilon[c.node_id] = entry.epsilon
                out.append(entry)
            elif is_refusal(c):
                out.append(PrivacyEntry(node_id=c.node_id, mechanism=MECHANISMS[self.mode], status="refused",
                                        noise_multiplier=0.0, clip_norm=0.0, sample_rate=0.0, steps=0,
                                        epsilon=self.epsilon.get(c.node_id, 0.0), delta=self.delta, reason=c.reason))
        return out


# What a node record may keep under DP: the release's own description (the ledger's), and a refusal's code.
RELEASED_KEYS = frozenset({*REPORT_KEYS, "error-code"})


def released(privacy: PrivacyConfig, clients: Sequence[ClientRecord]) -> list[ClientRecord]:
    """The node records as the store keeps them: under DP, no per-node number the mechanism does not cover.

    Nodes under DP send no count, loss or accuracy (client/app.py); this is the server's half, for what it
    computes itself from one node's reply (its update norm, a count a node sent anyway): dropped before it
    reaches the store and the status service.
    """
    if privacy.mode == "off":
        return list(clients)
    return [replace(c, num_examples=0, metrics={k: v for k, v in c.metrics.items() if k in RELEASED_KEYS})
            for c in clients]


def is_refusal(record: ClientRecord) -> bool:
    """A node that refused to train because its privacy budget would be exceeded."""
    return record.status == "failed" and record.metrics.get("error-code") == REFUSAL_CODE


@dataclass
class RunPrivacy:
    """A run's privacy on the coordinator: the key nodes budget under, central DP, the nodes' ledger entries."""

    run_key: str = ""
    central: CentralPrivacy | None = None
    nodes: NodeLedger | None = None

    @classmethod
    def open(cls, privacy: PrivacyConfig, rounds: int, store: RoundStore, run_id: int,
             sample_rate: float = 1.0, freeze_head: bool = False, means_per_round: int = 1) -> RunPrivacy:
        """The run's privacy state, rebuilt from its stored ledger (empty for a new run); ``rounds`` as planned,
        ``sample_rate`` the nodes' Poisson sampling rate q under central DP, ``freeze_head`` train.freeze-head,
        ``means_per_round`` the strategy's private means per round."""
        if privacy.mode == "off":
            return cls()
        ledger = [entry for _, entry in store.privacy_ledger(run_id)]
        key = privacy_run_key(store.run(run_id))
        if privacy.mode == "central":
            return cls(key, central=CentralPrivacy(privacy, rounds, ledger, sample_rate=sample_rate,
                                                   freeze_head=freeze_head, means_per_round=means_per_round))
        return cls(key, nodes=NodeLedger(privacy, ledger))

    def entries(self, clients: Sequence[ClientRecord]) -> list[PrivacyEntry]:
        """This round's ledger entries, from its client records and the server's own release."""
        out = self.nodes.entries(clients) if self.nodes is not None else []
        if self.central is not None and self.central.entry is not None:
            out.append(self.central.entry)
            self.central.entry = None
        return out
