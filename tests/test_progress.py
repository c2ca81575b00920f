"""Progress reports: throttled for Luigi, a bar only on a terminal, first and last always sent."""

from __future__ import annotations

import io

from pipeline.progress import LUIGI_EVERY_S, Progress, bar


class FakeTask:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.percents: list[int] = []

    def set_status_message(self, message: str) -> None:
        self.messages.append(message)

    def set_progress_percentage(self, percent: int) -> None:
        self.percents.append(percent)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_renders_the_fraction_and_clamps() -> None:
    assert bar(0, 10, width=10) == "[..........]   0%"
    assert bar(5, 10, width=10) == "[#####.....]  50%"
    assert bar(12, 10, width=10) == "[##########] 100%"
    assert bar(0, 0, width=4) == "[####] 100%"


def test_luigi_reports_are_throttled_but_the_first_and_last_go_out() -> None:
    now = [0.0]
    task = FakeTask()
    progress = Progress(task, "parse", 1000, unit="lines", stream=io.StringIO(), clock=lambda: now[0])
    for step in range(100):  # one update every LUIGI_EVERY_S / 8 (exact in binary), for 100 steps
        now[0] = step * LUIGI_EVERY_S / 8
        progress.update(step * 10)
    progress.update(1000)
    assert task.percents[0] == 0 and task.percents[-1] == 100
    assert len(task.percents) == len(range(0, 100, 8)) + 1
    assert task.messages[-1] == "parse: 1,000/1,000 lines"


def test_a_bar_is_drawn_on_a_terminal_only(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        progress = Progress(None, "score", 4, stream=stream, clock=lambda: 0.0)
        for done in range(5):
            progress.update(done)
    assert tty.getvalue().startswith("\rscore [") and tty.getvalue().endswith("4/4 \n")
    assert pipe.getvalue() == ""
    quiet = Tty()
    Progress(None, "poll", 1, terminal=False, stream=quiet).update(1)
    assert quiet.getvalue() == ""
