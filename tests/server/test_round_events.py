"""Progress inside a round: the round loop's events, in order, and how they reach a terminal or a log."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pollinate.server.progress_view import ProgressView
from pollinate.server.round_events import EVENTS_ENV, RoundEvent, emit, parse_line
from rich.console import Console


@pytest.fixture(scope="module")
def events(recorded_run) -> list[RoundEvent]:
    """Every event of a real 2-round run of the real ServerApp against 4 real ClientApps, in this process."""
    return recorded_run[2]


def _exchanges(events: list[RoundEvent], number: int) -> list[str]:
    return [e.exchange for e in events if e.kind == "exchange-start" and e.round == number]


def test_a_run_emits_its_rounds_and_exchanges_in_order(events: list[RoundEvent]) -> None:
    assert events[0].kind == "say" and events[0].text.startswith("[bold]pollinate[/] run ")
    assert _exchanges(events, 0) == ["evaluate"]  # the initial evaluation, before round 1
    assert _exchanges(events, 1) == ["query", "train", "evaluate"]  # new nodes are asked their capacity once
    assert _exchanges(events, 2) == ["train", "evaluate"]
    for number in (1, 2):
        start = next(i for i, e in enumerate(events) if e.kind == "round-start" and e.round == number)
        end = next(i for i, e in enumerate(events) if e.kind == "round-end" and e.round == number)
        assert events[start].rounds == 2
        inside = events[start + 1:end]
        assert inside and all(e.round == number and e.kind.startswith(("exchange", "reply")) for e in inside)
        assert events[end + 1].kind == "say" and events[end + 1].text.startswith(f"round {number}/2: 4/4 updates")
        assert events[end].seconds > 0
    # Each exchange: start, replies growing to the nodes asked, end; never a reply outside an exchange.
    open_exchange = None
    for e in events:
        if e.kind == "exchange-start":
            assert open_exchange is None
            open_exchange, done = e, 0
        elif e.kind == "reply":
            assert open_exchange is not None and e.exchange == open_exchange.exchange and done < e.done <= e.total
            done = e.done
        elif e.kind == "exchange-end":
            assert open_exchange is not None and e.done == e.total == open_exchange.total == 4 == done
            open_exchange = None
    assert events[-1].kind == "say" and "completed; adapter exported to" in events[-1].text


def test_output_that_is_not_a_terminal_gets_the_round_lines_and_no_control_codes(events) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80, highlight=False)
    with ProgressView(console) as view:
        for e in events:
            view(e)
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == ["round 0", "round 1/2", "round 2/2"]
    header = next(line for line in lines if line.startswith("pollinate run "))
    assert len(header) > 80 and header.endswith("2 rounds, store " + header.split("store ")[-1])  # one line, unwrapped


def test_a_terminal_gets_a_progress_line_with_the_exchange_and_nodes_done(events) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, highlight=False)
    frames = []
    with ProgressView(console) as view:
        for e in events:
            view(e)
            if e.kind == "reply" and e.exchange == "train" and e.round == 2:
                view.progress.refresh()
                frames.append(out.getvalue())
    assert frames and "round 2/2: train" in frames[-1] and "4/4" in frames[-1] and "run ETA" in frames[-1]
    assert "\x1b" in out.getvalue()


def test_across_processes_events_travel_as_lines_and_come_back_the_same(monkeypatch, capsys) -> None:
    # The ServerApp under the SuperLink prints its events (POLLINATE_EVENTS=lines); `pollinate server` reads them
    # back from `flwr log --stream`, whatever Flower puts before them.
    monkeypatch.setenv(EVENTS_ENV, "lines")
    sent = [RoundEvent("round-start", round=3, rounds=5), RoundEvent("reply", round=3, exchange="train", done=2,
                                                                      total=4), RoundEvent("say", text="round 3/5: ok")]
    for e in sent:
        emit(e)
    printed = capsys.readouterr().out.splitlines()
    assert [parse_line("INFO :      " + line) for line in printed] == sent
    out = io.StringIO()
    view = ProgressView(Console(file=out, force_terminal=False))
    view.line(printed[2])
    view.line("a line Flower printed itself\n")
    view.line("@pollinate-event {not json")
    assert out.getvalue().splitlines() == ["round 3/5: ok", "a line Flower printed itself",
                                           "@pollinate-event {not json"]
    assert parse_line("@pollinate-event " + '{"kind": "unknown"}') is None


def test_nobody_listening_prints_only_the_lines_for_people(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.delenv(EVENTS_ENV, raising=False)
    emit(RoundEvent("reply", round=1, exchange="train", done=1, total=2))
    emit(RoundEvent("say", text="round 1/2: [bold]done[/]"))
    assert capsys.readouterr().out == "round 1/2: done\n"
