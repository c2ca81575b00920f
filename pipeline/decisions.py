"""`decision`: the one log line per idempotency decision (skip / run / re-attach / repair ...), with its reason."""

from __future__ import annotations

import logging

log = logging.getLogger("pipeline")
_logged: set[tuple[str, str]] = set()


def decision(verb: str, what: str, reason: str) -> None:
    """One log line per idempotency decision, printed once per process.

    A "skip" after a "run" / "re-run" of the same task is the post-run completeness check, not a decision.
    """
    if (what, verb) in _logged or (verb == "skip" and any((what, v) in _logged for v in ("run", "re-run"))):
        return
    _logged.add((what, verb))
    log.info("%s %s (%s)", verb, what, reason)
