"""Cooperative stop: `python -m pipeline stop --rid X`, SIGINT and SIGTERM.

A stop writes `run_<rid>/STOP_REQUESTED`; tasks check it before every remote create and while polling, and
raise instead of sending anything new. State is already persisted (every change is written as it happens),
so the next run resumes where this one stopped; it removes the sentinel when it starts.
The process then exits with `exit_codes.STOPPED` (see `pipeline.outcome`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

from pipeline import exit_codes
from pipeline.layout import RunLayout
from targets.atomic import write_text
from targets.manifest import utcnow

log = logging.getLogger("pipeline")
_stopping: list[RunLayout] = []


def request_stop(layout: RunLayout, reason: str = "requested") -> None:
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    write_text(layout.stop_file, f"{utcnow()} {reason}\n")


def stop_requested(layout: RunLayout) -> bool:
    if layout.stop_file.exists():
        if layout not in _stopping:
            _stopping.append(layout)
            log.warning("stop requested for run %s (%s): no new submissions", layout.rid, layout.stop_file)
        return True
    return False


def clear_stop(layout: RunLayout) -> None:
    """A new invocation starts by clearing an old sentinel: a stop applies to the run that was going on."""
    if layout.stop_file.exists():
        layout.stop_file.unlink(missing_ok=True)
        log.info("cleared stop request of run %s (a new invocation resumes it)", layout.rid)


def install_signal_handlers(layout: RunLayout) -> None:
    """SIGINT / SIGTERM write the sentinel instead of killing mid-write; a second signal exits at once.

    The exit code of a stopped run is decided by `pipeline.outcome` at exit.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        if layout.stop_file.exists():
            os._exit(exit_codes.STOPPED)
        request_stop(layout, signal.Signals(signum).name)
        log.warning("%s: stopping run %s after the current step (signal again to exit at once)",
                    signal.Signals(signum).name, layout.rid)

    if sys.platform != "win32":
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
