"""The Flower daemons pollinate starts (SuperLink, SuperNode, ``flwr``), and how they stop.

Flower detaches some of its own children (the SuperExec and the ServerApp it spawns run in their
own sessions), so stopping a process group is not enough: ``Daemon.stop`` signals the whole
process tree (psutil), SIGTERM first, SIGKILL after a grace period. Every process is stopped by
PID, never by name, so other Flower processes on the machine are never touched. A process that
cannot stop its daemons (SIGKILL, the OOM killer) still does not leave them running: on Linux each
daemon is SIGTERMed by the kernel when the thread that started it dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, NoReturn

import httpx
import psutil

from pollinate.proto.run_config import ConfigError


def executable(name: str) -> str:
    """A Flower console script from this environment (beside the running Python), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` is not installed; install pollinate into this environment "
                          f"(`pip install -e .`), which brings flwr 1.42 and its `{name}` command")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process we start: its own FLWR_HOME (never ~/.flwr), no telemetry,
    and this environment's scripts first on PATH (the SuperLink starts ``flower-superexec`` by name)."""
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def require_free_port(host: str, port: int, what: str, flag: str) -> None:
    """Fail fast, saying what to do, when ``host:port`` is taken (e.g. by an earlier SuperLink)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers bind (SO_REUSEADDR): a listener blocks us, closed connections in TIME_WAIT do not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"{host}:{port} is in use ({e.strerror}), so the {what} cannot listen there; stop the "
                              f"process holding it (`ss -ltnp | grep {port}`) or choose another {flag}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout_s: float, verify: str | bool = True, alive: Daemon | None = None) -> bool:
    """Poll a Flower HTTP API's ``/health`` until it answers (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive.running():
            return False
        try:
            if httpx.get(f"{url}/health", timeout=2.0, verify=verify).is_success:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (Flower starts its SuperExec and apps in sessions of their own)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child SIGTERMed when this thread of this process dies, or None where that
    cannot be asked (not Linux, or not the main thread: the kernel ties the signal to the forking thread).

    The libc function is looked up here, in the parent, so the child only makes one system call between fork and
    exec; a parent that died before the call is noticed (the child's parent is then another process) and the
    child exits at once."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return arm


class Daemon:
    """One started process (and, when stopped, every process it started). It does not outlive the thread that
    started it (``dies_with_parent``)."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log: IO[str] | int | None = None) -> None:
        """``log``: where its output goes (stdout and stderr): a file, ``subprocess.PIPE`` (read ``process.stdout``),
        or None (this process's own)."""
        self.name = name
        # Its own session: a Ctrl-C in the terminal reaches us, and we stop it in order.
        self.process = subprocess.Popen(list(args), env=env, stdout=log,
                                        stderr=subprocess.STDOUT if log is not None else None, start_new_session=True,
                                        preexec_fn=dies_with_parent())

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process and all its descendants, SIGKILL whatever is left after ``grace_s``."""
        end_tree(self.pid, grace_s)
        self.process.poll()


def end_tree(pid: int, grace_s: float) -> None:
    """End a process and every descendant: SIGTERM, then SIGKILL what is left after ``grace_s``.

    ``grace_s = 0`` is a crash: SIGKILL at once, so nothing gets to clean up (what the fault tests need).
    """
    tree = process_tree(pid)
    alive = tree
    if grace_s > 0:
        _signal(tree, psutil.Process.terminate)
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
    _signal(alive, psutil.Process.kill)
    psutil.wait_procs(alive, timeout=max(grace_s, 30.0))


def _signal(processes: Sequence[psutil.Process], send: Callable[[psutil.Process], None]) -> None:
    for p in processes:
        try:
            send(p)
        except psutil.NoSuchProcess:
            pass


def stop_on_sigterm() -> None:
    """SIGTERM (`docker stop`, systemd) unwinds like Ctrl-C, so every process we started is stopped by PID."""
    def interrupt(signum: int, frame: object) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
