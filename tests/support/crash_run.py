"""A coordinator that dies where ``POLLINATE_CRASH_AT`` says: ``python -m tests.support.crash_run WORKDIR CLIENTS
OVERRIDES_JSON`` runs tiny.toml in process (tests/support/inprocess.py) with a 1 s lease, so that a resume may
take the dead coordinator's run over soon after."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.support.inprocess import run_in_process

CRASH_LEASE_TTL_S = 1.0

if __name__ == "__main__":
    workdir, clients, overrides = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    run_in_process("tiny.toml", workdir, clients, lease_ttl_s=CRASH_LEASE_TTL_S, **overrides)
