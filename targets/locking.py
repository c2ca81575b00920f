"""What `targets.store` and `targets.lifecycle` share: the manifest error, the file lock, the rebuild context type.

Its own module so that `store` can import `lifecycle` at module top while `lifecycle` imports only this (no cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

# A trial manifest's rebuild context: called only when a corrupt manifest must be rebuilt (see `targets.lifecycle`).
Context = Callable[[], dict[str, Any]]
LOCK_TIMEOUT_S = 120


class ManifestError(ValueError):
    """A manifest that exists but cannot be used; the message names the file and what to do."""


def lock_for(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
