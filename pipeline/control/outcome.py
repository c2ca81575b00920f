"""How one invocation ends, as a distinct exit code for cron: done, waiting on the provider, budget exceeded, stopped.

Some of our tasks end on purpose: a submission the budget refuses (`BudgetExceeded`) and a stop (`StopRequested`)
raise, and Luigi records them as failed; a part whose job is still running in non-blocking mode is left pending on
an external dependency (`PollJob` yields `JobRunning`), so Luigi and luigid show it pending, not failed. Each such
outcome, and every real failure, is recorded with its first message line as a small file
`run_<rid>/.outcomes/<session>.<kind>.<n>` by the process that ran the task (with `--workers N` that is a child).
When the graph has run, the runner (`pipeline.control.runner`) turns the kinds into one code: any other failure
keeps Luigi's code; else budget > stopped > waiting. A finished run is 0.

The session is the root process's pid: forked workers inherit it, and two invocations on one run never mix. A process
not started by the runner (a plain `luigi` command) has no session: it records nothing and exits with Luigi's code.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from pipeline.control import exit_codes
from pipeline.control.layout import RunLayout
from pipeline.providers.errors import ServerDown
from targets.atomic import pid_alive

log = logging.getLogger("pipeline")

WAITING, BUDGET, STOPPED, UNAVAILABLE, FAILED = "waiting", "budget", "stopped", "unavailable", "failed"
_CODES = {BUDGET: exit_codes.BUDGET_EXCEEDED, STOPPED: exit_codes.STOPPED, UNAVAILABLE: exit_codes.UNAVAILABLE,
          WAITING: exit_codes.WAITING}
_session: dict[str, int | bool] = {"pid": 0, "no_wait": False, "controlled": False}
MESSAGE_CHARS = 300


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
    if isinstance(exc, ServerDown):
        return UNAVAILABLE
    return FAILED


def _dir(layout: RunLayout) -> Path:
    return layout.run_dir / ".outcomes"


def record_failure(layout: RunLayout, exc: BaseException) -> None:
    """Remember why a task of this invocation failed, or waits (called in whichever process ran it; the first line
    of the message is kept for the summary); never raises."""
    if not _session["pid"]:
        return
    try:
        folder = _dir(layout)
        folder.mkdir(parents=True, exist_ok=True)
        message = (str(exc).splitlines() or [type(exc).__name__])[0][:MESSAGE_CHARS]
        (folder / f"{_session['pid']}.{kind_of(exc)}.{uuid.uuid4().hex[:12]}").write_text(message, encoding="utf-8")
    except OSError as err:
        log.warning("could not record the outcome of a failed task (%s); the exit code may be Luigi's", err)


def collect(layout: RunLayout) -> dict[str, list[str]]:
    """`{kind: [message, …]}` recorded by this session; their files are removed (and those of sessions that died)."""
    kinds: dict[str, list[str]] = {}
    folder = _dir(layout)
    if not folder.is_dir():
        return kinds
    for path in sorted(folder.iterdir()):
        session, _, rest = path.name.partition(".")
        if session == str(_session["pid"]):
            try:
                message = path.read_text(encoding="utf-8")
            except OSError:
                message = ""
            kinds.setdefault(rest.partition(".")[0], []).append(message)
            path.unlink(missing_ok=True)
        elif session.isdigit() and not pid_alive(int(session)):
            path.unlink(missing_ok=True)
    return kinds


def control_active(active: bool) -> None:
    """Mark this process as run by `pipeline.control.runner` (which owns signals, stop, sweeps and the exit code)."""
    _session["controlled"] = active


def session_pid() -> int:
    """The runner's pid for this invocation (inherited by forked workers); 0 outside the runner."""
    return int(_session["pid"])


def controlled() -> bool:
    return bool(_session["controlled"])


def begin(layout: RunLayout, *, wait: bool = True) -> None:
    """Start this process's session on the run: failures are recorded from now on (for the exit code)."""
    _session["pid"], _session["no_wait"] = os.getpid(), not wait


def expected(exc: BaseException) -> bool:
    """Waiting, a stop, the budget or a server that does not answer: conditions the run reports in one line, not
    failures with a traceback."""
    return kind_of(exc) != FAILED


def exit_code(kinds: set[str], stop_requested: bool) -> int | None:
    """The code for an unfinished run whose failed tasks had `kinds`; None keeps Luigi's own code."""
    if FAILED in kinds:
        return None
    if stop_requested:
        kinds = kinds | {STOPPED}
    for kind in (BUDGET, STOPPED, UNAVAILABLE, WAITING):
        if kind in kinds:
            return _CODES[kind]
    return None


MESSAGES = {exit_codes.WAITING: "waiting on the provider: run the same command again later to continue",
            exit_codes.STOPPED: "stopped; run the same command again to resume",
            exit_codes.UNAVAILABLE: "the provider's server does not answer: nothing was lost; run the same command "
                                    "again once it is up",
            exit_codes.BUDGET_EXCEEDED: "budget reached: nothing more was submitted (raise budget.max_usd and "
                                        "re-run with --accept-config-drift to continue)"}
