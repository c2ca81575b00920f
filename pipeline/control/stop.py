"""Cooperative stop: `python -m pipeline stop`, SIGINT and SIGTERM.

A stop writes `run_<rid>/STOP_REQUESTED`; tasks check it before every remote create and while polling, and
raise instead of sending anything new. State is already persisted (every change is written as it happens),
so the next run resumes where this one stopped. A request applies to the invocations that were running when it was
made: one whose file is older than this process's session (`begin_session`, else the import of this module) is
ignored, so a new invocation never has to delete it — and a refused or read-only one never does.
The runner removes a request once the run is finished (`pipeline.control.runner`), and a stopped process exits with
`exit_codes.STOPPED`.
"""

from __future__ import annotations

import logging
import os
import time

from pipeline.control.layout import RunLayout
from targets.atomic import write_text
from targets.manifest import utcnow

log = logging.getLogger("pipeline")
_stopping: list[RunLayout] = []
_session = {"started_ns": time.time_ns()}


def begin_session() -> None:
    """From now on, only stop requests made from now on apply to this process (and the workers it forks)."""
    _session["started_ns"] = time.time_ns()


def request_stop(layout: RunLayout, reason: str = "requested") -> None:
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    write_text(layout.stop_file, f"{utcnow()} {reason}\n")


def stop_requested(layout: RunLayout) -> bool:
    """True when a stop was requested for the run since this process's session began."""
    try:
        made_ns = os.stat(layout.stop_file).st_mtime_ns
    except OSError:
        return False
    if made_ns < _session["started_ns"]:
        return False
    if layout not in _stopping:
        _stopping.append(layout)
        log.warning("stop requested for run %s (%s): no new submissions", layout.rid, layout.stop_file)
    return True


def clear_stop(layout: RunLayout) -> None:
    """Remove the stop request of a run that is finished (only the runner calls this)."""
    if layout.stop_file.exists():
        layout.stop_file.unlink(missing_ok=True)
        log.info("cleared stop request of run %s (the run is finished)", layout.rid)
