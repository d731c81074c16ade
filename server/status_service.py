"""pollinate's own gRPC status service (proto/pollinate_status.proto), read-only over the round store.

Everything it answers comes from ``RoundStore``; the event stream polls the store at a bounded
interval, so it keeps working across ServerApp restarts and on SQLite and PostgreSQL alike.
``serve_status`` is what ``pollinate server`` starts beside the SuperLink.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Protocol

import grpc
from sqlalchemy.exc import OperationalError

from pollinate.proto import pollinate_status_pb2 as pb
from pollinate.proto import pollinate_status_pb2_grpc as pb_grpc
from pollinate.security.exposure import check_exposure
from pollinate.server.status_messages import round_message, run_message
from pollinate.server.store import RoundStore, RunSummary, StoredRound, StoreError

DEFAULT_PORT = 9095  # beside Flower's 8000 (SuperLink HTTP API), 9092-9093 and 9094 (a SuperNode's runtime API)
DEFAULT_CHUNK = 1 << 20
_CHUNK_LIMITS = (4096, 3 << 20)  # below gRPC's default 4 MiB message limit


class StatusService(pb_grpc.PollinateStatusServicer):
    def __init__(self, store: RoundStore, poll_interval_s: float, stopping: threading.Event) -> None:
        self.store, self.poll_interval_s, self.stopping = store, poll_interval_s, stopping

    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.ListRunsReply:
        return pb.ListRunsReply(runs=[run_message(r, len(self.store.rounds(r.id))) for r in self.store.runs()])

    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.Run:
        run = self._run(request.run_id, context)
        rounds = self.store.rounds(run.id)
        message = run_message(run, len(rounds))
        message.rounds.extend(round_message(r) for r in rounds)
        return message

    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> pb.Round:
        run = self._run(request.run_id, context)
        row = self._round(run.id, request.round, context)
        return round_message(row, self.store.client_updates(run.id, row.number))

    def WatchRun(self, request: pb.WatchRunRequest, context: grpc.ServicerContext) -> Iterator[pb.RunEvent]:
        run = self._run(request.run_id, context)
        last = request.after_round
        while context.is_active() and not self.stopping.is_set():
            try:
                # Status first: a run is finished only after its last round was recorded, so the rounds
                # read next include every round of a finished run.
                run = self.store.run(run.id)
                for row in self.store.rounds(run.id, after=last):
                    clients = self.store.client_updates(run.id, row.number)
                    yield pb.RunEvent(kind=pb.RunEvent.ROUND_RECORDED, round=round_message(row, clients))
                    last = row.number
            except OperationalError as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"the round store {self.store.url} is unreachable "
                              f"({str(e).splitlines()[0]}); follow again once it is back")
            if run.status != "running":
                yield pb.RunEvent(kind=pb.RunEvent.RUN_FINISHED, run=run_message(run, len(self.store.rounds(run.id))))
                return
            self.stopping.wait(self.poll_interval_s)

    def DownloadAdapter(self, request: pb.DownloadAdapterRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.AdapterChunk]:
        run = self._run(request.run_id, context)
        number = request.round or self._last_round(run.id, context)
        self._round(run.id, number, context)
        try:
            adapter = self.store.adapter(run.id, number)
        except StoreError as e:
            context.abort(grpc.StatusCode.DATA_LOSS, f"{e}; the stored bytes are damaged, nothing was sent")
        size = min(max(request.chunk_bytes or DEFAULT_CHUNK, _CHUNK_LIMITS[0]), _CHUNK_LIMITS[1])
        blob = adapter.data
        yield pb.AdapterChunk(header=pb.AdapterHeader(run_id=run.id, round=number, sha256=adapter.sha256,
                                                      total_bytes=len(blob), config_json=json.dumps(dict(run.config))))
        for start in range(0, len(blob), size):
            yield pb.AdapterChunk(data=blob[start:start + size])

    def _run(self, run_id: int, context: grpc.ServicerContext) -> RunSummary:
        try:
            return self.store.run(run_id)
        except StoreError:
            ids = [r.id for r in self.store.runs()]
            held = f"runs {', '.join(map(str, ids))}" if ids else "no runs yet"
            context.abort(grpc.StatusCode.NOT_FOUND, f"run {run_id} is not in the round store, which holds {held}")

    def _round(self, run_id: int, number: int, context: grpc.ServicerContext) -> StoredRound:
        rows = self.store.rounds(run_id)
        for row in rows:
            if row.number == number:
                return row
        context.abort(grpc.StatusCode.NOT_FOUND, f"run {run_id} has no round {number}; {_stored(rows)}")

    def _last_round(self, run_id: int, context: grpc.ServicerContext) -> int:
        rows = self.store.rounds(run_id)
        if not rows:
            context.abort(grpc.StatusCode.NOT_FOUND, f"run {run_id} has no stored round yet (round 0, before "
                          f"training, is not stored); follow it with `pollinate status {run_id} --follow`")
        return rows[-1].number


def _stored(rows: list[StoredRound]) -> str:
    numbers = [r.number for r in rows]
    if not numbers:
        return "it has no stored round yet"
    contiguous = numbers == list(range(numbers[0], numbers[-1] + 1))
    return f"its stored rounds are {numbers[0]}..{numbers[-1]}" if contiguous else f"its stored rounds are {numbers}"


@dataclass
class StatusServer:
    """A running status service; ``stop()`` ends open streams and the server."""

    server: grpc.Server
    port: int
    stopping: threading.Event

    def stop(self, grace_s: float = 1.0) -> None:
        self.stopping.set()
        self.server.stop(grace_s).wait()


class StatusTLS(Protocol):
    """Where the status service's TLS comes from: a ``pollinate certs`` directory, or the SuperLink's own files."""

    def status_server_credentials(self) -> grpc.ServerCredentials: ...


def serve_status(store_url: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, tls: StatusTLS | None = None,
                 poll_interval_s: float = 1.0, max_streams: int = 16, insecure: bool = False) -> StatusServer:
    """Start the status service on ``host:port`` (port 0: a free one, see ``.port``).

    With ``tls`` the service uses the deployment's server certificate and requires a client
    certificate signed by the same CA (``pollinate certs`` writes one for operators). Without it, a
    non-loopback ``host`` is refused unless ``insecure``: it serves adapters, per-node metrics and the config.
    """
    check_exposure(host, tls is not None, insecure, "the status service (adapters, per-node metrics, the config)")
    if not 0.05 <= poll_interval_s <= 60:
        raise ValueError(f"poll_interval_s = {poll_interval_s}: use 0.05..60 seconds")
    store, stopping = RoundStore(store_url), threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="pollinate-status"))
    pb_grpc.add_PollinateStatusServicer_to_server(StatusService(store, poll_interval_s, stopping), server)
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.status_server_credentials())
    if bound == 0:
        raise OSError(f"the status service cannot listen on {address}; pick a free port")
    server.start()
    return StatusServer(server, bound, stopping)
