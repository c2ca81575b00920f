"""The emulator's persisted state, and the answer key it reads (stdlib + `targets.atomic`).

Layout under the state dir: `accounts/<acct>/{datasets,jobs}/<id>.json` (one record per resource),
`accounts/<acct>/files/<dataset>/<name>` (uploaded and output files), `calls.json` (the counters of
`/emulator/calls`), `secret.key` (URL signatures). Every write is atomic, so a killed server leaves each file
either old or new, and a restarted server sees every change it acknowledged. `Store.lock` (re-entrant)
serialises read-modify-write sequences across request threads.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

from targets.atomic import write_bytes, write_json

log = logging.getLogger(__name__)

CALL_KINDS = ("dataset_creates", "job_creates", "dataset_create_conflicts", "job_create_conflicts", "uploads",
              "downloads", "faults_fired", "completions")
"""Counters of `/emulator/calls`, each `{key: count}`: keys are resource ids, except `faults_fired` (fault kinds)."""


def read_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class Store:
    """Datasets, jobs, files and call counters as files under `root` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        root.mkdir(parents=True, exist_ok=True)
        secret_path = root / "secret.key"
        with self.lock:
            if not secret_path.exists():
                write_bytes(secret_path, secrets.token_bytes(32))
        self.secret = secret_path.read_bytes()

    def _dir(self, acct: str, kind: str) -> Path:
        return self.root / "accounts" / acct / kind

    def files_dir(self, acct: str, dataset_id: str) -> Path:
        return self._dir(acct, "files") / dataset_id

    def get(self, acct: str, kind: str, rid: str) -> dict[str, Any] | None:
        return read_json(self._dir(acct, kind) / f"{rid}.json")

    def put(self, acct: str, kind: str, record: dict[str, Any]) -> None:
        write_json(self._dir(acct, kind) / f"{record['id']}.json", record)

    def delete(self, acct: str, kind: str, rid: str) -> None:
        (self._dir(acct, kind) / f"{rid}.json").unlink(missing_ok=True)

    def all(self, acct: str, kind: str) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self._dir(acct, kind).glob("*.json")):
            record = read_json(path)
            if record is not None:
                records.append(record)
        return records

    def calls(self) -> dict[str, dict[str, int]]:
        data = read_json(self.root / "calls.json") or {}
        return {kind: dict(data.get(kind) or {}) for kind in CALL_KINDS}

    def count_call(self, kind: str, key: str) -> None:
        with self.lock:
            data = self.calls()
            data[kind][key] = data[kind].get(key, 0) + 1
            write_json(self.root / "calls.json", data)

    def reset_calls(self) -> None:
        with self.lock:
            write_json(self.root / "calls.json", {kind: {} for kind in CALL_KINDS})


class AnswerKey:
    """Prepared-data rows (`open_book.jsonl`, `closed_book.jsonl`) by (dataset, id), reloaded when files change."""

    FILES = ("open_book.jsonl", "closed_book.jsonl")

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}
        self._stamp: tuple[Any, ...] = ()
        self._lock = threading.Lock()

    def lookup(self, dataset: str, item_id: str) -> dict[str, Any] | None:
        if self.directory is None:
            return None
        with self._lock:
            paths = [self.directory / name for name in self.FILES]
            stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None for p in paths)
            if stamp != self._stamp:
                self._rows = self._load(paths)
                self._stamp = stamp
            return self._rows.get((dataset, item_id))

    @staticmethod
    def _load(paths: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for path in paths:
            if not path.exists():
                continue
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        rows[(str(row["dataset"]), str(row["id"]))] = row
                    except (ValueError, KeyError, TypeError):
                        log.warning("answer key %s:%d is not a prepared row, ignored", path, lineno)
        return rows
