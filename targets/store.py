"""Reading and writing JSON manifests: validated, atomic, under a lock, cached by stat.

`read` is cheap on a no-op resume (one `stat()` when the file did not change). `update` is the only way
to change a manifest: it takes the file lock, re-reads the current file, applies the change, validates
the result with the model, and replaces the file atomically, so concurrent writers never lose updates.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from filelock import FileLock
from pydantic import BaseModel, ValidationError

from targets.atomic import dumps_json, write_text
from targets.manifest import utcnow

log = logging.getLogger("pipeline")
M = TypeVar("M", bound=BaseModel)
LOCK_TIMEOUT_S = 120

_cache: dict[tuple[str, type], tuple[tuple[int, int, int], BaseModel]] = {}


class ManifestError(ValueError):
    """A manifest that exists but cannot be used; the message names the file and what to do."""


def lock_for(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)


def _parse(path: Path, model: type[M]) -> M:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc}); move it aside and re-run to rebuild it") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(f"{path}: {exc.error_count()} invalid field(s), first {where}: {first['msg']}") from None


def read(path: Path, model: type[M]) -> M | None:
    """The validated manifest, or None if the file does not exist. Raises ManifestError when it is unusable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (str(path), model)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _cache.get(key)
    if hit and hit[0] == stamp:
        return hit[1].model_copy(deep=True)  # type: ignore[return-value]
    value = _parse(path, model)
    _cache[key] = (stamp, value)
    return value.model_copy(deep=True)


def update(path: Path, model: type[M], change: Callable[[M | None], M | None]) -> M | None:
    """Apply `change` to the current manifest under the lock; a returned model is validated and written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock_for(path):
        current = _parse(path, model) if path.exists() else None
        new = change(current)
        if new is None:
            return current
        validated = model.model_validate(new.model_dump(mode="json"))
        stamps = getattr(validated, "timestamps", None)
        if stamps is not None:
            stamps.updated_at = utcnow()
        write_text(path, dumps_json(validated.model_dump(mode="json")))
        return validated
