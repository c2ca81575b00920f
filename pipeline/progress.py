"""Progress of long steps: Luigi's status message and percentage (shown by the luigid visualiser) and, when stderr
is a terminal, a one-line progress bar.

Reports are throttled: Luigi's setters are an RPC to the scheduler under luigid, and a bar redrawn for every row
would cost more than the work. The first and the last report always go out.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

LUIGI_EVERY_S = 2.0
BAR_EVERY_S = 0.2
BAR_WIDTH = 30


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[#########.....]  45%` for done/total (a total of 0 reads as complete)."""
    fraction = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%"


def wants_bar(stream: TextIO) -> bool:
    """Bars only for a person at a terminal: not under CI, cron, pipes or log files."""
    return stream.isatty() and not os.environ.get("CI") and os.environ.get("TERM") != "dumb"


class Progress:
    """Report `done` of `total` units of one step of `task` (any object with Luigi's two setters, or None).

    `terminal=False` reports to Luigi only (waiting on a remote job is not local work worth a bar).
    """

    def __init__(self, task: Any, what: str, total: int, *, unit: str = "", terminal: bool = True,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.task, self.what, self.total, self.unit = task, what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.show_bar = terminal and wants_bar(self.stream)
        self.clock = clock
        self._luigi_at = self._bar_at = -float("inf")

    def update(self, done: int, note: str = "", *, force: bool = False) -> None:
        now = self.clock()
        last = force or done >= self.total
        if last or now - self._luigi_at >= LUIGI_EVERY_S:
            self._luigi_at = now
            self._to_luigi(done, note)
        if self.show_bar and (last or now - self._bar_at >= BAR_EVERY_S):
            self._bar_at = now
            end = "\n" if done >= self.total else ""
            unit = f" {self.unit}" if self.unit else ""
            self.stream.write(f"\r{self.what} {bar(done, self.total)} {done:,}/{self.total:,}{unit} {note}"[:200] + end)
            self.stream.flush()

    def _to_luigi(self, done: int, note: str) -> None:
        setter = getattr(self.task, "set_status_message", None)
        if callable(setter):
            unit = f" {self.unit}" if self.unit else ""
            setter(f"{self.what}: {done:,}/{self.total:,}{unit}" + (f" ({note})" if note else ""))
        percent = getattr(self.task, "set_progress_percentage", None)
        if callable(percent):
            percent(100 if self.total <= 0 else int(100 * min(done, self.total) / self.total))
