"""Console noise: the Simulation Engine's routine end of each ClientApp actor is not shown as a warning."""

from __future__ import annotations

import logging
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
