"""Atomic writes: a temp file in the destination directory, fsync, `os.replace`, fsync of the directory.

A crash at any instruction leaves either the old file or the new one, never a half-written file; a
leftover temp file (`.<name>.tmp-*`) is harmless and is swept by `sweep_temp_files`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from targets.crashpoints import crashpoint

TMP_MARK = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None
                ) -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; on a clean exit it replaces `path`, on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{writer_tag()}-", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        crashpoint(f"before replace {path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    crashpoint(f"after replace {path.name}")


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", newline="") as fh:
        fh.write(text)


def dumps_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    write_text(path, dumps_json(obj))


def writer_tag() -> str:
    """`<host>-<pid>`: marks scratch files with their writer, so a sweep can tell dead writers from live ones."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _writer_alive(name: str) -> bool:
    """True unless the name carries this host's tag with a pid that no longer exists (other hosts: assume alive)."""
    host = socket.gethostname()
    marker = f"{host}-"
    if marker not in name:
        # An untagged temp file is a leftover of a writer from before tagging: dead. Anything else untagged is kept.
        return TMP_MARK not in name
    pid_text = name.split(marker, 1)[1].split("-", 1)[0].split(".", 1)[0]
    return not pid_text.isdigit() or pid_alive(int(pid_text))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_leftover(name: str, scratch: tuple[str, ...] = ()) -> bool:
    """A temp file of an atomic write, or a scratch dir named `<scratch>.<host>-<pid>` (its writer may be alive)."""
    return (name.startswith(".") and TMP_MARK in name) or (bool(scratch) and name.startswith(scratch))


def sweep_temp_files(directory: Path, *, scratch: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[Path]:
    """Remove temp files (and scratch dirs named `<scratch>.<host>-<pid>`) whose writer process is dead.

    A live writer (this process included) keeps its files, so a sweep is safe while other processes work on the
    run; `exclude` names top-level dirs owned by others (the emulator's state).
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    candidates: list[Path] = []
    # One os.walk (not a pathlib rglob per pattern): a no-op resume of a 1,600-part run walks ~7,000 entries.
    for here, dirs, files in os.walk(directory):
        if here == str(directory):
            dirs[:] = [d for d in dirs if d not in exclude]
        candidates += [Path(here, name) for name in (*dirs, *files) if is_leftover(name, scratch)]
        dirs[:] = [d for d in dirs if not is_leftover(d, scratch)]
    for p in candidates:
        if _writer_alive(p.name):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed
