"""The round store: every run, round, client update and global adapter, in any SQLAlchemy database.

SQLite by default (a file, zero set-up), PostgreSQL for production. Callers use the
narrow API of ``RoundStore`` and never build SQL; ``record_round`` writes a whole round
(its row, every client's row, the global adapter and the round loop's full state) in one
transaction, so a round is either fully stored or not at all, and a coordinator that dies at
any moment resumes from the last stored round (``last_checkpoint``). A failed round is stored
too, with its reason and client ledger, but without an adapter. Adapters and states are stored
as safetensors bytes with their sha256, checked again on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from alembic import command
from alembic.config import Config as AlembicConfig
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from sqlalchemy import (JSON, BigInteger, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint,
                        create_engine, select)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pollinate.privacy.ledger import PrivacyEntry

NamedArrays = dict[str, np.ndarray]


class StoreError(RuntimeError):
    """The round store cannot be reached or holds something inconsistent; says what to check."""


# Flower sends the whole run config to every node, and the config is stored with the run: the store URL
# travels with its password withheld ("***"), and the coordinator's processes read it from this variable.
PASSWORD_ENV = "POLLINATE_STORE_PASSWORD"
_WITHHELD = "***"


def withhold_password(url: str) -> str:
    """``url`` as it may be sent to nodes and stored with the run: its password (if any) replaced by ``***``
    and put in this process's environment, where the coordinator reads it back (the ServerApp runs in this
    process on the Simulation Engine, and inherits the environment through the SuperLink in a deployment)."""
    parsed = make_url(url)
    if parsed.password is None or parsed.password == _WITHHELD:
        return url
    os.environ[PASSWORD_ENV] = str(parsed.password)
    return parsed.render_as_string(hide_password=True)


class _Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


metadata = _Base.metadata
MIGRATIONS = Path(__file__).parent / "migrations"


def migrate(engine: Engine) -> None:
    """Bring the database's schema to the newest Alembic revision (creates it on an empty database)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class RunRow(_Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # running | completed | failed | interrupted
    strategy: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    initial_metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    adapter_dir: Mapped[str | None] = mapped_column(Text, nullable=True)


class RoundRow(_Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    participants: Mapped[int] = mapped_column(Integer)  # clients sent work this round
    accepted: Mapped[int] = mapped_column(Integer)  # training updates aggregated
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    bytes_up: Mapped[int] = mapped_column(BigInteger)
    bytes_down: Mapped[int] = mapped_column(BigInteger)
    duration_s: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), server_default="completed")  # completed | failed
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why a failed round failed
    parent_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the adapter it started from


class ClientUpdateRow(_Base):
    __tablename__ = "client_updates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    node_id: Mapped[str] = mapped_column(String(32))  # Flower node ids are unsigned 64-bit
    phase: Mapped[str] = mapped_column(String(32))  # train | evaluate | a strategy's own exchange
    status: Mapped[str] = mapped_column(String(16))  # accepted | rejected | failed
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class PrivacyLedgerRow(_Base):
    """One row of the privacy ledger (privacy/ledger.py): a node's (or the server's) DP release in a round."""

    __tablename__ = "privacy_ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    node_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # None: the server's (central DP)
    mechanism: Mapped[str] = mapped_column(String(32))  # dp-sgd | central-gaussian | local-gaussian
    status: Mapped[str] = mapped_column(String(16))  # spent | refused
    noise_multiplier: Mapped[float] = mapped_column(Float)
    clip_norm: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)  # cumulative; None: infinite
    delta: Mapped[float] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AdapterRow(_Base):
    __tablename__ = "adapters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    nbytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors


class RoundStateRow(_Base):
    """The round loop's full state after a completed round (base deltas included) and the strategy's own."""

    __tablename__ = "round_states"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    nbytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors


