"""A non-destructive archive of a finished run: `<root>/archives/run_<rid>.<UTC stamp>.tar.gz` with a checksum manifest.

The bundle holds every file of the run directory except what is not the run's result: the embedded emulator's
state (`.emulator/`, the fake provider's copy of the data), lock files, temp files of interrupted writes, the stop
sentinel, per-invocation outcome notes and the no-op index. Inside it, `ARCHIVE_MANIFEST.json` lists each file's
run-relative path, size and sha256; the same list is written beside the bundle (`<bundle>.checksums.json`, with the
bundle's own sha256). Both are written atomically; the bundle is re-read and every member checked against the
manifest before it is recorded. The run itself is never changed, except that each trial manifest records the
`archived` stage `{archive_path, sha256, files, checksums_path}`. An existing bundle is never overwritten.

An archive is current when its bundle is there with the recorded sha256 and no file of the run changed since (size
and mtime decide, as for every artifact; trial manifests are left out of that comparison because recording the
archive changes them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

from pipeline.control.layout import RunLayout
from pipeline.control.noop_index import INDEX_NAME
from targets.atomic import atomic_open, is_leftover, write_text
from targets.fingerprint import fingerprint, sha256_file

MANIFEST_NAME = "ARCHIVE_MANIFEST.json"
SKIPPED_DIRS = {".emulator", ".outcomes"}
SKIPPED_NAMES = {INDEX_NAME, "STOP_REQUESTED"}
SCRATCH = (".download",)


def archive_dir(layout: RunLayout, out: str | Path | None = None) -> Path:
    return Path(out).expanduser().resolve() if out else layout.root / "archives"


def run_files(layout: RunLayout) -> list[str]:
    """Run-relative paths of the files an archive holds, sorted."""
    top = str(layout.run_dir)
    found: list[str] = []
    for here, dirs, names in os.walk(top):
        if here == top:
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        dirs[:] = sorted(d for d in dirs if not is_leftover(d, SCRATCH))
        rel = os.path.relpath(here, top)
        for name in sorted(names):
            if name in SKIPPED_NAMES or name.endswith(".lock") or is_leftover(name, SCRATCH):
                continue
            found.append(name if rel == "." else f"{rel}/{name}")
    return sorted(found)


def checksums(layout: RunLayout, known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """`{path: {size, mtime_ns, sha256}}` of the run's files (a known entry with the same size and mtime is trusted)."""
    out: dict[str, dict[str, Any]] = {}
    for rel in run_files(layout):
        fp = fingerprint(layout.run_dir / rel, (known or {}).get(rel))
        if fp is not None:
            out[rel] = fp.as_dict()
    return out


def _is_bookkeeping(rel: str) -> bool:
    """Records about the outputs (trial manifests, run_state.json), which change when outputs are merely rewritten
    (an mtime, the archive's own record): whether the run changed is decided by the outputs themselves."""
    return rel.endswith("/results/trial_manifest.json") or rel == "run_state.json"


def changed_since(layout: RunLayout, recorded: dict[str, dict[str, Any]]) -> str | None:
    """The first difference between the run now and the files an archive recorded, or None."""
    now = {rel: fp for rel, fp in checksums(layout, recorded).items() if not _is_bookkeeping(rel)}
    then = {rel: fp for rel, fp in recorded.items() if not _is_bookkeeping(rel)}
    for rel in sorted(set(now) | set(then)):
        if rel not in now:
            return f"{rel} was removed"
        if rel not in then:
            return f"{rel} is new"
        if now[rel]["sha256"] != then[rel]["sha256"]:
            return f"{rel} changed"
    return None


def write_archive(layout: RunLayout, out: str | Path | None = None, *, now: float | None = None) -> dict[str, Any]:
    """Write and verify a new bundle of the run; returns `{archive_path, sha256, files, bytes, checksums_path}`."""
    folder = archive_dir(layout, out)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    bundle = folder / f"run_{layout.rid}.{stamp}.tar.gz"
    suffix = 1
    while bundle.exists():  # never overwrite an earlier archive, even within the same second
        suffix += 1
        bundle = folder / f"run_{layout.rid}.{stamp}-{suffix}.tar.gz"
    files = checksums(layout)
    listing = {"rid": layout.rid, "created_at": stamp, "files": {rel: {"size": fp["size"], "sha256": fp["sha256"]}
                                                                   for rel, fp in files.items()}}
    encoded = json.dumps(listing, indent=1, sort_keys=True).encode("utf-8")
    with atomic_open(bundle, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"run_{layout.rid}/{MANIFEST_NAME}")
        info.size, info.mtime = len(encoded), 0
        tar.addfile(info, io.BytesIO(encoded))
        for rel in files:
            tar.add(layout.run_dir / rel, arcname=f"run_{layout.rid}/{rel}", recursive=False)
    verify(bundle, listing["files"])
    digest = sha256_file(bundle)
    checksums_path = bundle.with_name(bundle.name + ".checksums.json")
    # Beside the bundle, with mtimes too: `changed_since` compares the run with it without re-hashing every file.
    write_text(checksums_path, json.dumps({**listing, "files": files, "bundle": bundle.name, "bundle_sha256": digest},
                                          indent=1, sort_keys=True) + "\n")
    stat = fingerprint(bundle)
    return {"archive_path": str(bundle), "sha256": digest, "files": len(files), "bytes": bundle.stat().st_size,
            "checksums_path": str(checksums_path), "bundle": stat.as_dict() if stat else None}


def archive_current(layout: RunLayout, record: dict[str, Any] | None) -> tuple[bool, str]:
    """Is the archive a trial manifest recorded still there, intact, and does it still hold the run as it is?"""
    if not record or not record.get("archive_path"):
        return False, "not archived"
    bundle = Path(record["archive_path"])
    fp = fingerprint(bundle, record.get("bundle"))
    if fp is None:
        return False, f"archive {bundle} is missing"
    if fp.sha256 != record.get("sha256"):
        return False, f"archive {bundle} changed since it was written"
    try:
        recorded = json.loads(Path(record["checksums_path"]).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"checksum manifest of {bundle.name} is missing or unreadable"
    changed = changed_since(layout, recorded)
    if changed:
        return False, f"the run changed since {bundle.name} ({changed})"
    return True, f"{bundle.name}, {len(recorded)} files, checksums match"


def verify(bundle: Path, expected: dict[str, dict[str, Any]]) -> None:
    """Every expected file is in the bundle with its size and sha256 (ValueError naming the first that is not)."""
    seen: set[str] = set()
    with tarfile.open(bundle, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            rel = member.name.split("/", 1)[1] if "/" in member.name else member.name
            if rel == MANIFEST_NAME:
                continue
            digest, size = hashlib.sha256(), 0
            handle = tar.extractfile(member)
            while handle and (chunk := handle.read(1 << 20)):
                digest.update(chunk)
                size += len(chunk)
            want = expected.get(rel)
            if want is None or size != want["size"] or digest.hexdigest() != want["sha256"]:
                raise ValueError(f"{bundle}: member {rel} does not match the checksum manifest")
            seen.add(rel)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{bundle}: {len(missing)} file(s) missing from the bundle, e.g. {missing[0]}")
