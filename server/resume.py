"""Start a run in the round store, or resume one whose coordinator died, from its last completed round.

A coordinator may die at any moment (kill -9, a lost machine). Every completed round is stored in
one transaction with the round loop's full state (the exported adapter is not enough: flora and
fedex-lora carry merged base deltas) and the strategy's own state (fedadam/fedyogi moments, hetlora's
pruned ranks), so a resumed coordinator continues exactly where the last stored round left off: the
same adapter (its sha256 is checked against the store), the same strategy state, the next round number.
A round that was running when the coordinator died left nothing and is run again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pollinate.proto.run_config import ConfigError, RunConfig, Scalar, upgrade_stored
from pollinate.server.store import RoundStore, RunSummary, StoreError, adapter_bytes, sha256
from pollinate.strategies import NamedArrays, Strategy

# What a resumed run may change: how long it goes on and waits, where things are, never what it computes.
RESUMABLE_KEYS = frozenset({
    "federation.rounds", "federation.wait-for-nodes", "federation.round-timeout", "federation.on-round-failure",
    "federation.max-consecutive-failures", "store.db", "store.output-dir", "store.resume-run", "store.lease-ttl"})
_STATE, _STRATEGY = "state/", "strategy/"


@dataclass(frozen=True)
class RunStart:
    """Where this coordinator starts: the run, the state after the last completed round, the next round."""

    run_id: int
    state: NamedArrays
    first_round: int
    consecutive_failures: int  # failed rounds since the last completed one
    resumed: bool


def round_state(state: NamedArrays, strategy: Strategy) -> NamedArrays:
    """The round loop's state and the strategy's own, as one set of named arrays to store with a round."""
    return {**{_STATE + k: v for k, v in state.items()},
            **{_STRATEGY + k: v for k, v in strategy.state_arrays().items()}}


def split_round_state(arrays: Mapping[str, object]) -> tuple[NamedArrays, NamedArrays]:
    """(round loop state, strategy state) from what ``round_state`` stored."""
    state = {k.removeprefix(_STATE): v for k, v in arrays.items() if k.startswith(_STATE)}
    own = {k.removeprefix(_STRATEGY): v for k, v in arrays.items() if k.startswith(_STRATEGY)}
    return state, own  # type: ignore[return-value]


def resumed_config(stored: Mapping[str, Scalar], requested: Mapping[str, Scalar]) -> RunConfig:
    """The stored run's config with the requested values of ``RESUMABLE_KEYS``; any other change is refused."""
    base = RunConfig.from_flat(upgrade_stored(stored)).to_flat()  # a run stored by an earlier version, too
    asked = RunConfig.from_flat({**base, **requested}).to_flat()
    # The flat config lists the chosen strategy's options only: keys differ just when federation.strategy does,
    # and that change is named by itself.
    refused = sorted(k for k in base.keys() & asked.keys() if asked[k] != base[k] and k not in RESUMABLE_KEYS)
    if refused:
        changes = ", ".join(f"{k}: {base[k]!r} -> {asked[k]!r}" for k in refused)
        raise ConfigError(f"a resumed run keeps the config it was started with; refused change(s): {changes}. "
                          f"A resume may change only {sorted(RESUMABLE_KEYS - {'store.resume-run'})}; "
                          f"start a new run for anything else")
    return RunConfig.from_flat(asked)


def check_resumable(run: RunSummary) -> None:
    if run.status == "completed":
        raise ConfigError(f"run {run.id} is completed (adapter in {run.adapter_dir}); there is nothing to resume. "
                          f"Start a new run (`pollinate server --scenario ...`)")


def start_or_resume(store: RoundStore, cfg: RunConfig, strategy: Strategy, initial: NamedArrays,
                    flower_run_id: int, holder: str, lease_ttl_s: float) -> RunStart:
    """A new run (``store.resume-run`` = 0), or the stored one continued; records this coordinator's attempt.

    ``holder`` takes the run's lease (``server.lease``) first: a run another live coordinator works on is
    refused (``LeaseHeld``, naming it) before anything about the run is read or changed.
    """
    if not cfg.store.resume_run:
        run_id = store.start_run(cfg.to_flat(), strategy.name, cfg.model.name, holder=holder,
                                 lease_ttl_s=lease_ttl_s)
        store.begin_attempt(run_id, flower_run_id, 1)
        return RunStart(run_id, initial, 1, 0, resumed=False)
    run = store.run(cfg.store.resume_run)
    check_resumable(run)
    resumed_config(run.config, cfg.to_flat())  # checked here too: `flwr run` may bypass `pollinate server`
    store.acquire_lease(run.id, holder, lease_ttl_s)
    state = initial
    checkpoint = store.last_checkpoint(run.id)
    if checkpoint is not None:
        state, own = split_round_state(checkpoint.state)
        strategy.load_state_arrays(own)
        digest = sha256(adapter_bytes(strategy.export(state)))
        if digest != checkpoint.adapter_sha256:
            raise StoreError(f"run {run.id}: the stored state of round {checkpoint.number} exports an adapter with "
                             f"sha256 {digest[:12]}..., but the store holds {checkpoint.adapter_sha256[:12]}... for "
                             f"that round; the store is inconsistent, so the run is not resumed")
    rounds = store.rounds(run.id)
    first = rounds[-1].number + 1 if rounds else 1  # a failed round keeps its number; a lost one left no row
    failures = 0
    for row in reversed(rounds):
        if row.status != "failed":
            break
        failures += 1
    store.begin_attempt(run.id, flower_run_id, first)
    return RunStart(run.id, state, first, failures, resumed=True)
