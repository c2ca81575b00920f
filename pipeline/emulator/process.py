"""Start, find and stop the emulator process that serves one state directory.

`ensure_emulator(state_dir, ...)` returns the base URL of a live emulator for `state_dir`, starting one if needed.
It runs under `filelock.FileLock(state_dir/"server.lock")`, so processes calling it at once end up sharing a
single server. A server counts as live when `/healthz` answers with the pid recorded in `server.json` (a port
reused by another process does not count). A new server is spawned detached (own session, output appended to
`emulator.log`) with `--idle-exit`, so it goes away by itself when the pipeline stops using it.

Runs end the emulator they started: each runner invocation holds a lease (`leases/<pid>`) while it runs, a server
spawned for one is marked `started_by.json` with that owner, and the last runner to leave (`release`) stops a server
a runner started. A server started by anyone else (a test, `python -m pipeline emulator`) is left alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from filelock import FileLock

from targets.atomic import pid_alive, write_json

STARTED_BY = "started_by.json"
LEASES = "leases"
_HEALTH_TIMEOUT_S = 1.0
_POLL_S = 0.05
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The emulator only listens on loopback; proxies from the environment must not see these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _server_info(state_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((state_dir / "server.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("base_url"), str) else None


def _healthy(info: dict[str, Any]) -> bool:
    """True when the server named by `info` answers /healthz with the same pid."""
    try:
        with _OPENER.open(f"{info['base_url']}/healthz", timeout=_HEALTH_TIMEOUT_S) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return bool(body.get("ok")) and body.get("pid") == info.get("pid")


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_emulator(state_dir: Path, *, answer_key: Path | None, latency_s: float = 1.0, idle_exit_s: float = 120.0,
                    startup_timeout_s: float = 15.0, owner: int | None = None) -> str:
    """Base URL of a live emulator serving `state_dir`; RuntimeError (with the log tail) if it cannot start."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(state_dir / "server.lock"), timeout=startup_timeout_s + 30):
        info = _server_info(state_dir)
        if info is not None and _healthy(info):
            return str(info["base_url"])
        return _spawn(state_dir, answer_key=answer_key, latency_s=latency_s, idle_exit_s=idle_exit_s,
                      startup_timeout_s=startup_timeout_s, owner=owner)


def _spawn(state_dir: Path, *, answer_key: Path | None, latency_s: float, idle_exit_s: float,
           startup_timeout_s: float, owner: int | None) -> str:
    (state_dir / "server.json").unlink(missing_ok=True)
    (state_dir / STARTED_BY).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipeline.emulator", "--host", "127.0.0.1", "--port", "0",
           "--state-dir", str(state_dir), "--latency", str(latency_s), "--idle-exit", str(idle_exit_s)]
    if answer_key is not None:
        cmd += ["--answer-key", str(Path(answer_key).resolve())]
    # Crash points are for the pipeline process: the emulator's own atomic writes must neither count nor fire them.
    env = {k: v for k, v in os.environ.items() if k not in ("PIPELINE_CRASH_AT", "PIPELINE_CRASH_LOG")}
    # The child must import this package whatever the caller's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    log_path = state_dir / "emulator.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=str(state_dir), start_new_session=True)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        info = _server_info(state_dir)
        if info is not None and info.get("pid") == proc.pid and _healthy(info):
            if owner:
                write_json(state_dir / STARTED_BY, {"pid": proc.pid, "owner": owner})
            return str(info["base_url"])
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited with code {proc.returncode} during startup; "
                               f"{log_path} ends with:\n{_log_tail(log_path)}")
        time.sleep(_POLL_S)
    proc.terminate()
    raise RuntimeError(f"emulator did not answer within {startup_timeout_s:g} s; {log_path} ends with:\n"
                       f"{_log_tail(log_path)}")


def stop_emulator(state_dir: Path, *, timeout_s: float = 10.0) -> bool:
    """SIGTERM the live emulator of `state_dir` and wait until its process is gone; False if none was running."""
    state_dir = Path(state_dir).resolve()
    info = _server_info(state_dir)
    if info is None or not _healthy(info):
        return False
    pid = int(info["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(_POLL_S)
    raise RuntimeError(f"emulator pid {pid} still running {timeout_s:g} s after SIGTERM")


def _alive(pid: int) -> bool:
    try:
        # Collect the exit status when the server is our own child, so it does not linger as a zombie.
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return pid_alive(pid)


def take_lease(state_dir: Path, pid: int) -> None:
    """Mark runner `pid` as using the emulator of `state_dir` until it calls `release`."""
    folder = Path(state_dir).resolve() / LEASES
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(pid)).touch()


def release(state_dir: Path, pid: int) -> bool:
    """Drop runner `pid`'s lease; stop the server if a runner started it and no live runner still holds a lease.
    True when it was stopped."""
    state_dir = Path(state_dir).resolve()
    if not state_dir.is_dir():
        return False
    with FileLock(str(state_dir / "server.lock"), timeout=60):
        (state_dir / LEASES / str(pid)).unlink(missing_ok=True)
        holders = [p for p in (state_dir / LEASES).glob("*") if p.name.isdigit() and pid_alive(int(p.name))]
        try:
            marker = json.loads((state_dir / STARTED_BY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        info = _server_info(state_dir)
        if holders or info is None or not isinstance(marker, dict) or marker.get("pid") != info.get("pid"):
            return False
        return stop_emulator(state_dir)
