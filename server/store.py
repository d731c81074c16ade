"""The round store: every run, round, client update and global adapter, in any SQLAlchemy database.

SQLite by default (a file, zero set-up), PostgreSQL for production. Callers use the
narrow API of ``RoundStore`` and never build SQL; ``record_round`` writes a whole round
(its row, every client's row, the global adapter and the round loop's full state) in one
transaction, so a round is either fully stored or not at all, and a coordinator that dies at
any moment resumes from the last stored round (``last_checkpoint``). A failed round is stored
too, with its reason and client ledger, but without an adapter. Adapters and states are stored
as safetensors bytes with their sha256, checked again on load (``adapter``, the one adapter reader).
Reads return frozen records (``RunSummary``, ``StoredRound``, ``StoredClientUpdate``, ``AttemptRecord``,
``StoredAdapter``), never ORM rows; the SQLAlchemy models are private to this module. The schema is
brought to the newest Alembic revision once per database per process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
from alembic import command
from alembic.config import Config as AlembicConfig
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from sqlalchemy import (JSON, BigInteger, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint,
                        create_engine, or_, select, update)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pollinate.privacy.ledger import PrivacyEntry

NamedArrays = dict[str, np.ndarray]


class StoreError(RuntimeError):
    """The round store cannot be reached or holds something inconsistent; says what to check."""


class LeaseHeld(StoreError):
    """Another coordinator holds the run's lease (it is live): this one must not work on the run."""


# Transient database faults (SQLite "database is locked" past its busy timeout, a PostgreSQL restart or reset
# connection) are retried after these waits; a fault that outlasts them all is a StoreError.
RETRY_DELAYS_S = (0.1, 0.3, 1.0, 3.0, 6.0)
SQLITE_BUSY_TIMEOUT_S = 30.0  # several processes may write one SQLite file: each attempt waits this for the lock
_P, _R = ParamSpec("_P"), TypeVar("_R")


def is_transient(err: BaseException) -> bool:
    """A database error that a retry may cure: an OperationalError (locked, busy, connection lost) or a
    connection the driver invalidated. Integrity and programming errors are not: a retry repeats them."""
    return isinstance(err, OperationalError) or (isinstance(err, DBAPIError) and err.connection_invalidated)


