"""The no-op resume short-cut: a finished run whose files have not changed is known complete after one directory walk.

When the whole run is verified complete (every stage's done predicate, cascading), the size and mtime of every file
of the run directory are recorded in `run_<rid>/.complete_index.json`, with a stamp of the pipeline's own code.
The next invocation walks the directory once: if the same files are there with the same size and mtime, and the code
is the same, every predicate would answer as before (they read only these files, and trust a checksum when size and
mtime match — the same rule as `targets.fingerprint`), so the run is complete without evaluating the graph.
Anything else — a file added, removed or touched, a leftover of a killed writer, other code — means the full check.
Not used for adopted runs of the original system (their inputs may live outside the run directory).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.control.layout import TRIAL_FILES, RunLayout
from targets.atomic import is_leftover, write_text

INDEX_NAME = ".complete_index.json"
SKIPPED_DIRS = {".emulator", ".outcomes"}
SKIPPED_NAMES = {INDEX_NAME, "STOP_REQUESTED"}
# Lock files, and the part mirrors: no done predicate reads a mirror (only a manifest repair does), so a mirror cannot
# change what a check would answer.
SKIPPED_SUFFIXES = (".lock", TRIAL_FILES.part_suffix)
_CODE_DIRS = (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2] / "targets")


def code_stamp() -> list[list[object]]:
    """Name, size and mtime of every module of `pipeline` and `targets`: other code may decide differently."""
    stamp: list[list[object]] = []
    for top in _CODE_DIRS:
        for here, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".j2", ".cfg")):
                    st = os.stat(os.path.join(here, name))
                    stamp.append([os.path.relpath(os.path.join(here, name), top.parent), st.st_size, st.st_mtime_ns])
    return stamp


def scan(layout: RunLayout, scratch: tuple[str, ...] = ()) -> tuple[dict[str, list[int]], bool]:
    """`({run-relative path: [size, mtime_ns]}, leftovers found)` for the run's files, in one walk."""
    files: dict[str, list[int]] = {}
    leftovers = False
    pending = [("", str(layout.run_dir))]
    while pending:
        prefix, folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if is_leftover(name, scratch):
                leftovers = True
            elif entry.is_dir(follow_symlinks=False):
                if prefix or name not in SKIPPED_DIRS:
                    pending.append((f"{prefix}{name}/", entry.path))
            elif name not in SKIPPED_NAMES and not name.endswith(SKIPPED_SUFFIXES):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                files[prefix + name] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(files.items())), leftovers


_counted: dict[tuple[str, str], int] = {}  # (run dir, key) -> files checked, for runs confirmed in this process


def confirmed(layout: RunLayout, key: str) -> bool:
    """Did `unchanged` find the run as verified for `key` earlier in this process? (then the graph had nothing to do,
    and the index needs neither a second walk nor a rewrite)"""
    return (str(layout.run_dir), key) in _counted


def forget(layout: RunLayout) -> None:
    """Drop this process's confirmations for the run: something changed it since."""
    for key in [k for k in _counted if k[0] == str(layout.run_dir)]:
        del _counted[key]


def unchanged(layout: RunLayout, key: str, scratch: tuple[str, ...] = ()) -> int | None:
    """The number of files checked when the run is exactly as it was when verified complete for `key`, else None.

    Once confirmed in a process, the answer stands for it (the runner asks before the graph, the root task when Luigi
    checks it; nothing runs in between).
    """
    if (str(layout.run_dir), key) in _counted:
        return _counted[(str(layout.run_dir), key)]
    try:
        index = json.loads((layout.run_dir / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("key") != key:
        return None
    files, leftovers = scan(layout, scratch)
    if leftovers or digest(files) != index.get("files_sha256") or digest(code_stamp()) != index.get("code_sha256"):
        return None
    _counted[(str(layout.run_dir), key)] = len(files)
    return len(files)


def digest(listing: object) -> str:
    """sha256 of a file listing (`scan`, `code_stamp`): the index keeps this, not the listing, so reading it is cheap."""
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def record(layout: RunLayout, key: str, scratch: tuple[str, ...] = ()) -> None:
    """Remember the run as verified complete for `key` (the root task's id): its files as they are now."""
    files, leftovers = scan(layout, scratch)
    if not leftovers:
        write_text(layout.run_dir / INDEX_NAME, json.dumps({"key": key, "files": len(files), "files_sha256": digest(files),
                                                            "code_sha256": digest(code_stamp())}))
