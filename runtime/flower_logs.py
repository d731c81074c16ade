"""Flower log lines that are not news to a pollinate user, and the filter that drops them where they are logged."""

from __future__ import annotations

import logging

# The Simulation Engine ends every ClientApp actor with a WARNING "Manually terminating ClientAppActor"
# (flwr/simulation/ray_transport/ray_actor.py), which Ray forwards to the driver's console: one per actor at the end
# of every healthy run. It is the normal end of a simulation, not a warning.
ROUTINE = ("Manually terminating %s",)


class _DropRoutine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in ROUTINE


def quiet_routine_flower_logs() -> None:
    """Drop ``ROUTINE`` lines from Flower's logger in this process (idempotent).

    Called where the line is logged: a Ray actor process imports the ClientApp before it handles its first message,
    and it is the actor's own logger that would say it (Ray has no hook here: Flower owns ``ray.init``).
    """
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropRoutine) for f in logger.filters):
        logger.addFilter(_DropRoutine())
