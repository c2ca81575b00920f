"""A real `luigid` for tests: started on a free loopback port, with task history in SQLite, stopped afterwards.

- `scheduler_cfg`: the project's `config/luigi.cfg` plus the scheduler's task history, with `[resources]` overrides,
  written as one file for `LUIGI_CONFIG_PATH` (luigid and the workers read the same settings, as in production).
- `Luigid`: the server process; `history()` reads what it recorded, task by task, in the order it recorded it.
- `runs_per_task`, `most_concurrent`: what that history says about how often each task ran and how many tasks of a
  kind ran at once, as luigid saw it (its history is written by its single IO thread, so event ids are its order).
"""

from __future__ import annotations

import configparser
import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

STARTUP_TIMEOUT_S = 20.0
# luigid only listens on loopback here; proxies from the environment must not see these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Event:
    """One task-history row: the Luigi task id, its family and the status luigid recorded."""

    task_id: str
    family: str
    status: str


def scheduler_cfg(path: Path, *, history_db: Path, resources: dict[str, int]) -> Path:
    """Write `config/luigi.cfg` + `[scheduler] record_task_history` + `[task_history]` + `resources` to `path`."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "config" / "luigi.cfg")
    cfg["resources"].update({name: str(n) for name, n in resources.items()})
    cfg["scheduler"] = {"record_task_history": "true"}
    cfg["task_history"] = {"db_connection": f"sqlite:///{history_db}"}
    with path.open("w", encoding="utf-8") as out:
        cfg.write(out)
    return path


def luigi_retcode(name: str) -> int:
    """The exit code `config/luigi.cfg` gives Luigi's outcome `name` (`[retcode]`)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "config" / "luigi.cfg")
    return cfg.getint("retcode", name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Luigid:
    """`luigid --address 127.0.0.1 --port P` with its config, logs, state and history under `directory`."""

    def __init__(self, directory: Path, *, resources: dict[str, int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.history_db = directory / "history.db"
        self.config = scheduler_cfg(directory / "luigi.cfg", history_db=self.history_db, resources=resources)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with LUIGI_CONFIG_PATH set to the scheduler's config, for worker processes."""
        return {**base, "LUIGI_CONFIG_PATH": str(self.config)}

    def start(self, env: dict[str, str], attempts: int = 3) -> None:
        """Start luigid and wait until its API answers; a port taken meanwhile by someone else is retried."""
        luigid = Path(sys.executable).with_name("luigid")
        for _ in range(attempts):
            self.port = free_port()
            with (self.directory / "luigid.out").open("ab") as out:
                self.proc = subprocess.Popen(
                    [str(luigid), "--address", "127.0.0.1", "--port", str(self.port), "--logdir", str(self.directory),
                     "--state-path", str(self.directory / "state.pickle")],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env(env), cwd=self.directory)
            if self._wait_ready():
                return
        raise RuntimeError(f"luigid did not start; {self.directory / 'luigi-server.log'} ends with:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.task_list() is not None:
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def task_list(self) -> dict[str, dict[str, object]] | None:
        """luigid's `/api/task_list` (every task it knows, with its status), or None if it does not answer."""
        query = urllib.parse.quote(json.dumps({"status": "", "upstream_status": "", "search": ""}))
        try:
            with _OPENER.open(f"{self.url}/api/task_list?data={query}", timeout=2) as resp:
                return dict(json.loads(resp.read())["response"])
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def history(self) -> list[Event]:
        """Every status change luigid recorded, in its order."""
        with closing(sqlite3.connect(f"file:{self.history_db}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT t.task_id, t.name, e.event_name FROM task_events e JOIN tasks t ON e.task_id = t.id "
                              "ORDER BY e.id").fetchall()
        return [Event(*row) for row in rows]

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.directory / "luigi-server.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        # Without the access log (a line per API call), the tail shows what luigid decided.
        return "\n".join([line for line in text.splitlines() if " tornado.access[" not in line][-lines:])

    def stop(self) -> None:
        """SIGTERM (luigid saves its state and exits) and wait; SIGKILL if it does not."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def runs_per_task(events: Iterable[Event]) -> dict[str, int]:
    """How many times each task was started, per the history.

    A RUNNING right after a suspension (RUNNING → PENDING: the task yielded dynamic dependencies) resumes the same run,
    so it does not count; a RUNNING after DONE or FAILED, or after a RUNNING whose worker vanished, does."""
    runs: dict[str, int] = {}
    last: dict[str, str] = {}
    suspended: set[str] = set()
    for event in events:
        if event.status == "RUNNING":
            if event.task_id not in suspended:
                runs[event.task_id] = runs.get(event.task_id, 0) + 1
            suspended.discard(event.task_id)
        elif event.status == "PENDING" and last.get(event.task_id) == "RUNNING":
            suspended.add(event.task_id)
        last[event.task_id] = event.status
    return runs


def most_concurrent(events: Iterable[Event], families: set[str]) -> int:
    """The largest number of tasks of `families` that luigid had handed out and not yet seen end, at any moment."""
    running: set[str] = set()
    most = 0
    for event in events:
        if event.family not in families:
            continue
        if event.status == "RUNNING":
            running.add(event.task_id)
            most = max(most, len(running))
        else:
            running.discard(event.task_id)
    return most
