"""How much each node's update counts in a round: ``federation.weighting``, applied in one place.

- ``examples``: p_k = n_k / sum n (FedAvg, McMahan et al. 2017), with n_k as the node reported it.
- ``equal``: p_k = 1 / m.
- ``capped`` (default): n_k is first cut to what the node declared at the query exchange, then no node carries
  more than ``federation.max-weight-share`` s of the round: shares above s are set to s and the rest is
  shared out in proportion to the remaining counts, repeated until none exceeds s (water-filling; at most m
  passes). One node claiming 10^12 examples then weighs s, not 1. A round with fewer than 1 / s nodes cannot
  keep every share at or below s (federation.min-nodes = 1 is a valid federation): then every node gets 1 / m,
  the closest to the cap there is.

A node under differential privacy reports no count (docs/privacy.md): when no node of the round reports one,
every rule gives 1 / m.

Every mean the server computes goes through ``round_weights``: ``RoundExchange`` puts the weight on each
``ClientUpdate`` (``strategies.base.example_weights`` reads it), and secure aggregation sends each node its
weight from here.
"""

from __future__ import annotations

from collections.abc import Mapping

from pollinate.proto.run_config import FederationConfig


def round_weights(counts: Mapping[int, float], federation: FederationConfig,
                  declared: Mapping[int, int] | None = None) -> dict[int, float]:
    """node -> its weight in this round, the weights summing to 1 (``counts``: the examples each node reported)."""
    if not counts:
        return {}
    if federation.weighting == "equal":
        return {node: 1 / len(counts) for node in counts}
    declared = declared or {}
    basis = {node: float(min(n, declared.get(node, n))) if federation.weighting == "capped" else float(n)
             for node, n in counts.items()}
    total = sum(basis.values())
    if total <= 0:
        return {node: 1 / len(counts) for node in counts}
    if federation.weighting == "examples":
        return {node: n / total for node, n in basis.items()}
    return capped_shares(basis, federation.max_weight_share)


def capped_shares(basis: Mapping[int, float], cap: float) -> dict[int, float]:
    """Shares proportional to ``basis`` with none above ``cap`` (water-filling); equal when the cap cannot hold."""
    if cap * len(basis) < 1:
        return {node: 1 / len(basis) for node in basis}
    shares: dict[int, float] = {}
    free = dict(basis)
    while free:
        left = 1 - sum(shares.values())
        total = sum(free.values())
        proposal = {node: left * n / total if total > 0 else left / len(free) for node, n in free.items()}
        over = {node for node, p in proposal.items() if p > cap}
        if not over:
            shares.update(proposal)
            break
        for node in over:
            shares[node] = cap
            del free[node]
    return shares
