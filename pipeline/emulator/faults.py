"""Scriptable faults for the emulator: a validated plan of rules, their persisted counters, and rule selection.

A plan is `{"rules": [rule, ...]}`; a rule is `{"fault": kind, "match": regex (default ".*"), "method": str|null,
"times": int (default 1, 0 = unlimited), "after": int (default 0), ...kind params}` (params and defaults in
`PARAMS`). Each trigger point of the emulator asks `FaultBook.fire(kinds, subject, method)` with the kinds it can
apply and its subject: the request path (URL-decoded, no query) for HTTP kinds, the job id for job kinds, the
output dataset id for output kinds. Rules are checked in order; a rule of one of those kinds whose `match` is
found in the subject (`re.search`), whose `method` fits (null = any) and that has times left counts the
request as seen; once it has seen more than `after`, it fires (its `fired` count grows) and the check stops.
`method` is only allowed on HTTP kinds. `output_deleted` ignores `times` (stored as 0): deletion is for good.

The plan and its per-rule `seen` / `fired` counts live in `<state_dir>/faults.json`, written atomically on
every change, so a restarted server continues where it stopped. `replace` (POST /emulator/faults) resets the
counters; `install` (startup `--faults`) keeps them when the rules are unchanged, so restarting with the same
`--faults` does not re-arm spent rules. Random choices use `pick` / `rng`, seeded by subject and rule index.

Kinds (where they act: `pipeline.emulator.server` for HTTP, `pipeline.emulator.api` for the rest):
- HTTP, any route but `/healthz` and `/emulator/*`: `status` (answer an error, not processed), `drop` (close, not
  processed), `drop_after_commit` (process, then close without a response), `delay` (wait `seconds`, then process).
- job, on create: `job_state` (end in `state`; FAILED / CANCELLED without output, EXPIRED / EARLY_STOPPED with a
  `partial` fraction of the rows), `job_latency` (`seconds` instead of the server latency; `stuck` stays PENDING).
- output dataset: `output_deleted` (deleted at the first request touching it), `file_url` (GET shows `url` as its
  externalUrl), `error_rows` (when the job writes it: a `fraction` of the rows go to error-data); and per GET of
  its results file: `truncated`, `garbage`, `oversized`, `zip_bomb`, `path_traversal`, `duplicate_lines`,
  `missing_results`, and the hostile bodies below (see `pipeline.emulator.payloads`).

Hostile result bodies (file kinds; all generated while streaming, memory bounded):
- `gzip_bomb` (`inflated_bytes`, default 2 GiB, at most 16 GiB): one gzip stream (magic 1f 8b) inflating to that
  many zero bytes, about 1/1000 of it on the wire, with its true Content-Length.
- `endless` (`chunk_bytes`, default 65536): the file, then JSONL padding lines without end, `Transfer-Encoding:
  chunked` and no Content-Length; it stops when the client closes the connection (or the server shuts down).
- `lying_length` (`direction` "over" | "under", default "over"; `extra_bytes`, default null): "over" announces
  `extra_bytes` (null: the file's length) more than the file and closes after the file; "under" announces half
  the file (less, when that would end a row), writes `extra_bytes` past that (null: the rest of the file;
  beyond it, padding lines), then closes.
- `tar_bomb` (`members` default 100000, `depth` default 0, `member_bytes` default 16, `gzip` default true): a
  tar(.gz) of that many tiny members, each nested `depth` directories deep (`a/a/.../part-<n>.jsonl`), sent chunked.
- `slow_drip` (`interval_s`, default 1.0): the file one byte per `interval_s` seconds under its true Content-Length;
  other requests are served meanwhile (one thread per connection) and it stops when the client goes away.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from targets.atomic import write_json

HTTP_KINDS = frozenset({"status", "drop", "drop_after_commit", "delay"})
JOB_KINDS = frozenset({"job_state", "job_latency"})
DELETE_KINDS = frozenset({"output_deleted"})
URL_KINDS = frozenset({"file_url"})
WRITE_KINDS = frozenset({"error_rows"})
FILE_KINDS = frozenset({"truncated", "garbage", "oversized", "zip_bomb", "path_traversal", "duplicate_lines",
                        "missing_results", "gzip_bomb", "endless", "lying_length", "tar_bomb", "slow_drip"})
ALL_KINDS = HTTP_KINDS | JOB_KINDS | DELETE_KINDS | URL_KINDS | WRITE_KINDS | FILE_KINDS

JOB_END_STATES = ("JOB_STATE_FAILED", "JOB_STATE_EXPIRED", "JOB_STATE_CANCELLED", "JOB_STATE_EARLY_STOPPED")
TRUNCATE_MODES = ("cut_connection", "short_body")
MAX_ZIP_MEMBER = 2**32 - 1  # no zip64: the member size must fit the classic 32-bit header fields
MAX_GZIP_INFLATED = 16 * 1024**3  # its CRC is computed up front, ~0.7 s per GiB
MAX_CHUNK = 16 * 1024**2
MAX_EXTRA = 1024**3
REQUIRED = object()
COUNTERS = ("seen", "fired")

Check = Callable[[Any, str], Any]


def _number(lo: float, hi: float | None = None) -> Check:
    def check(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value > hi):
            raise ValueError(f"{name} must be a number in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
        return value

    return check


def _integer(lo: int, hi: int | None = None) -> Check:
    def check(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise ValueError(f"{name} must be an integer in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
        return value

    return check


def _optional(check: Check) -> Check:
    return lambda value, name: None if value is None else check(value, name)


def _choice(*options: Any) -> Check:
    def check(value: Any, name: str) -> Any:
        if value not in options:
            raise ValueError(f"{name} must be one of {', '.join(map(str, options))}, got {value!r}")
        return value

    return check


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


PARAMS: dict[str, dict[str, tuple[Check, Any]]] = {
    "status": {"status": (_integer(400, 599), 503), "retry_after": (_optional(_number(0)), None),
               "message": (_text, "injected fault"), "code": (_optional(_integer(0, 16)), None)},
    "drop": {},
    "drop_after_commit": {},
    "delay": {"seconds": (_number(0), REQUIRED)},
    "job_state": {"state": (_choice(*JOB_END_STATES), REQUIRED), "partial": (_number(0, 1), 0.5),
                  "message": (_text, "injected job failure")},
    "job_latency": {"seconds": (_optional(_number(0)), None), "stuck": (_flag, False)},
    "output_deleted": {},
    "truncated": {"mode": (_choice(*TRUNCATE_MODES), "cut_connection")},
    "garbage": {"bytes": (_integer(1), 4096)},
    "oversized": {"bytes": (_integer(1), 64 * 1024**2)},
    "zip_bomb": {"bytes": (_integer(1, MAX_ZIP_MEMBER), 1024**3)},
    "gzip_bomb": {"inflated_bytes": (_integer(1, MAX_GZIP_INFLATED), 2 * 1024**3)},
    "endless": {"chunk_bytes": (_integer(1, MAX_CHUNK), 65536)},
    "lying_length": {"direction": (_choice("over", "under"), "over"), "extra_bytes": (_optional(_integer(1, MAX_EXTRA)), None)},
    "tar_bomb": {"members": (_integer(1, 10**7), 100000), "depth": (_integer(0, 4096), 0),
                 "member_bytes": (_integer(1, 1024**2), 16), "gzip": (_flag, True)},
    "slow_drip": {"interval_s": (_number(0, 60), 1.0)},
    "path_traversal": {"archive": (_choice("tar", "zip"), "tar"), "member": (_text, "../../evil.jsonl")},
    "file_url": {"url": (_text, "file:///etc/passwd")},
    "duplicate_lines": {"identical": (_flag, False)},
    "missing_results": {"fraction": (_number(0, 1), 0.2)},
    "error_rows": {"fraction": (_number(0, 1), 0.2), "code": (_integer(0), 500),
                   "message": (_text, "injected row failure")},
}
"""Per kind: param name -> (validator, default or REQUIRED)."""

_BASE_KEYS = {"fault", "match", "method", "times", "after", *COUNTERS}


@dataclass(frozen=True)
class Rule:
    """One validated rule; `index` is its position in the plan (part of every random seed)."""

    index: int
    fault: str
    match: str
    method: str | None
    times: int
    after: int
    params: dict[str, Any] = field(default_factory=dict)

    def fits(self, subject: str, method: str | None) -> bool:
        return (self.method is None or self.method == method) and re.search(self.match, subject) is not None

    def as_json(self) -> dict[str, Any]:
        return {"fault": self.fault, "match": self.match, "method": self.method, "times": self.times,
                "after": self.after, **self.params}


def parse_rule(index: int, raw: Any) -> Rule:
    """A Rule from its JSON form; ValueError naming the rule and the field. `seen`/`fired` keys are ignored."""
    where = f"rule {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object")
    kind = raw.get("fault")
    if kind not in ALL_KINDS:
        raise ValueError(f"{where}: fault must be one of {', '.join(sorted(ALL_KINDS))}, got {kind!r}")
    spec = PARAMS[kind]
    unknown = sorted(set(raw) - _BASE_KEYS - set(spec))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} for fault {kind!r}")
    match = raw.get("match", ".*")
    try:
        re.compile(_text(match, f"{where}.match"))
    except re.error as exc:
        raise ValueError(f"{where}.match is not a valid regex: {exc}") from exc
    method = raw.get("method")
    if method is not None:
        if kind not in HTTP_KINDS:
            raise ValueError(f"{where}: method only applies to the HTTP faults {', '.join(sorted(HTTP_KINDS))}")
        method = _text(method, f"{where}.method").upper()
    times = _integer(0)(raw.get("times", 1), f"{where}.times")
    after = _integer(0)(raw.get("after", 0), f"{where}.after")
    params = {}
    for name, (check, default) in spec.items():
        if name in raw:
            params[name] = check(raw[name], f"{where}.{name}")
        elif default is REQUIRED:
            raise ValueError(f"{where}: {name} is required for fault {kind!r}")
        else:
            params[name] = default
    if kind == "job_latency" and params["seconds"] is None and not params["stuck"]:
        raise ValueError(f"{where}: job_latency needs seconds, or stuck: true")
    if kind == "output_deleted":
        times = 0
    return Rule(index, kind, match, method, times, after, params)


def parse_plan(plan: Any) -> list[Rule]:
    """The rules of a plan `{"rules": [...]}` (None means no rules); ValueError when anything is invalid."""
    if plan is None:
        return []
    if not isinstance(plan, dict) or set(plan) - {"rules"}:
        raise ValueError('a fault plan is a JSON object {"rules": [...]}')
    rules = plan.get("rules", [])
    if not isinstance(rules, list):
        raise ValueError("rules must be a list")
    return [parse_rule(i, raw) for i, raw in enumerate(rules)]


def load_plan_arg(text: str) -> dict[str, Any]:
    """A plan from the command line: a JSON object, or the path of a file holding one; validated."""
    stripped = text.strip()
    if stripped.startswith("{"):
        source = "--faults"
    else:
        source = stripped
        try:
            stripped = Path(stripped).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--faults is neither a JSON object nor a readable file: {exc}") from exc
    try:
        plan = json.loads(stripped)
    except ValueError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from exc
    parse_plan(plan)
    return plan


def rng(subject: str, rule_index: int) -> random.Random:
    """The random source of the rule at `rule_index` acting on one subject (job or dataset id)."""
    return random.Random(f"{subject}#{rule_index}")


def pick(ids: Iterable[str], fraction: float, subject: str, rule_index: int) -> set[str]:
    """round(fraction x n) of the distinct `ids`, chosen by `rng(subject, rule_index)`: what a fractional fault hits."""
    pool = sorted(set(ids))
    return set(rng(subject, rule_index).sample(pool, round(fraction * len(pool))))


def request_set(ids: Iterable[str]) -> str:
    """A seed subject for the requests `ids` themselves: the same requests meet the same fractional fault in any
    batch, whatever id the provider gave it (so a resumed run's outcome equals an uninterrupted run's)."""
    return hashlib.sha256("\n".join(sorted(set(ids))).encode()).hexdigest()


class FaultBook:
    """The current plan and its counters, persisted at `path`; thread-safe. See the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._seen: list[int] = []
        self._fired: list[int] = []
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        self._rules = parse_plan(saved)
        raw_rules = saved.get("rules", [])
        self._seen = [_counter(raw, "seen") for raw in raw_rules]
        self._fired = [_counter(raw, "fired") for raw in raw_rules]

    def view(self) -> dict[str, Any]:
        """The plan with each rule's `seen` and `fired` counts (the body of GET /emulator/faults)."""
        with self._lock:
            return self._view()

    def _view(self) -> dict[str, Any]:
        return {"rules": [{**rule.as_json(), "seen": seen, "fired": fired}
                          for rule, seen, fired in zip(self._rules, self._seen, self._fired, strict=True)]}

    def replace(self, plan: Any) -> dict[str, Any]:
        """Install `plan` (None clears) with fresh counters; ValueError leaves the current plan in place."""
        rules = parse_plan(plan)
        with self._lock:
            self._rules, self._seen, self._fired = rules, [0] * len(rules), [0] * len(rules)
            self._save()
            return self._view()

    def install(self, plan: Any) -> dict[str, Any]:
        """Like `replace`, but keeps the persisted counters when the rules are the same (a restart)."""
        rules = parse_plan(plan)
        with self._lock:
            if rules != self._rules:
                self._rules, self._seen, self._fired = rules, [0] * len(rules), [0] * len(rules)
                self._save()
            return self._view()

    def fire(self, kinds: frozenset[str], subject: str, method: str | None = None) -> Rule | None:
        """The rule that fires for this subject, counters updated and persisted; None when none does."""
        with self._lock:
            changed = False
            try:
                for i, rule in enumerate(self._rules):
                    if rule.fault not in kinds or (rule.times and self._fired[i] >= rule.times):
                        continue
                    if not rule.fits(subject, method):
                        continue
                    self._seen[i] += 1
                    changed = True
                    if self._seen[i] > rule.after:
                        self._fired[i] += 1
                        return rule
                return None
            finally:
                if changed:
                    self._save()

    def _save(self) -> None:
        write_json(self.path, self._view())


def _counter(raw: Any, name: str) -> int:
    value = raw.get(name, 0) if isinstance(raw, dict) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
