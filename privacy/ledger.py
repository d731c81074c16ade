"""The privacy ledger's records: who spent how much privacy, by which mechanism, in which round.

One ``PrivacyEntry`` per client per round for client-side mechanisms (DP-SGD, local DP), one
per round with no node for the server's central DP. The ledger is also the accountant's
history: a run's epsilon, and the current adaptive clip norm, are rebuilt from its rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pollinate.privacy.accountant import Release

MECHANISMS = {"sample": "dp-sgd", "central": "central-gaussian", "local": "local-gaussian"}
REFUSAL_CODE = 4_600  # Flower Error code of a client that refuses to train: its budget would be exceeded

# What a client reports under sample/local DP (MetricRecord keys, numbers only).
REPORT_KEYS = ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-clip-norm", "dp-sample-rate", "dp-steps")


@dataclass(frozen=True)
class PrivacyEntry:
    """One row of the privacy ledger."""

    node_id: int | None  # None: the server's own release (central DP)
    mechanism: str  # dp-sgd | central-gaussian | local-gaussian
    status: str  # spent | refused
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int
    epsilon: float  # cumulative over the run, after this round
    delta: float
    reason: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)  # e.g. unclipped-fraction, next-clip-norm

    @property
    def release(self) -> Release:
        return Release(self.noise_multiplier, self.sample_rate, self.steps)


def entry_from_report(node_id: int, mode: str, report: Mapping[str, float]) -> PrivacyEntry | None:
    """The ledger entry a client's training report describes (None when it reported no DP)."""
    if "dp-epsilon" not in report:
        return None
    return PrivacyEntry(node_id=node_id, mechanism=MECHANISMS[mode], status="spent",
                        noise_multiplier=report["dp-noise-multiplier"], clip_norm=report["dp-clip-norm"],
                        sample_rate=report["dp-sample-rate"], steps=int(report["dp-steps"]),
                        epsilon=report["dp-epsilon"], delta=report["dp-delta"])


def releases(entries: Iterable[PrivacyEntry], node_id: int | None = None) -> list[Release]:
    """The accountant history of one node (or of the server, ``None``) from its ledger rows."""
    return [e.release for e in entries if e.node_id == node_id and e.status == "spent"]
