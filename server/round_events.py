"""What the round loop tells the user while a run goes on: one stream of events, one way to the terminal.

The coordinator says everything through ``say`` (a line for people: the run header, each round's line, warnings)
and ``emit`` (progress: a round or exchange starts, a node's reply arrives, a round ends). Where they go depends
on who listens, and nothing else in the loop knows:

- a listener in this process (``listen``): ``pollinate simulate`` (the Simulation Engine runs the ServerApp in a
  thread of its own process) and the in-process test federation hand every event to ``server.progress_view``;
- nobody here, ``POLLINATE_EVENTS=lines``: the ServerApp runs in ``flwr-serverapp`` under the SuperLink, whose
  output reaches ``pollinate server`` only as text through ``flwr log --stream``. Each event is then one line,
  ``EVENT_PREFIX`` + JSON, which ``pollinate server`` turns back into events (``parse_line``) for the same view;
- nobody at all (the app run by ``flwr run`` directly): the lines for people are printed, as they always were.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from rich.console import Console

EVENTS_ENV = "POLLINATE_EVENTS"  # "lines": print every event as one EVENT_PREFIX line (set by `pollinate server`)
EVENT_PREFIX = "@pollinate-event "
KINDS = ("say", "round-start", "exchange-start", "reply", "exchange-end", "round-end")


@dataclass(frozen=True)
class RoundEvent:
    """One thing that happened: ``kind`` (one of ``KINDS``) and what it carries."""

    kind: str
    round: int = 0  # 0: before round 1 (the initial evaluation)
    rounds: int = 0  # the run's total, on round-start
    exchange: str = ""  # query | train | evaluate | train.secagg_* (exchange-* and reply)
    done: int = 0  # replies in so far (reply, exchange-end)
    total: int = 0  # nodes asked (exchange-*, reply)
    seconds: float = 0.0  # the round's duration (round-end)
    text: str = ""  # say: rich markup for people


Listener = Callable[[RoundEvent], None]
_listeners: list[Listener] = []
_lock = threading.Lock()
_console = Console(highlight=False, soft_wrap=True)  # soft wrap: the terminal wraps, never mid-phrase at 80 columns


@contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Hand every event of this process to ``listener`` while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def emit(event: RoundEvent) -> None:
    """Send ``event`` to the listeners here, else as an event line (``POLLINATE_EVENTS=lines``), else print a
    ``say`` (and drop progress)."""
    with _lock:
        listeners = list(_listeners)
    if listeners:
        for listener in listeners:
            listener(event)
    elif os.environ.get(EVENTS_ENV) == "lines":
        print(EVENT_PREFIX + json.dumps(asdict(event), separators=(",", ":")), flush=True)
    elif event.kind == "say":
        _console.print(event.text)


def say(text: str) -> None:
    """A line for people (rich markup): the run header, a round's line, a warning."""
    emit(RoundEvent("say", text=text))


def parse_line(line: str) -> RoundEvent | None:
    """The event an ``EVENT_PREFIX`` line carries; None for any other line (and for a malformed event line)."""
    start = line.find(EVENT_PREFIX)  # Flower may put its own prefix before the ServerApp's output
    if start < 0:
        return None
    try:
        fields = json.loads(line[start + len(EVENT_PREFIX):])
        event = RoundEvent(**fields)
    except (ValueError, TypeError):
        return None
    return event if event.kind in KINDS else None
