"""The daemons pollinate starts (SuperNode, warm worker, SuperLink) do not outlive the process that started
them, even when it cannot stop them: a `pollinate client` killed with SIGKILL (or by the OOM killer) must not
leave its SuperNode connecting to the federation on its own. Real processes: a parent that starts a ``Daemon``
and is then SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from pollinate.runtime.processes import end_tree
from tests.support.processes import poll

PARENT = textwrap.dedent("""
    import os, sys, time
    from pollinate.runtime.processes import Daemon
    daemon = Daemon("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ))
    print(daemon.pid, flush=True)
    time.sleep(120)
""")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # ended, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_daemon_ends_when_the_process_that_started_it_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = None
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not gone(child) and psutil.Process(child).ppid() == parent.pid
        os.kill(parent.pid, signal.SIGKILL)  # no handler, no `finally`: only the kernel can stop the daemon now
        parent.wait(timeout=10)
        assert poll("the orphaned daemon to end", lambda: gone(child) or None, timeout_s=10.0, every_s=0.1)
    finally:
        end_tree(parent.pid, grace_s=0)
        if child is not None:
            end_tree(child, grace_s=0)
