"""Who pairs masks and holds shares with whom: a random k-regular graph (Bell et al. 2020, SecAgg+).

Bonawitz et al. 2017 pair every two clients, O(n) keys, shares and masks each. Bell et al. 2020 show a
random graph of degree k = O(log n) keeps the server from isolating any honest client's input, so each
client masks against and shares secrets with only its k neighbours.

Only the server draws the graph: it sends every client its neighbour list, so clients never recompute
it, and determinism from ``seed`` matters only for reproducing a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx  # random_regular_graph: Steger & Wormald's pairing algorithm, seeded


def regular_graph(client_ids: Sequence[int], degree: int, seed: int) -> dict[int, list[int]]:
    """Client id -> sorted neighbour ids of a random ``degree``-regular graph, deterministic from ``seed``.

    degree >= n - 1 gives the complete graph (Bonawitz et al.'s original protocol). A k-regular graph on
    n nodes needs n * k even; when it is odd we use degree k + 1, so every client gets at least the k
    neighbours asked for (the alternative, a Harary graph with one node of degree k + 1, is not random).
    """
    ids = sorted(client_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError(f"client ids must be distinct, got {list(client_ids)}")
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {n}")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    if degree >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
    if n * degree % 2:
        degree += 1  # documented above; degree + 1 <= n - 1 here because n * (n - 1) is always even
        if degree == n - 1:
            return {u: [v for v in ids if v != u] for u in ids}
    graph = nx.random_regular_graph(degree, n, seed=seed)
    return {ids[i]: sorted(ids[j] for j in graph.neighbors(i)) for i in range(n)}


def suggested_degree(n_clients: int) -> int:
    """k = 2 ceil(log2 n), capped at n - 1: the O(log n) degree of Bell et al. 2020 with a small constant."""
    return min(n_clients - 1, 2 * math.ceil(math.log2(max(n_clients, 2))))


def minimum_threshold(degree: int) -> int:
    """Smallest secure t for k neighbours: t > k/2.

    Each honest neighbour reveals one of a peer's two secrets (its self-mask seed or its masking key),
    never both; with 2t > k a server that lies about who dropped cannot collect t shares of both.
    """
    return degree // 2 + 1
