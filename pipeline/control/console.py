"""What an invocation prints: expected conditions in one line each, real failures with their traceback, and in cron
mode (`--no-wait`) a short summary instead of a line per task.

- Waiting, a stop and the budget are outcomes, not failures: Luigi's "Worker … failed" record with its traceback is
  dropped for them (`ExpectedFailures`), and the runner prints one line per kind, with how many parts and the first
  part's reason (`outcome_lines`).
- In cron mode Luigi's own chatter (scheduling, the execution summary) and the pipeline's per-task decisions are
  held back; warnings and real failures still print, and the run ends with what ran and how it ended
  (`ran_line`), so a cron log reads as a few lines per invocation.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import luigi.execution_summary as summary

from pipeline.control import outcome

LUIGI_LOGGER = "luigi-interface"
WAITING_FAMILY = "JobRunning"  # pipeline.tasks.remote.JobRunning, named here so Luigi's logger never imports tasks
KIND_LINES = {outcome.WAITING: "waiting on the provider", outcome.STOPPED: "stopped",
              outcome.BUDGET: "held back by the budget", outcome.UNAVAILABLE: "not sent, the server does not answer"}


class ExpectedFailures(logging.Filter):
    """Drops Luigi's records of tasks that ended on an expected condition, and its "Data for … does not exist" for
    parts waiting on their remote job: the runner says both in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not outcome.expected(exc)
        args = record.args if isinstance(record.args, tuple) else ()
        return not (args and getattr(args[0], "task_family", None) == WAITING_FAMILY)


def install() -> None:
    logging.getLogger(LUIGI_LOGGER).addFilter(ExpectedFailures())


def quiet() -> None:
    """Cron mode: only warnings and errors from Luigi and the pipeline, for the rest of the process."""
    logging.getLogger(LUIGI_LOGGER).setLevel(logging.WARNING)
    for handler in logging.getLogger("pipeline").handlers:
        handler.setLevel(logging.WARNING)


def outcome_lines(kinds: dict[str, list[str]]) -> list[str]:
    """One line per expected condition met: how many parts, and the first one's reason."""
    lines = []
    for kind, label in KIND_LINES.items():
        messages = kinds.get(kind)
        if messages:
            lines.append(f"{label}: {len(messages)} part(s), e.g. {messages[0]}")
    return lines


def ran_line(worker: Any) -> str:
    """What this invocation ran, by task family, and what it left pending."""
    sets = summary._summary_dict(worker)  # noqa: SLF001 - Luigi's own summary, as plain sets of tasks
    ran = Counter(task.task_family for task in sets["completed"])
    shown = ", ".join(f"{n} {family}" for family, n in sorted(ran.items())) or "nothing"
    pending = sum(1 for task in sets["still_pending_ext"] if task.task_family == WAITING_FAMILY)
    failed = len(sets["failed"])
    tail = (f"; {pending} part(s) pending on running jobs" if pending else "") + (f"; {failed} failed" if failed else "")
    return f"ran {shown}{tail}"
