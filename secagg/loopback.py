"""Run a whole SecAgg+ round in one process: the reference for the Flower wiring, used by tests and bench/.

Messages go straight from one session to the other; ``intercept`` sees (and may replace) every
server -> client message, as a network or a malicious server could. A client whose message the server
rejects, or that rejects a server message, drops out of the round, as it would over the network.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from pollinate.secagg.client import ClientSession
from pollinate.secagg.messages import SecAggError
from pollinate.secagg.server import RoundConfig, ServerSession

T = TypeVar("T")
STAGE_NAMES = ("setup", "advertise_keys", "share_keys", "mask_input", "unmask")


@dataclass
class StageTimes:
    """Seconds per stage: all clients together, the slowest client, and the server."""

    clients: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    slowest_client: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    server: dict[str, float] = field(default_factory=lambda: defaultdict(float))


@dataclass
class RoundResult:
    total: np.ndarray
    """sum of the survivors' quantised inputs mod 2^b."""
    survivors: list[int]
    rejected: list[tuple[int, str, str]]
    """(client, stage, reason) for every message that was refused, by either side."""
    undecryptable: list[tuple[int, int]]
    """(sender, receiver) of share ciphertexts that failed authentication."""


def run_round(config: RoundConfig, inputs: Mapping[int, np.ndarray], drop_after: Mapping[int, int] | None = None,
              rngs: Mapping[int, random.Random] | None = None,
              intercept: Callable[[object], object] | None = None, times: StageTimes | None = None) -> RoundResult:
    """One round; ``drop_after[u] = s`` makes client u vanish once it has sent its stage-s message (0: never joins)."""
    drop_after, rngs = drop_after or {}, rngs or {}
    times = times or StageTimes()
    intercept = intercept or (lambda msg: msg)
    server = ServerSession(config)
    rejected: list[tuple[int, str, str]] = []

    def timed(where: dict[str, float], stage: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            where[stage] += time.perf_counter() - start

    setups = timed(times.server, "setup", server.setup)
    sessions = {u: ClientSession(setups[u], rngs.get(u)) for u in setups if drop_after.get(u, 4) >= 1}
    outbox = {u: (lambda s=s: s.advertise_keys()) for u, s in sessions.items()}
    receivers = (server.receive_keys, server.receive_shares, server.receive_masked_input, server.receive_unmask)
    closers = (server.forward_keys, server.route_shares, server.unmask_requests)
    for stage in range(1, 5):
        name = STAGE_NAMES[stage]
        replies = {}
        for u, send in outbox.items():
            start = time.perf_counter()
            try:
                replies[u] = send()
            except SecAggError as err:
                rejected.append((u, name, str(err)))
            elapsed = time.perf_counter() - start
            times.clients[name] += elapsed
            times.slowest_client[name] = max(times.slowest_client[name], elapsed)
        for u, reply in replies.items():
            try:
                timed(times.server, name, lambda: receivers[stage - 1](reply))
            except SecAggError as err:
                rejected.append((u, name, str(err)))
        if stage == 4:
            break
        forwarded = timed(times.server, name, closers[stage - 1])
        alive = {u for u in forwarded if drop_after.get(u, 4) > stage}
        outbox = {u: _next_call(stage, sessions[u], intercept(forwarded[u]), inputs[u]) for u in sorted(alive)}
    total = timed(times.server, "aggregate", server.aggregate)
    return RoundResult(total, server.survivors, rejected, list(server.undecryptable))


def _next_call(stage: int, session: ClientSession, msg: object, quantised: np.ndarray) -> Callable[[], object]:
    if stage == 1:
        return lambda: session.share_keys(msg)
    if stage == 2:
        return lambda: session.mask_input(msg, quantised)
    return lambda: session.unmask(msg)