class RunAttemptRow(_Base):
    """One coordinator process working on a run: the first start, then one per resume."""

    __tablename__ = "run_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    flower_run_id: Mapped[str] = mapped_column(String(32))  # Flower run ids are unsigned 64-bit
    first_round: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class ClientRecord:
    """One node's part in one exchange of a round."""

    node_id: int
    phase: str
    status: str
    reason: str | None = None
    rank: int | None = None
    num_examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundRecord:
    """Everything stored about one completed round."""

    number: int
    participants: int
    accepted: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    bytes_up: int
    bytes_down: int
    duration_s: float
    clients: Sequence[ClientRecord]
    metrics: Mapping[str, float] = field(default_factory=dict)
    privacy: Sequence[PrivacyEntry] = ()  # the round's privacy ledger entries
    status: str = "completed"  # completed | failed (then no adapter is stored)
    reason: str | None = None  # why it failed
    parent_sha256: str | None = None  # sha256 of the global adapter this round started from


@dataclass(frozen=True)
class Checkpoint:
    """Where a run stands after its last completed round: what a resumed coordinator starts from."""

    number: int
    adapter_sha256: str
    state: NamedArrays  # the round loop's state, sha256-checked, as ``record_round`` got it


@dataclass(frozen=True)
class RunSummary:
    id: int
    status: str
    strategy: str
    model: str
    started_at: datetime
    ended_at: datetime | None
    error: str | None
    adapter_dir: str | None
    initial_metrics: Mapping[str, float]
    config: Mapping[str, Any]


def adapter_bytes(tensors: NamedArrays) -> bytes:
    return save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