def retried(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """``method`` (one whole transaction of ``RoundStore``) run again after each of ``RETRY_DELAYS_S`` while it
    fails with a transient fault; the last fault becomes a one-line ``StoreError``. The transaction rolled back
    on the fault, so running it again writes it once."""

    @functools.wraps(method)
    def again(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        store: RoundStore = args[0]  # type: ignore[assignment]
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
            try:
                return method(*args, **kwargs)
            except DBAPIError as e:
                if not is_transient(e):
                    raise
                if delay is None:
                    raise StoreError(f"the round store at {store.url} failed {attempt + 1} time(s) in "
                                     f"{method.__name__} ({_first_line(e)}); check that the database is running, "
                                     f"reachable and not locked by another program") from None
                store.sleep(delay)
        raise AssertionError("unreachable")

    return again


def _first_line(err: BaseException) -> str:
    lines = str(getattr(err, "orig", None) or err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# Flower sends the whole run config to every node, and the config is stored with the run: the store URL
# travels with its password withheld ("***"). The coordinator's own processes get the password back from
# the command that started them (see ``keep_password``).
PASSWORD_ENV = "POLLINATE_STORE_PASSWORD"
PASSWORD_FILE_ENV = "POLLINATE_STORE_PASSWORD_FILE"  # or a file holding it (a Docker/Compose secret)
_WITHHELD = "***"
_PASSWORDS: dict[str, str] = {}  # withheld URL -> its password, for this process only
_PASSWORDS_LOCK = threading.Lock()


def withhold_password(url: str) -> tuple[str, str | None]:
    """(``url`` as it may be sent to nodes and stored with the run, its password): the URL with the password
    replaced by ``***``, and the password (None when the URL has none, or has it withheld already)."""
    parsed = make_url(url)
    if parsed.password is None or parsed.password == _WITHHELD:
        return url, None
    return parsed.render_as_string(hide_password=True), str(parsed.password)


def keep_password(url: str, password: str | None) -> None:
    """Let a ``RoundStore`` opened in this process on the withheld ``url`` use ``password``.

    Why a registry in this module and not ``os.environ``: the environment is global state that every child
    process inherits, so the Simulation Engine's Ray workers (the simulated *nodes*) and any tool started
    later would get the database password too. The commands that hold a password keep it here for their
    own process (``pollinate simulate`` runs the ServerApp in-process; ``pollinate server`` opens the store
    for its report and status service) and hand it to exactly the child that needs it, the SuperLink, as
    ``password_env(url)`` in that child's environment (server/launch.py).
    """
    if password is not None:
        with _PASSWORDS_LOCK:
            _PASSWORDS[_key(url)] = password


def password_env(url: str) -> dict[str, str]:
    """The environment entry a coordinator process started by this one needs to open the withheld ``url``
    (``{PASSWORD_ENV: password}``), or nothing when this process keeps no password for it."""
    with _PASSWORDS_LOCK:
        password = _PASSWORDS.get(_key(url))
    if password is None and make_url(url).password == _WITHHELD:
        password = _password(url)  # from this process's environment or secret file
    return {} if password is None else {PASSWORD_ENV: password}


def _key(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _password(url: str) -> str:
    """The real password of a withheld URL: kept by this process's command, or given by the parent's env."""
    with _PASSWORDS_LOCK:
        kept = _PASSWORDS.get(_key(url))
    password = kept or os.environ.get(PASSWORD_ENV)
    if not password and os.environ.get(PASSWORD_FILE_ENV):
        try:
            password = Path(os.environ[PASSWORD_FILE_ENV]).read_text().rstrip("\r\n")
        except OSError as e:
            raise StoreError(f"{PASSWORD_FILE_ENV} = {os.environ[PASSWORD_FILE_ENV]}: cannot read the store password "
                             f"({e.strerror}); point it at the secret file") from None
    if not password:
        raise StoreError(f"the round store URL {url} has its password withheld ({_WITHHELD}) and {PASSWORD_ENV} is "
                         f"not set; set {PASSWORD_ENV} (or {PASSWORD_FILE_ENV}, a file holding it) in the "
                         f"coordinator's environment (`pollinate server` passes it to the SuperLink it starts)")
    return password


class _Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


metadata = _Base.metadata
MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATED: set[str] = set()  # databases (URLs, password hidden) this process brought to the newest revision
_MIGRATED_LOCK = threading.Lock()


def migrate(engine: Engine) -> None:
    """Bring the database's schema to the newest Alembic revision (creates it on an empty database)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _migrate_once(engine: Engine) -> None:
    """``migrate``, once per database per process: a coordinator opens its store several times (command,
    ServerApp, status service), and nothing else in this process changes the schema under it. An in-memory
    SQLite database is new with every engine, so it is always migrated."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        migrate(engine)
        return
    key = url.render_as_string(hide_password=True)
    with _MIGRATED_LOCK:
        if key not in _MIGRATED:
            migrate(engine)
            _MIGRATED.add(key)
            return
    with engine.connect():  # still fail fast when the database is unreachable
        pass


class _RunRow(_Base):
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
    lease_holder: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the coordinator working on it
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class _RoundRow(_Base):
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
    # The global test set (a simulation's held-out slice, no node trains on it), evaluated on the coordinator:
    test_loss: Mapped[float | None] = mapped_column(Float, nullable=True)  # causal-lm: perplexity = exp(loss)
    test_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)  # classification
    test_macro_f1: Mapped[float | None] = mapped_column(Float, nullable=True)  # classification


class _ClientUpdateRow(_Base):
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


class _PrivacyLedgerRow(_Base):
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


class _RoundBlob:
    """The columns of one safetensors blob per completed round, checked by its sha256 on load."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    nbytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors


class _AdapterRow(_RoundBlob, _Base):
    """The global adapter after a completed round."""

    __tablename__ = "adapters"


class _RoundStateRow(_RoundBlob, _Base):
    """The round loop's full state after a completed round (base deltas included) and the strategy's own."""

    __tablename__ = "round_states"


class _RunAttemptRow(_Base):
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
class RoundMeasures:
    """What one round measured: who took part, its mean losses and accuracy, its bytes and its duration."""

    number: int
    participants: int
    accepted: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    bytes_up: int
    bytes_down: int
    duration_s: float


@dataclass(frozen=True)
class RoundRecord(RoundMeasures):
    """Everything stored about one round: its measures, every node's record, and its ledger."""

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


@dataclass(frozen=True, kw_only=True)
class StoredClientUpdate(ClientRecord):
    """A stored ``ClientRecord`` with the number of the round it belongs to."""

    round_number: int


@dataclass(frozen=True)
class StoredRound(RoundMeasures):
    """A stored round as ``rounds`` reads it: its record's numbers, and its adapter's digest and size (if any)."""

    run_id: int
    metrics: Mapping[str, float | None]  # NaN/Inf were stored as None
    status: str  # completed | failed
    reason: str | None
    parent_sha256: str | None
    adapter_sha256: str | None  # None: a failed round stores no adapter
    adapter_nbytes: int | None
    test: GlobalTestMetrics | None = None  # the global test set's measure of this round's adapter, if it has one


@dataclass(frozen=True)
class GlobalTestMetrics:
    """A global adapter measured on the global test set: loss (causal-lm: its exp is perplexity), and for a
    classifier accuracy and macro-F1 (the mean of the classes' F1, so a rare class counts as much as a common one)."""

    loss: float | None
    accuracy: float | None = None
    macro_f1: float | None = None


@dataclass(frozen=True)
class StoredAdapter:
    """A round's global adapter as stored: safetensors bytes, already checked against their sha256."""

    run_id: int
    number: int
    sha256: str
    data: bytes

    def tensors(self) -> NamedArrays:
        return dict(load_safetensors(self.data))


@dataclass(frozen=True)
class AttemptRecord:
    """One coordinator process that worked on a run: the first start, then one per resume."""

    flower_run_id: int
    first_round: int
    started_at: datetime


def adapter_bytes(tensors: NamedArrays) -> bytes:
    return save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime) -> datetime:
    """A stored moment in UTC (SQLite returns it without its zone; everything is stored in UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


class RoundStore:
    """Open (and create if needed) the store at ``url``; fails fast when the database is unreachable."""

    def __init__(self, url: str, connect_timeout_s: int = 5) -> None:
        self.url = url
        try:
            parsed = make_url(url)
        except ArgumentError as e:
            raise StoreError(f"--db {url!r} is not a database URL; use e.g. sqlite:///pollinate.db or "
                             f"postgresql+psycopg://user@host:5432/dbname") from e
        if parsed.password == _WITHHELD:
            parsed = parsed.set(password=_password(url))
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql":
            connect_args["connect_timeout"] = connect_timeout_s
        elif parsed.get_backend_name() == "sqlite":
            connect_args["timeout"] = SQLITE_BUSY_TIMEOUT_S
        try:
            # pool_pre_ping: a pooled connection that a database restart closed is replaced, not used and failed
            self.engine: Engine = create_engine(parsed, connect_args=connect_args, pool_pre_ping=True)
            _migrate_once(self.engine)
        except (OperationalError, ModuleNotFoundError) as e:
            raise StoreError(f"cannot open the round store at {parsed.render_as_string(hide_password=True)}: "
                             f"{str(e).splitlines()[0]}. Check the URL (--db) and that the database is running "
                             f"and reachable") from e
        self.url = parsed.render_as_string(hide_password=True)

    def sleep(self, seconds: float) -> None:
        """Wait between two attempts of a transaction that hit a transient fault."""
        time.sleep(seconds)

    @retried
    def start_run(self, config: Mapping[str, Any], strategy: str, model: str,
                  initial_metrics: Mapping[str, float] | None = None, holder: str | None = None,
                  lease_ttl_s: float = 0.0) -> int:
        """A new run, status running; ``holder`` (a coordinator's lease id) holds its lease for ``lease_ttl_s``."""
        with Session(self.engine) as s, s.begin():
            now = _now()
            row = _RunRow(status="running", strategy=strategy, model=model, config=dict(config),
                         initial_metrics=dict(initial_metrics or {}), started_at=now, lease_holder=holder,
                         lease_expires_at=now + timedelta(seconds=lease_ttl_s) if holder else None)
            s.add(row)
            s.flush()
            return row.id

    @retried
    def set_initial_metrics(self, run_id: int, metrics: Mapping[str, float]) -> None:
        with Session(self.engine) as s, s.begin():
            s.get_one(_RunRow, run_id).initial_metrics = {k: _finite(v) for k, v in metrics.items()}

    @retried
    def set_test_metrics(self, run_id: int, number: int, test: GlobalTestMetrics) -> None:
        """Store round ``number``'s global test set measure beside the nodes' local evaluation."""
        with Session(self.engine) as s, s.begin():
            row = s.scalars(select(_RoundRow).where(_RoundRow.run_id == run_id, _RoundRow.number == number)).one()
            row.test_loss, row.test_accuracy = _finite(test.loss), _finite(test.accuracy)
            row.test_macro_f1 = _finite(test.macro_f1)

    @retried
    def record_round(self, run_id: int, record: RoundRecord, global_adapter: NamedArrays | None,
                     round_state: NamedArrays | None = None, holder: str | None = None,
                     lease_ttl_s: float = 0.0) -> str | None:
        """Store a round, its client records, its global adapter and the round loop's state atomically.

        Returns the adapter's sha256. A failed round (``record.status == "failed"``) has no adapter or state.
        With ``holder``, the round is stored only while that coordinator holds the run's lease (renewed in the
        same transaction), so a coordinator that lost it cannot store a round beside its successor's.
        """
        if (record.status == "completed") != (global_adapter is not None):
            raise ValueError("a completed round is stored with its global adapter, a failed one without")
        with Session(self.engine) as s, s.begin():
            if holder is not None:
                self._renew(s, run_id, holder, lease_ttl_s)
            row = _RoundRow(run_id=run_id, number=record.number, participants=record.participants,
                           accepted=record.accepted, train_loss=_finite(record.train_loss),
                           eval_loss=_finite(record.eval_loss), eval_accuracy=_finite(record.eval_accuracy),
                           bytes_up=record.bytes_up, bytes_down=record.bytes_down, duration_s=record.duration_s,
                           metrics={k: _finite(v) for k, v in record.metrics.items()}, status=record.status,
                           reason=record.reason, parent_sha256=record.parent_sha256)
            s.add(row)
            s.flush()
            for c in record.clients:
                s.add(_ClientUpdateRow(round_id=row.id, node_id=str(c.node_id), phase=c.phase, status=c.status,
                                      reason=c.reason, rank=c.rank, num_examples=c.num_examples,
                                      bytes_up=c.bytes_up, bytes_down=c.bytes_down,
                                      metrics={k: _finite(v) for k, v in c.metrics.items()}))
            for e in record.privacy:
                s.add(_PrivacyLedgerRow(round_id=row.id, node_id=None if e.node_id is None else str(e.node_id),
                                       mechanism=e.mechanism, status=e.status, noise_multiplier=e.noise_multiplier,
                                       clip_norm=e.clip_norm, sample_rate=e.sample_rate, steps=e.steps,
                                       epsilon=_finite(e.epsilon), delta=e.delta, reason=e.reason,
                                       metrics={k: _finite(v) for k, v in e.metrics.items()}))
            if global_adapter is None:
                return None
            blob = adapter_bytes(global_adapter)
            digest = sha256(blob)
            s.add(_AdapterRow(round_id=row.id, sha256=digest, nbytes=len(blob), data=blob))
            if round_state is not None:
                state_blob = adapter_bytes(round_state)
                s.add(_RoundStateRow(round_id=row.id, sha256=sha256(state_blob), nbytes=len(state_blob),
                                    data=state_blob))
        return digest

    @retried
    def record_evaluation(self, run_id: int, number: int, eval_loss: float | None, eval_accuracy: float | None,
                          clients: Sequence[ClientRecord], holder: str | None = None,
                          lease_ttl_s: float = 0.0, metrics: Mapping[str, float] | None = None) -> None:
        """Add the evaluation of a stored round's adapter (released to the nodes only after it was stored), and
        its further metrics (a causal LM's generation scores and perplexity) beside the round's own."""
        with Session(self.engine) as s, s.begin():
            if holder is not None:
                self._renew(s, run_id, holder, lease_ttl_s)
            row = s.scalars(select(_RoundRow).where(_RoundRow.run_id == run_id, _RoundRow.number == number)).one()
            row.eval_loss, row.eval_accuracy = _finite(eval_loss), _finite(eval_accuracy)
            if metrics:
                row.metrics = {**(row.metrics or {}), **{k: _finite(v) for k, v in metrics.items()}}
            row.bytes_up += sum(c.bytes_up for c in clients)
            row.bytes_down += sum(c.bytes_down for c in clients)
            for c in clients:
                s.add(_ClientUpdateRow(round_id=row.id, node_id=str(c.node_id), phase=c.phase, status=c.status,
                                      reason=c.reason, rank=c.rank, num_examples=c.num_examples,
                                      bytes_up=c.bytes_up, bytes_down=c.bytes_down,
                                      metrics={k: _finite(v) for k, v in c.metrics.items()}))

    @retried
    def acquire_lease(self, run_id: int, holder: str, ttl_s: float) -> None:
        """Compare-and-set: ``holder`` takes the run's lease for ``ttl_s`` if nobody holds it, it holds it
        already, or the holder's lease expired (its coordinator stopped renewing). ``LeaseHeld`` otherwise."""
        now = _now()
        with Session(self.engine) as s, s.begin():
            taken = s.execute(update(_RunRow).where(
                _RunRow.id == run_id,
                or_(_RunRow.lease_holder.is_(None), _RunRow.lease_holder == holder, _RunRow.lease_expires_at < now))
                .values(lease_holder=holder, lease_expires_at=now + timedelta(seconds=ttl_s))).rowcount
            if taken == 1:
                return
            row = s.get(_RunRow, run_id)
            if row is None:
                raise StoreError(f"run {run_id} is not in the store at {self.url}; `pollinate runs` lists runs")
            until = f"{_utc(row.lease_expires_at):%Y-%m-%d %H:%M:%S}" if row.lease_expires_at else "?"
            raise LeaseHeld(f"run {run_id} is being worked on by coordinator {row.lease_holder} (its lease runs "
                            f"until {until} UTC and its heartbeat renews it); stop that coordinator, or, if it "
                            f"died, resume once its lease has expired")

    @retried
    def renew_lease(self, run_id: int, holder: str, ttl_s: float) -> None:
        """Extend ``holder``'s lease by ``ttl_s`` from now; ``LeaseHeld`` when another coordinator took it."""
        with Session(self.engine) as s, s.begin():
            self._renew(s, run_id, holder, ttl_s)

    @retried
    def release_lease(self, run_id: int, holder: str) -> None:
        """Give up ``holder``'s lease (a coordinator that stops): the run can be resumed at once."""
        with Session(self.engine) as s, s.begin():
            s.execute(update(_RunRow).where(_RunRow.id == run_id, _RunRow.lease_holder == holder)
                      .values(lease_holder=None, lease_expires_at=None))

    @retried
    def lease(self, run_id: int) -> tuple[str | None, datetime | None]:
        """(holder, expiry in UTC) of the run's lease; (None, None) when nobody holds it."""
        with Session(self.engine) as s:
            row = s.get_one(_RunRow, run_id)
            return row.lease_holder, _utc(row.lease_expires_at) if row.lease_expires_at else None

    def _renew(self, s: Session, run_id: int, holder: str, ttl_s: float) -> None:
        renewed = s.execute(update(_RunRow).where(_RunRow.id == run_id, _RunRow.lease_holder == holder)
                            .values(lease_expires_at=_now() + timedelta(seconds=ttl_s))).rowcount
        if renewed != 1:
            now_held = s.get(_RunRow, run_id)
            other = now_held.lease_holder if now_held is not None else None
            raise LeaseHeld(f"this coordinator ({holder}) lost the lease on run {run_id} to {other or 'nobody'} "
                            f"(its heartbeat could not renew it in time); it stops without storing more")

    @retried
    def begin_attempt(self, run_id: int, flower_run_id: int, first_round: int) -> None:
        """A coordinator (re)starts work on ``run_id`` as Flower run ``flower_run_id``: the run is running again."""
        with Session(self.engine) as s, s.begin():
            row = s.get_one(_RunRow, run_id)
            row.status, row.error, row.ended_at = "running", None, None
            s.add(_RunAttemptRow(run_id=run_id, flower_run_id=str(flower_run_id), first_round=first_round,
                                started_at=_now()))

    @retried
    def attempts(self, run_id: int) -> list[AttemptRecord]:
        """The coordinator processes that worked on ``run_id``, in order."""
        query = select(_RunAttemptRow).where(_RunAttemptRow.run_id == run_id).order_by(_RunAttemptRow.id)
        with Session(self.engine) as s:
            return [AttemptRecord(flower_run_id=int(a.flower_run_id), first_round=a.first_round,
                                  started_at=a.started_at) for a in s.scalars(query)]

    @retried
    def run_of_flower_run(self, flower_run_id: int) -> int | None:
        """The pollinate run a Flower run worked on, if it got as far as starting one."""
        with Session(self.engine) as s:
            return s.scalar(select(_RunAttemptRow.run_id).where(_RunAttemptRow.flower_run_id == str(flower_run_id))
                            .order_by(_RunAttemptRow.id.desc()).limit(1))

    @retried
    def last_checkpoint(self, run_id: int) -> Checkpoint | None:
        """The last completed round's state (None before round 1 completes), sha256-checked."""
        with Session(self.engine) as s:
            found = s.execute(select(_RoundRow.number, _AdapterRow.sha256, _RoundStateRow.sha256, _RoundStateRow.data)
                              .join(_AdapterRow, _AdapterRow.round_id == _RoundRow.id)
                              .join(_RoundStateRow, _RoundStateRow.round_id == _RoundRow.id)
                              .where(_RoundRow.run_id == run_id, _RoundRow.status == "completed")
                              .order_by(_RoundRow.number.desc()).limit(1)).first()
        if found is None:
            return None
        number, adapter_digest, state_digest, blob = found
        if sha256(blob) != state_digest:
            raise StoreError(f"the stored state of run {run_id} round {number} fails its sha256 check; the store "
                             f"was altered or damaged, so the run cannot be resumed from it")
        return Checkpoint(number=number, adapter_sha256=adapter_digest, state=dict(load_safetensors(blob)))

    @retried
    def finish_run(self, run_id: int, status: str, error: str | None = None, adapter_dir: str | None = None,
                   holder: str | None = None) -> None:
        """The run ends with ``status``; ``holder``'s lease is released with it (another coordinator's is kept)."""
        with Session(self.engine) as s, s.begin():
            row = s.get_one(_RunRow, run_id)
            if holder is not None and row.lease_holder not in (None, holder):
                return  # another coordinator took the run over: its status is that coordinator's to set
            row.status, row.error, row.ended_at = status, error, _now()
            if holder is not None:
                row.lease_holder, row.lease_expires_at = None, None
            if adapter_dir is not None:
                row.adapter_dir = adapter_dir

    @retried
    def runs(self) -> list[RunSummary]:
        with Session(self.engine) as s:
            return [_summary(r) for r in s.scalars(select(_RunRow).order_by(_RunRow.id))]

    @retried
    def run(self, run_id: int) -> RunSummary:
        with Session(self.engine) as s:
            row = s.get(_RunRow, run_id)
            if row is None:
                raise StoreError(f"run {run_id} is not in the store at {self.url}; `pollinate runs` lists runs")
            return _summary(row)

    @retried
    def rounds(self, run_id: int, after: int = 0) -> list[StoredRound]:
        """The run's stored rounds numbered above ``after``, in order, each with its adapter's digest and size."""
        query = (select(_RoundRow, _AdapterRow.sha256, _AdapterRow.nbytes)
                 .outerjoin(_AdapterRow, _AdapterRow.round_id == _RoundRow.id)
                 .where(_RoundRow.run_id == run_id, _RoundRow.number > after).order_by(_RoundRow.number))
        with Session(self.engine) as s:
            return [_stored_round(row, digest, nbytes) for row, digest, nbytes in s.execute(query)]

    @retried
    def client_updates(self, run_id: int, number: int | None = None) -> list[StoredClientUpdate]:
        """Every node's part in the run's rounds (or in round ``number``), in round and recording order."""
        query = select(_RoundRow.number, _ClientUpdateRow).join(_RoundRow).where(_RoundRow.run_id == run_id)
        if number is not None:
            query = query.where(_RoundRow.number == number)
        with Session(self.engine) as s:
            rows = s.execute(query.order_by(_RoundRow.number, _ClientUpdateRow.id))
            return [_client_update(n, row) for n, row in rows]

    @retried
    def privacy_ledger(self, run_id: int) -> list[tuple[int, PrivacyEntry]]:
        """(round number, entry) for every privacy ledger row of a run, in round order."""
        query = (select(_RoundRow.number, _PrivacyLedgerRow).join(_RoundRow)
                 .where(_RoundRow.run_id == run_id).order_by(_RoundRow.number, _PrivacyLedgerRow.id))
        with Session(self.engine) as s:
            return [(number, _privacy_entry(row)) for number, row in s.execute(query)]

    @retried
    def adapter(self, run_id: int, number: int) -> StoredAdapter:
        """A round's global adapter, its bytes checked against the stored sha256 (``StoreError`` if they fail).

        The one reader of stored adapters; ``rounds`` lists their digests and sizes without reading the bytes.
        """
        query = (select(_AdapterRow.sha256, _AdapterRow.data).join(_RoundRow)
                 .where(_RoundRow.run_id == run_id, _RoundRow.number == number))
        with Session(self.engine) as s:
            found = s.execute(query).first()
        if found is None:
            raise StoreError(f"run {run_id} has no stored adapter for round {number}; `pollinate runs --run "
                             f"{run_id}` lists its rounds (a failed round stores none)")
        digest, data = found
        if sha256(data) != digest:
            raise StoreError(f"the stored adapter of run {run_id} round {number} fails its sha256 check")
        return StoredAdapter(run_id=run_id, number=number, sha256=digest, data=data)


def _privacy_entry(r: _PrivacyLedgerRow) -> PrivacyEntry:
    return PrivacyEntry(node_id=None if r.node_id is None else int(r.node_id), mechanism=r.mechanism,
                        status=r.status, noise_multiplier=r.noise_multiplier, clip_norm=r.clip_norm,
                        sample_rate=r.sample_rate, steps=r.steps,
                        epsilon=float("inf") if r.epsilon is None else r.epsilon, delta=r.delta, reason=r.reason,
                        metrics=dict(r.metrics or {}))


def _summary(r: _RunRow) -> RunSummary:
    return RunSummary(id=r.id, status=r.status, strategy=r.strategy, model=r.model, started_at=r.started_at,
                      ended_at=r.ended_at, error=r.error, adapter_dir=r.adapter_dir,
                      initial_metrics=r.initial_metrics or {}, config=json.loads(json.dumps(r.config)))


def _stored_round(r: _RoundRow, adapter_sha256: str | None, adapter_nbytes: int | None) -> StoredRound:
    measures = {f.name: getattr(r, f.name) for f in fields(RoundMeasures)}
    return StoredRound(**measures, run_id=r.run_id, metrics=dict(r.metrics or {}), status=r.status, reason=r.reason,
                       parent_sha256=r.parent_sha256, adapter_sha256=adapter_sha256, adapter_nbytes=adapter_nbytes,
                       test=None if r.test_loss is None and r.test_accuracy is None else
                       GlobalTestMetrics(loss=r.test_loss, accuracy=r.test_accuracy, macro_f1=r.test_macro_f1))


def _client_update(number: int, r: _ClientUpdateRow) -> StoredClientUpdate:
    return StoredClientUpdate(node_id=int(r.node_id), phase=r.phase, status=r.status, reason=r.reason, rank=r.rank,
                              num_examples=r.num_examples, bytes_up=r.bytes_up, bytes_down=r.bytes_down,
                              metrics=dict(r.metrics or {}), round_number=number)
