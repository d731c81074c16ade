"""Named points in the round loop where a test can make the coordinator die at once, as kill -9 would.

``POLLINATE_CRASH_AT=<point>`` in the coordinator's environment ends its process with ``os._exit`` (no
exception handler, no ``finally``, no flush of the store: what a power cut leaves) when it reaches that
point. Unset, as in every real run, each point is one environment lookup.
"""

from __future__ import annotations

import os

CRASH_ENV = "POLLINATE_CRASH_AT"
CRASH_EXIT_CODE = 86
AFTER_AGGREGATION = "after-aggregation"  # the new adapter exists only in this process's memory
AFTER_COMMIT = "after-commit"  # the round, adapter and ledger are stored; no node has the new adapter yet
POINTS = (AFTER_AGGREGATION, AFTER_COMMIT)


def crash_point(name: str) -> None:
    """Die here (exit code ``CRASH_EXIT_CODE``) when ``POLLINATE_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT_CODE)
