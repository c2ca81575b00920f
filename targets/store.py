"""Reading and writing JSON manifests: validated, atomic, under a lock, cached by stat.

`read` is cheap on a no-op resume (one `stat()` when the file did not change). `update` is the only way
to change a manifest: it takes the file lock, re-reads the current file, applies the change, validates
the result with the model, and replaces the file atomically, so concurrent writers never lose updates.

A `TrialManifest` goes through `targets.lifecycle`: `read` upgrades a v1 file (or rebuilds a corrupt one, given
`context`) in memory and writes nothing; `update` first upgrades / repairs the file on disk under the same lock
(copy aside, then rewrite), then applies the change and keeps the per-part mirrors (`<jkey>_part.json`, the
breadcrumbs a repair recovers part records from) in step. Without `context`, a corrupt trial manifest raises.
The trial's file names come as `names` (a `lifecycle.TrialNames`) or as the context's `"names"`; see
`targets.lifecycle` for what happens without them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from pydantic import BaseModel, ValidationError

from targets import lifecycle
from targets.atomic import dumps_json, write_text
from targets.locking import LOCK_TIMEOUT_S, Context, ManifestError, lock_for
from targets.manifest import TrialManifest, utcnow

log = logging.getLogger("pipeline")
M = TypeVar("M", bound=BaseModel)
# Re-exported: callers catch `store.ManifestError` and take `store.lock_for` (defined in `targets.locking`).
__all__ = ["LOCK_TIMEOUT_S", "Context", "ManifestError", "lock_for", "read", "update"]

_cache: dict[tuple[str, type], tuple[tuple[int, int, int], BaseModel]] = {}


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


def read(path: Path, model: type[M], *, context: Context | None = None,
         names: lifecycle.TrialNames | None = None) -> M | None:
    """The validated manifest, or None if the file does not exist. Raises ManifestError when it is unusable.

    The value is shared with the stat-keyed cache: treat it as read-only (copy what you change; persist with `update`).

    `context` (trial manifests only) is `targets.lifecycle`'s rebuild context for a corrupt file, `names` the trial's
    file names (a v1 file's stages are inferred in memory only with them).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (str(path), model)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _cache.get(key)
    if hit and hit[0] == stamp:
        return hit[1]  # type: ignore[return-value]
    if issubclass(model, TrialManifest):
        # Cached by the file's stat like any manifest: an in-memory upgrade's inferred stage_status is informational.
        opened, _ = lifecycle.open_trial_manifest(path, context=context, names=names)
        if opened is None:
            return None
        value = cast("M", opened)
    else:
        value = _parse(path, model)
    _cache[key] = (stamp, value)
    return value


def _current(path: Path, model: type[M], context: Context | None, names: lifecycle.TrialNames | None) -> M | None:
    if issubclass(model, TrialManifest):
        return cast("M | None", lifecycle.persist_lifecycle_locked(path, context=context, names=names))
    return _parse(path, model)


def update(path: Path, model: type[M], change: Callable[[M | None], M | None], *,
           context: Context | None = None, names: lifecycle.TrialNames | None = None) -> M | None:
    """Apply `change` to the current manifest under the lock; a returned model is validated and written.

    A v1 or corrupt trial manifest is upgraded / repaired on disk first (`lifecycle.persist_lifecycle_locked`).
    After a trial manifest is written, still under the lock, the part mirrors of the parts whose record or download
    entry changed are rewritten (`lifecycle.mirror_parts`), so every writer keeps them current. The mirrors are named
    by `names`, else by the context's `"names"` (the context is called for them); with neither none is written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    trial = issubclass(model, TrialManifest)
    if trial and names is None and context is not None:
        names = context().get("names")
    with lock_for(path):
        current = _current(path, model, context, names) if path.exists() else None
        # Taken before `change`, which edits `current` in place.
        before = lifecycle.mirror_basis(cast("TrialManifest | None", current)) if trial else None
        new = change(current)
        if new is None:
            return current
        validated = model.model_validate(new.model_dump(mode="json"))
        stamps = getattr(validated, "timestamps", None)
        if stamps is not None:
            stamps.updated_at = utcnow()
        data = validated.model_dump(mode="json")
        write_text(path, dumps_json(data))
        if trial:
            lifecycle.mirror_parts(path, before, data, names)
        return validated
