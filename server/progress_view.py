"""The round loop's events (``server.round_events``) on the user's terminal, for ``simulate`` and ``server``.

On a terminal: a rich progress line under the round lines, with the exchange under way, nodes done / asked, the
round's elapsed time and an ETA for the run from the rounds before. Anywhere else (a pipe, a log file, CI): only
the lines for people, one per round as before, and no control codes.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, \
    TimeElapsedColumn
from rich.text import Text

from pollinate.server.round_events import RoundEvent, parse_line


class RunEtaColumn(ProgressColumn):
    """Time left in the run: the mean of the rounds so far x the rounds left, less this round's elapsed time."""

    def render(self, task: Task) -> Text:
        left = task.fields.get("run_left_s")
        if left is None:
            return Text("ETA after round 1", style="progress.remaining")
        remaining = max(0.0, left - (time.monotonic() - task.fields["round_started"]))
        return Text(f"run ETA {int(remaining) // 60}:{int(remaining) % 60:02d}", style="progress.remaining")


class ProgressView:
    """A listener of round events (``round_events.listen``) that draws them on ``console``; a context manager."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.durations: list[float] = []  # completed rounds' seconds, for the ETA
        self.round, self.rounds = 0, 0
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("nodes"), TimeElapsedColumn(), RunEtaColumn(), console=console,
                                 transient=True)
        self.task = self.progress.add_task("waiting for nodes", total=None, visible=False, run_left_s=None,
                                           round_started=time.monotonic())

    def __enter__(self) -> ProgressView:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.live:
            self.progress.stop()

    def __call__(self, event: RoundEvent) -> None:
        if event.kind == "say":
            self.console.print(event.text, soft_wrap=True)  # never wrapped mid-phrase: the terminal wraps
        elif not self.live:
            return
        elif event.kind == "round-start":
            self.round, self.rounds = event.round, event.rounds
            left = (sum(self.durations) / len(self.durations) * (event.rounds - event.round + 1)
                    if self.durations else None)
            self.progress.reset(self.task, total=None, completed=0, visible=True, description=self._label("starting"),
                                run_left_s=left, round_started=time.monotonic())
        elif event.kind in ("exchange-start", "reply", "exchange-end"):
            if event.round == 0 and event.kind == "exchange-start":  # the initial evaluation, before round 1
                self.progress.reset(self.task, visible=True, round_started=time.monotonic())
            self.progress.update(self.task, total=event.total, completed=event.done, visible=True,
                                 description=self._label(event.exchange, event.round))
        elif event.kind == "round-end":
            self.durations.append(event.seconds)
            self.progress.update(self.task, visible=False)
        if self.live:  # now, not at the next auto-refresh: a line printed next would redraw a stale bar under it
            self.progress.refresh()

    def line(self, text: str) -> None:
        """One line of a coordinator's output (``flwr log --stream``): its event, or the line as it is."""
        event = parse_line(text)
        if event is not None:
            self(event)
        elif text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)

    def _label(self, exchange: str, number: int | None = None) -> str:
        number = self.round if number is None else number
        where = "initial evaluation" if number == 0 else f"round {number}/{self.rounds}"
        return f"{where}: {exchange}"
