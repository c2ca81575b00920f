"""Running an outside download command (the CLI fallback) within the same byte and time bounds as a REST download.

Two shapes of command:
- one that prints the results (no `{output_dir}` in its arguments): its stdout is streamed through the limiter into
  `out_dir/BIJOutputSet.jsonl`, and the process group is killed the moment the bytes or the deadline run out, so the
  bound is exact;
- one that writes files into `{output_dir}` (firectl): the command runs with the kernel's file-size limit
  (RLIMIT_FSIZE) at the byte budget, so no single file can pass it, and a watcher sums what the folders hold every
  `WATCH_S` and kills the group once the sum passes the budget (a command writing many files can go past the
  budget by what it writes in one interval) or the deadline passes.
The process runs in its own session; stdout (in the second shape) and stderr go to files in `logs_dir`, counted with
`out_dir`; the last of stderr is kept for the error message.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.providers.limits import Deadline, DownloadLimits, DownloadRefused

WATCH_S = 0.02
STDERR_SHOWN = 200
PRINTED_NAME = "BIJOutputSet.jsonl"


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stderr_tail: str


def folder_bytes(folder: Path) -> int:
    """Bytes held by the regular files under `folder` (links are not followed)."""
    total = 0
    for here, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(here, name)).st_size
            except OSError:
                continue
    return total


def run_bounded(argv: list[str], out_dir: Path, logs_dir: Path, limits: DownloadLimits, what: str, *,
                printed: bool = False) -> CommandResult:
    """Run `argv` until it exits; DownloadRefused (the group killed) once its output passes `limits.max_bytes` or the
    run passes `limits.deadline_s`. `printed`: the results are its stdout. Files left by a refused run are the
    caller's to remove."""
    deadline = Deadline(limits.deadline_s, what)
    logs_dir.mkdir(parents=True, exist_ok=True)
    cap = limits.max_bytes + 1

    def limit_file_size() -> None:  # runs in the child between fork and exec: nothing but the syscall
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    with open(logs_dir / "stderr", "wb") as err, open(out_dir / PRINTED_NAME if printed else logs_dir / "stdout",
                                                      "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if printed else out,
                                stderr=err, start_new_session=True,
                                preexec_fn=limit_file_size)  # noqa: PLW1509 (only setrlimit runs in the child)
        try:
            if printed:
                _stream(proc, out, out_dir, logs_dir, limits, deadline, what)
            returncode = _watch(proc, out_dir, logs_dir, limits, deadline, what)
        except BaseException:
            _kill_group(proc)
            raise
    _check_bytes(out_dir, logs_dir, limits, what)
    if returncode == -signal.SIGXFSZ:
        raise DownloadRefused(f"{what}: a file went above the limit of {limits.max_bytes:,} bytes (killed by SIGXFSZ)")
    return CommandResult(returncode, _tail(logs_dir / "stderr"))


def _stream(proc: subprocess.Popen[bytes], out: IO[bytes], out_dir: Path, logs_dir: Path, limits: DownloadLimits,
            deadline: Deadline, what: str) -> None:
    """Copy the command's stdout into `out` until it closes, never past the byte budget or the deadline."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    written = 0
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, min(WATCH_S * 10, deadline.left())))
        deadline.check(f"{written:,} bytes printed")
        if not ready:
            _check_bytes(out_dir, logs_dir, limits, what)
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        written += len(chunk)
        if written > limits.max_bytes:
            raise DownloadRefused(f"{what}: printed more than {limits.max_bytes:,} bytes, above the limit")
        out.write(chunk)


def _watch(proc: subprocess.Popen[bytes], out_dir: Path, logs_dir: Path, limits: DownloadLimits, deadline: Deadline,
           what: str) -> int:
    """The command's exit code, once it exits within the bounds."""
    while True:
        try:
            return proc.wait(timeout=WATCH_S)
        except subprocess.TimeoutExpired:
            pass
        _check_bytes(out_dir, logs_dir, limits, what)
        deadline.check(f"{folder_bytes(out_dir):,} bytes written")


def _check_bytes(out_dir: Path, logs_dir: Path, limits: DownloadLimits, what: str) -> None:
    held = folder_bytes(out_dir) + folder_bytes(logs_dir)
    if held > limits.max_bytes:
        raise DownloadRefused(f"{what}: wrote {held:,} bytes, above the limit of {limits.max_bytes:,}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - STDERR_SHOWN))
        return fh.read().decode("utf-8", "replace").strip()
