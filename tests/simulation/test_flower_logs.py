"""Console noise: the Simulation Engine's routine end of each ClientApp actor is not shown as a warning, and Opacus'
import does not make every library's DEBUG records print."""

from __future__ import annotations

import logging
import subprocess
import sys
from logging import WARNING

from flwr.supercore import log


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_process_that_loads_the_clientapp_drops_only_the_actor_termination_warning() -> None:
    import pollinate.client.app  # noqa: F401 - what a Ray actor imports before its first message

    kept = _Kept()
    logger = logging.getLogger("flwr")
    logger.addHandler(kept)
    try:
        log(WARNING, "Manually terminating %s", "ClientAppActor")  # what flwr's ray_actor.terminate logs
        log(WARNING, "a warning that matters: %s", "node 3 is slow")
    finally:
        logger.removeHandler(kept)
    assert kept.messages == ["a warning that matters: node 3 is slow"]


def test_importing_the_node_leaves_the_root_logger_as_the_program_set_it() -> None:
    # Opacus calls logging.basicConfig() at import; left in place, its root handler printed Flower's DEBUG lines in
    # the console of every command that reads node data. A fresh interpreter, as a command starts.
    code = ("import logging, pollinate.client.data, pollinate.client.dp_sgd; "
            "print(len(logging.getLogger().handlers))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "0", done.stdout + done.stderr
