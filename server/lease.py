"""The run lease: one live coordinator per run, named in the store, kept alive by a heartbeat.

A coordinator takes the run's lease by compare-and-set (``RoundStore.acquire_lease``): it gets it when
nobody holds it or the holder's lease expired, i.e. that coordinator stopped renewing it (it died, or lost
the database for longer than the lease). A second coordinator on a live run is refused with the holder's
id. Every round is stored only while the lease is held (``record_round`` renews it in the same transaction:
a fence), so a coordinator that lost its lease cannot write beside its successor.

The expiry is computed from each coordinator's clock (UTC); clocks of coordinators that may take over from
each other must agree to well within ``LEASE_TTL_S``.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from datetime import UTC, datetime

from pollinate.server.store import LeaseHeld, RoundStore, StoreError

LEASE_TTL_S = 60.0  # the default of store.lease-ttl: a dead coordinator's run is resumable this long after
HEARTBEAT_S = LEASE_TTL_S / 4  # a heartbeat every quarter: three renewals may fail before the lease runs out


def holder_id() -> str:
    """This coordinator's lease id: where it runs (host, pid) so an operator can find it, plus a unique part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RunLease:
    """This coordinator's hold on one run: renewed every ``heartbeat_s`` by a daemon thread until ``release``."""

    def __init__(self, store: RoundStore, run_id: int, holder: str, ttl_s: float = LEASE_TTL_S,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.store, self.run_id, self.holder, self.ttl_s = store, run_id, holder, ttl_s
        self.lost: str | None = None  # why the heartbeat lost the lease, once it did
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"pollinate-lease-{run_id}")

    def start(self) -> RunLease:
        self._thread.start()
        return self

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.store.renew_lease(self.run_id, self.holder, self.ttl_s)
            except LeaseHeld as e:
                self.lost = str(e)
                return
            except StoreError:
                continue  # the store is down for now; the round's own write will tell (and retry)

    def release(self) -> None:
        """Stop the heartbeat (the lease itself is released by ``finish_run`` or left to expire)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def refuse_live_run(store: RoundStore, run_id: int) -> None:
    """``LeaseHeld`` (naming the holder) when a live coordinator holds ``run_id``: checked by a command before it
    starts anything; the compare-and-set itself happens when the ServerApp takes the lease."""
    holder, expires = store.lease(run_id)
    if holder is not None and expires is not None and expires > datetime.now(UTC):
        raise LeaseHeld(f"run {run_id} is being worked on by coordinator {holder} (its lease runs until "
                        f"{expires:%Y-%m-%d %H:%M:%S} UTC and its heartbeat renews it); stop that coordinator, or, "
                        f"if it died, resume once its lease has expired")