class RoundStore:
    """Open (and create if needed) the store at ``url``; fails fast when the database is unreachable."""

    def __init__(self, url: str, connect_timeout_s: int = 5) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as e:
            raise StoreError(f"--db {url!r} is not a database URL; use e.g. sqlite:///pollinate.db or "
                             f"postgresql+psycopg://user@host:5432/dbname") from e
        if parsed.password == _WITHHELD:
            if not os.environ.get(PASSWORD_ENV):
                raise StoreError(f"the round store URL {url} has its password withheld ({_WITHHELD}) and "
                                 f"{PASSWORD_ENV} is not set; set {PASSWORD_ENV} to the database password in the "
                                 f"coordinator's environment (`pollinate server` sets it from --db)")
            parsed = parsed.set(password=os.environ[PASSWORD_ENV])
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql":
            connect_args["connect_timeout"] = connect_timeout_s
        elif parsed.get_backend_name() == "sqlite":
            connect_args["timeout"] = 30  # several processes may write one file; wait for the lock
        try:
            self.engine: Engine = create_engine(parsed, connect_args=connect_args)
            migrate(self.engine)
        except (OperationalError, ModuleNotFoundError) as e:
            raise StoreError(f"cannot open the round store at {parsed.render_as_string(hide_password=True)}: "
                             f"{str(e).splitlines()[0]}. Check the URL (--db) and that the database is running "
                             f"and reachable") from e
        self.url = parsed.render_as_string(hide_password=True)

    def start_run(self, config: Mapping[str, Any], strategy: str, model: str,
                  initial_metrics: Mapping[str, float] | None = None) -> int:
        with Session(self.engine) as s, s.begin():
            row = RunRow(status="running", strategy=strategy, model=model, config=dict(config),
                         initial_metrics=dict(initial_metrics or {}), started_at=_now())
            s.add(row)
            s.flush()
            return row.id

    def set_initial_metrics(self, run_id: int, metrics: Mapping[str, float]) -> None:
        with Session(self.engine) as s, s.begin():
            s.get_one(RunRow, run_id).initial_metrics = {k: _finite(v) for k, v in metrics.items()}

    def record_round(self, run_id: int, record: RoundRecord, global_adapter: NamedArrays | None,
                     round_state: NamedArrays | None = None) -> str | None:
        """Store a round, its client records, its global adapter and the round loop's state atomically.

        Returns the adapter's sha256. A failed round (``record.status == "failed"``) has no adapter or state.
        """
        if (record.status == "completed") != (global_adapter is not None):
            raise ValueError("a completed round is stored with its global adapter, a failed one without")
        with Session(self.engine) as s, s.begin():
            row = RoundRow(run_id=run_id, number=record.number, participants=record.participants,
                           accepted=record.accepted, train_loss=_finite(record.train_loss),
                           eval_loss=_finite(record.eval_loss), eval_accuracy=_finite(record.eval_accuracy),
                           bytes_up=record.bytes_up, bytes_down=record.bytes_down, duration_s=record.duration_s,
                           metrics={k: _finite(v) for k, v in record.metrics.items()}, status=record.status,
                           reason=record.reason, parent_sha256=record.parent_sha256)
            s.add(row)
            s.flush()
            for c in record.clients:
                s.add(ClientUpdateRow(round_id=row.id, node_id=str(c.node_id), phase=c.phase, status=c.status,
                                      reason=c.reason, rank=c.rank, num_examples=c.num_examples,
                                      bytes_up=c.bytes_up, bytes_down=c.bytes_down,
                                      metrics={k: _finite(v) for k, v in c.metrics.items()}))
            for e in record.privacy:
                s.add(PrivacyLedgerRow(round_id=row.id, node_id=None if e.node_id is None else str(e.node_id),
                                       mechanism=e.mechanism, status=e.status, noise_multiplier=e.noise_multiplier,
                                       clip_norm=e.clip_norm, sample_rate=e.sample_rate, steps=e.steps,
                                       epsilon=_finite(e.epsilon), delta=e.delta, reason=e.reason,
                                       metrics={k: _finite(v) for k, v in e.metrics.items()}))
            if global_adapter is None:
                return None
            blob = adapter_bytes(global_adapter)
            digest = sha256(blob)
            s.add(AdapterRow(round_id=row.id, sha256=digest, nbytes=len(blob), data=blob))
            if round_state is not None:
                state_blob = adapter_bytes(round_state)
                s.add(RoundStateRow(round_id=row.id, sha256=sha256(state_blob), nbytes=len(state_blob),
                                    data=state_blob))
        return digest

    def begin_attempt(self, run_id: int, flower_run_id: int, first_round: int) -> None:
        """A coordinator (re)starts work on ``run_id`` as Flower run ``flower_run_id``: the run is running again."""
        with Session(self.engine) as s, s.begin():
            row = s.get_one(RunRow, run_id)
            row.status, row.error, row.ended_at = "running", None, None
            s.add(RunAttemptRow(run_id=run_id, flower_run_id=str(flower_run_id), first_round=first_round,
                                started_at=_now()))

    def attempts(self, run_id: int) -> list[RunAttemptRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(select(RunAttemptRow).where(RunAttemptRow.run_id == run_id)
                                  .order_by(RunAttemptRow.id)))

    def run_of_flower_run(self, flower_run_id: int) -> int | None:
        """The pollinate run a Flower run worked on, if it got as far as starting one."""
        with Session(self.engine) as s:
            return s.scalar(select(RunAttemptRow.run_id).where(RunAttemptRow.flower_run_id == str(flower_run_id))
                            .order_by(RunAttemptRow.id.desc()).limit(1))

    def last_checkpoint(self, run_id: int) -> Checkpoint | None:
        """The last completed round's state (None before round 1 completes), sha256-checked."""
        with Session(self.engine) as s:
            found = s.execute(select(RoundRow.number, AdapterRow.sha256, RoundStateRow.sha256, RoundStateRow.data)
                              .join(AdapterRow, AdapterRow.round_id == RoundRow.id)
                              .join(RoundStateRow, RoundStateRow.round_id == RoundRow.id)
                              .where(RoundRow.run_id == run_id, RoundRow.status == "completed")
                              .order_by(RoundRow.number.desc()).limit(1)).first()
        if found is None:
            return None
        number, adapter_digest, state_digest, blob = found
        if sha256(blob) != state_digest:
            raise StoreError(f"the stored state of run {run_id} round {number} fails its sha256 check; the store "
                             f"was altered or damaged, so the run cannot be resumed from it")
        return Checkpoint(number=number, adapter_sha256=adapter_digest, state=dict(load_safetensors(blob)))

    def finish_run(self, run_id: int, status: str, error: str | None = None, adapter_dir: str | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get_one(RunRow, run_id)
            row.status, row.error, row.ended_at = status, error, _now()
            if adapter_dir is not None:
                row.adapter_dir = adapter_dir

    def runs(self) -> list[RunSummary]:
        with Session(self.engine) as s:
            return [_summary(r) for r in s.scalars(select(RunRow).order_by(RunRow.id))]

    def run(self, run_id: int) -> RunSummary:
        with Session(self.engine) as s:
            row = s.get(RunRow, run_id)
            if row is None:
                raise StoreError(f"run {run_id} is not in the store at {self.url}; `pollinate runs` lists runs")
            return _summary(row)

    def rounds(self, run_id: int, after: int = 0) -> list[RoundRow]:
        """The run's stored rounds numbered above ``after``, in order."""
        query = select(RoundRow).where(RoundRow.run_id == run_id, RoundRow.number > after)
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(query.order_by(RoundRow.number)))

    def client_updates(self, run_id: int, number: int | None = None) -> list[ClientUpdateRow]:
        query = select(ClientUpdateRow).join(RoundRow).where(RoundRow.run_id == run_id)
        if number is not None:
            query = query.where(RoundRow.number == number)
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(query.order_by(RoundRow.number, ClientUpdateRow.id)))

    def privacy_ledger(self, run_id: int) -> list[tuple[int, PrivacyEntry]]:
        """(round number, entry) for every privacy ledger row of a run, in round order."""
        query = (select(RoundRow.number, PrivacyLedgerRow).join(RoundRow)
                 .where(RoundRow.run_id == run_id).order_by(RoundRow.number, PrivacyLedgerRow.id))
        with Session(self.engine) as s:
            return [(number, _privacy_entry(row)) for number, row in s.execute(query)]

    def load_adapter(self, run_id: int, number: int) -> NamedArrays:
        """A round's global adapter, after checking its bytes against the stored sha256."""
        return dict(load_safetensors(self.adapter_file(run_id, number)[1]))

    def adapter_file(self, run_id: int, number: int) -> tuple[str, bytes]:
        """A round's global adapter as stored: (sha256, safetensors bytes), the bytes checked against the digest."""
        with Session(self.engine) as s:
            row = s.scalars(select(AdapterRow).join(RoundRow)
                            .where(RoundRow.run_id == run_id, RoundRow.number == number)).first()
            if row is None:
                raise StoreError(f"run {run_id} has no stored adapter for round {number}")
            if sha256(row.data) != row.sha256:
                raise StoreError(f"the stored adapter of run {run_id} round {number} fails its sha256 check")
            return row.sha256, row.data

    def adapter_index(self, run_id: int) -> dict[int, tuple[str, int]]:
        """Round number -> (sha256, size in bytes) of its stored adapter, without reading the bytes."""
        with Session(self.engine) as s:
            rows = s.execute(select(RoundRow.number, AdapterRow.sha256, AdapterRow.nbytes).join(AdapterRow)
                             .where(RoundRow.run_id == run_id))
            return {n: (d, size) for n, d, size in rows}

    def adapter_digests(self, run_id: int) -> dict[int, tuple[str, bytes]]:
        """Round number -> (stored sha256, stored bytes), for audits."""
        with Session(self.engine) as s:
            rows = s.execute(select(RoundRow.number, AdapterRow.sha256, AdapterRow.data).join(AdapterRow)
                             .where(RoundRow.run_id == run_id))
            return {n: (d, b) for n, d, b in rows}

    def adapter_sha256(self, run_id: int, number: int) -> str | None:
        with Session(self.engine) as s:
            return s.scalar(select(AdapterRow.sha256).join(RoundRow)
                            .where(RoundRow.run_id == run_id, RoundRow.number == number))


def _privacy_entry(r: PrivacyLedgerRow) -> PrivacyEntry:
    return PrivacyEntry(node_id=None if r.node_id is None else int(r.node_id), mechanism=r.mechanism,
                        status=r.status, noise_multiplier=r.noise_multiplier, clip_norm=r.clip_norm,
                        sample_rate=r.sample_rate, steps=r.steps,
                        epsilon=float("inf") if r.epsilon is None else r.epsilon, delta=r.delta, reason=r.reason,
                        metrics=dict(r.metrics or {}))


def _summary(r: RunRow) -> RunSummary:
    return RunSummary(id=r.id, status=r.status, strategy=r.strategy, model=r.model, started_at=r.started_at,
                      ended_at=r.ended_at, error=r.error, adapter_dir=r.adapter_dir,
                      initial_metrics=r.initial_metrics or {}, config=json.loads(json.dumps(r.config)))
