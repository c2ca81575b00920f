"""How one invocation ends, as a distinct exit code for cron: done, waiting on the provider, budget exceeded, stopped.

Luigi reports every task that raised as failed (30). Some of our tasks raise on purpose: a part whose job is still
running in non-blocking mode (`WaitingOnProvider`), a submission the budget refuses (`BudgetExceeded`), a stop
(`StopRequested`). Each failure is recorded as a small file `run_<rid>/.outcomes/<session>.<kind>.<n>` by the
process that ran the task (with `--workers N` that is a child), and at exit the invocation's root process turns the
kinds into one code: any other failure keeps Luigi's code; else budget > stopped > waiting. A finished run is 0.

The session is the root process's pid: forked workers inherit it, and two invocations on one run never mix.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline import exit_codes
from pipeline.layout import RunLayout
from targets.atomic import pid_alive

log = logging.getLogger("pipeline")

WAITING, BUDGET, STOPPED, FAILED = "waiting", "budget", "stopped", "failed"
_CODES = {BUDGET: exit_codes.BUDGET_EXCEEDED, STOPPED: exit_codes.STOPPED, WAITING: exit_codes.WAITING}
_session: dict[str, int | bool] = {"pid": 0, "no_wait": False}


class WaitingOnProvider(RuntimeError):
    """Non-blocking mode: the part's job is still running remotely; its state is recorded, the next run continues."""


class BudgetExceeded(RuntimeError):
    """Submitting the part would take the run's committed cost past `budget.max_usd`."""


class StopRequested(RuntimeError):
    """A stop was requested (`python -m pipeline stop`, SIGINT, SIGTERM): nothing new is sent; state is saved."""


def no_wait() -> bool:
    """True when this invocation checks running jobs once instead of waiting for them (`--no-wait`)."""
    return bool(_session["no_wait"])


def kind_of(exc: BaseException) -> str:
    if isinstance(exc, WaitingOnProvider):
        return WAITING
    if isinstance(exc, BudgetExceeded):
        return BUDGET
    if isinstance(exc, StopRequested):
        return STOPPED
    return FAILED


def _dir(layout: RunLayout) -> Path:
    return layout.run_dir / ".outcomes"


def record_failure(layout: RunLayout, exc: BaseException) -> None:
    """Remember why a task of this invocation failed (called in whichever process ran it); never raises."""
    if not _session["pid"]:
        return
    try:
        folder = _dir(layout)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{_session['pid']}.{kind_of(exc)}.{uuid.uuid4().hex[:12]}").touch()
    except OSError as err:
        log.warning("could not record the outcome of a failed task (%s); the exit code may be Luigi's", err)


def _collect(layout: RunLayout) -> set[str]:
    """The kinds recorded by this session; their files are removed (and those of sessions that died)."""
    kinds: set[str] = set()
    folder = _dir(layout)
    if not folder.is_dir():
        return kinds
    for path in folder.iterdir():
        session, _, rest = path.name.partition(".")
        if session == str(_session["pid"]):
            kinds.add(rest.partition(".")[0])
            path.unlink(missing_ok=True)
        elif session.isdigit() and not pid_alive(int(session)):
            path.unlink(missing_ok=True)
    return kinds


def begin(layout: RunLayout, finished: Callable[[], bool], *, wait: bool = True) -> None:
    """Start this process's session on the run: failures are recorded from now on, and at exit the process
    exits with the code that says how the run stands (unless it finished, or Luigi's own code says more)."""
    _session["pid"], _session["no_wait"] = os.getpid(), not wait
    atexit.register(_exit, layout, finished)


def exit_code(kinds: set[str], stop_requested: bool) -> int | None:
    """The code for an unfinished run whose failed tasks had `kinds`; None keeps Luigi's own code."""
    if FAILED in kinds:
        return None
    if stop_requested:
        kinds = kinds | {STOPPED}
    for kind in (BUDGET, STOPPED, WAITING):
        if kind in kinds:
            return _CODES[kind]
    return None


def _exit(layout: RunLayout, finished: Callable[[], bool]) -> None:
    kinds = _collect(layout)
    if os.getpid() != _session["pid"]:
        return
    if finished():
        # Under luigid Luigi exits 10 (run by another worker), 20 or 25 when another worker process ran some of this
        # invocation's tasks, although every requested report is current: that is a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_codes.OK)
    code = exit_code(kinds, layout.stop_file.exists())
    if code is None:
        return
    messages = {exit_codes.WAITING: "waiting on the provider: run the same command again later to continue",
                exit_codes.STOPPED: "stopped; run the same command again to resume",
                exit_codes.BUDGET_EXCEEDED: "budget reached: nothing more was submitted (raise budget.max_usd and "
                                            "re-run with --accept-config-drift to continue)"}
    log.warning("run %s %s (exit %d)", layout.rid, messages[code], code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
