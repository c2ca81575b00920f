"""Deterministic crash points, for proving crash safety (light: stdlib only).

With `PIPELINE_CRASH_AT=N` in the environment, the process kills itself with SIGKILL when it passes its
N-th crash point, exactly as `kill -9` would. `PIPELINE_CRASH_LOG=FILE` appends each point's name as it is
passed, so a test can count the points of an uninterrupted run and aim kills at every phase. Unset, a
crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_passed = 0


def crashpoint(name: str) -> None:
    global _passed
    target = os.environ.get("PIPELINE_CRASH_AT")
    log = os.environ.get("PIPELINE_CRASH_LOG")
    if not target and not log:
        return
    _passed += 1
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{_passed} {os.getpid()} {name}\n")
    if target and _passed == int(target):
        os.kill(os.getpid(), signal.SIGKILL)
