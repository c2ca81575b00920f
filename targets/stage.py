"""`StageTarget`: a Luigi target whose `exists()` is a stage's done predicate.

The predicate returns `(done, reason)`; `exists()` never raises: any exception (missing file, unparsable
manifest, wrong types) means "not done", with the reason logged once, so Luigi re-runs (repairs) the
producer instead of giving up on the subtree with a scheduling error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import luigi

log = logging.getLogger("pipeline")

Predicate = Callable[[], tuple[bool, str]]


class StageTarget(luigi.Target):
    """Done when `predicate()` says so; `reason` keeps the last explanation for decision logs."""

    def __init__(self, name: str, predicate: Predicate) -> None:
        self.name = name
        self._predicate = predicate
        self.reason = ""

    def exists(self) -> bool:
        try:
            done, self.reason = self._predicate()
        except (OSError, KeyError) as exc:  # a missing file or record: plainly "not there yet"
            done, self.reason = False, str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        except Exception as exc:  # the contract: a broken artifact is "not done", never a scheduling error
            done, self.reason = False, f"{type(exc).__name__}: {exc}"
        return bool(done)

    def __repr__(self) -> str:
        return f"StageTarget({self.name})"
