"""The Anthropic Message Batches wire format of the emulator (shared/reference/batch_apis.md §3), without HTTP.

Routes (`handle`): `POST /v1/messages/batches` (create: always a new `msgbatch_<hex>` id, no dedupe, 1..100,000
requests, each `custom_id` matching `^[a-zA-Z0-9_-]{1,64}$` and unique; counted under `job_creates` by the new id),
`GET /v1/messages/batches` (newest first; `after_id` / `before_id` / `limit` 1..1000, default 20; `{data, has_more,
first_id, last_id}`), `GET /v1/messages/batches/{id}`, `POST /v1/messages/batches/{id}/cancel`, `GET
/v1/messages/batches/{id}/results` (JSONL, rows shuffled, seeded by batch id; counted under `downloads`). Every
route needs a non-empty `x-api-key` (else 401) and an `anthropic-version` header (else 400); errors use the
Anthropic envelope `{"type": "error", "error": {"type", "message"}}`. Records live in the store under the account
namespace `anthropic` (`batches/<id>.json`, files `<id>/requests.json` and `<id>/results.jsonl`).

A batch is `in_progress` until its latency has passed (then the first request that sees it runs it once under the
store lock and it is `ended`), or `canceling` after a cancel until the next look, which ends it with every request
canceled. `request_counts` stay `{processing: N, others 0}` until the end, as the real API reports them.

Answers: requests carry mapped ids (`pipeline.naming.anthropic_id`), which the emulator cannot invert alone. With an
answer key `<run>/prepared`, the run's request files `<run>/batch_inputs/*.jsonl` (our custom ids) are the oracle:
the map mapped id -> our id is rebuilt with the same function whenever those files change (looked up without the
part tag `p<hex>_` a client puts before it). A known request is
answered by `model.answer(our id, [system] + messages, prepared row)`, so the answer equals the Fireworks
emulator's; an unknown one with the mapped id as seed and no key (a wrong answer). Usage: with a `cache_control`
system block, the first request of a batch with that system text reports it as `cache_creation_input_tokens`, the
later ones as `cache_read_input_tokens` (no minimum cacheable length is simulated); `input_tokens` is the rest.

Faults. Subject of the job and output faults: `"<batch id> <first custom id>"`, the first custom id being ours when
the oracle knows it (a batch id is random, so a plan matches on the custom id, e.g. `"\\|treatment\\|"`).
- create: `job_state` / `job_latency` bound to the batch. At the end, FAILED makes every request `errored`;
  EXPIRED and EARLY_STOPPED make all but a `partial` fraction `expired`, CANCELLED `canceled`.
- end: `error_rows` makes a `fraction` of the succeeded requests `errored` (`api_error` with its message).
- GET results: `output_deleted` archives the batch (results gone: 404, `archived_at` set); the file kinds shape
  that response as for Fireworks (`duplicate_lines` only with `identical: true`: the other variant edits
  Fireworks rows).
HTTP faults apply to these routes as to every other (`pipeline.emulator.server`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import secrets
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.emulator import payloads
from pipeline.emulator.api import Emulator, _shaped
from pipeline.emulator.faults import DELETE_KINDS, FILE_KINDS, WRITE_KINDS, pick, request_set
from pipeline.emulator.payloads import Payload
from pipeline.emulator.store import read_json
from pipeline.emulator.wire import ApiError, rfc3339
from pipeline.naming import ANTHROPIC_ID_RE, anthropic_id
from targets.atomic import write_bytes

log = logging.getLogger(__name__)

ACCT = "anthropic"
PREFIX = "/v1/messages/batches"
MAX_REQUESTS = 100_000
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
BATCH_ID_RE = re.compile(r"^msgbatch_[0-9a-f]{24}$")
PARAM_FIELDS = {"model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k", "stop_sequences",
                "metadata", "stream", "tools", "tool_choice", "thinking", "service_tier"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
"""Anthropic error type per HTTP status; others are `api_error`."""

Reply = tuple[int, Any] | Payload


def _invalid(message: str) -> ApiError:
    return ApiError(400, 3, message)


def _missing(batch_id: str) -> ApiError:
    return ApiError(404, 5, f"message batch {batch_id} not found")


def envelope(exc: ApiError) -> dict[str, Any]:
    """The Anthropic error body for an ApiError."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(exc.http_status, "api_error"), "message": exc.message},
            "request_id": f"req_{secrets.token_hex(12)}"}


class IdOracle:
    """Mapped id -> our custom id, from the request files of the run that owns the answer key (module docstring)."""

    def __init__(self, answer_key: Path | None) -> None:
        self.directory = None if answer_key is None else Path(answer_key).parent / "batch_inputs"
        self._map: dict[str, str] = {}
        self._stamp: tuple[Any, ...] | None = None
        self._lock = threading.Lock()

    def current(self) -> Mapping[str, str]:
        """The map as the request files are now (rebuilt only when a file was added, removed or changed)."""
        if self.directory is None or not self.directory.is_dir():
            return {}
        with self._lock:
            files = sorted(self.directory.glob("*.jsonl"))
            try:
                stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
            except FileNotFoundError:  # a file replaced while we looked: keep the last map, retry next time
                return self._map
            if stamp != self._stamp:
                self._map = self._load(files)
                self._stamp = stamp
            return self._map

    @staticmethod
    def _load(files: list[Path]) -> dict[str, str]:
        mapping: dict[str, str] = {}
        for path in files:
            try:
                with open(path, encoding="utf-8") as fh:
                    for line in fh:
                        try:
                            cid = json.loads(line).get("custom_id")
                        except (ValueError, AttributeError):
                            continue
                        if isinstance(cid, str) and cid:
                            mapping[anthropic_id(cid)] = cid
            except FileNotFoundError:
                continue
        return mapping


def ours_of(oracle: Mapping[str, str], mapped: str) -> str | None:
    """Our custom id of a mapped one, if the oracle knows it (the part tag `p<hex>_` before it is the client's)."""
    return oracle.get(mapped.rsplit("_", 1)[-1])


class AnthropicBatches:
    """The Message Batches semantics over an `Emulator`'s store, clock, faults and answer key."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.store = emu.store
        self.oracle = IdOracle(emu.answers.directory)

    # ---- dispatch

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Mapping[str, str],
               body: bytes) -> Reply:
        """One request to a route under `PREFIX`: `(status, JSON body)` or a results Payload."""
        try:
            if not (headers.get("x-api-key") or "").strip():
                raise ApiError(401, 16, "x-api-key header is required")
            if not (headers.get("anthropic-version") or "").strip():
                raise ApiError(400, 3, "anthropic-version: header is required")
            rest = path[len(PREFIX):].strip("/")
            batch_id, _, verb = rest.partition("/")
            if batch_id and not BATCH_ID_RE.match(batch_id):
                raise _missing(batch_id)
            key = (method, bool(batch_id), verb)
            if key == ("POST", False, ""):
                return 200, self.create(_json(body))
            if key == ("GET", False, ""):
                return 200, self.list(query)
            if key == ("GET", True, ""):
                return 200, self.get(batch_id)
            if key == ("POST", True, "cancel"):
                return 200, self.cancel(batch_id)
            if key == ("GET", True, "results"):
                return self.results(batch_id)
            if verb in ("", "cancel", "results"):
                raise ApiError(405, 12, f"method {method} not allowed on {path}")
            raise ApiError(404, 5, f"no route {path}")
        except ApiError as exc:
            return exc.http_status, envelope(exc)

    # ---- batches

    def create(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"requests"}:
            raise _invalid("body must be an object with exactly one field, requests")
        requests = body["requests"]
        if not isinstance(requests, list) or not 1 <= len(requests) <= MAX_REQUESTS:
            raise _invalid(f"requests must be a list of 1 to {MAX_REQUESTS} requests")
        seen: set[str] = set()
        for i, request in enumerate(requests):
            _check_request(request, i, seen)
        with self.store.lock:
            while True:
                batch_id = f"msgbatch_{secrets.token_hex(12)}"
                if self.store.get(ACCT, "batches", batch_id) is None:
                    break
            write_bytes(self.store.files_dir(ACCT, batch_id) / "requests.json",
                        json.dumps(requests, ensure_ascii=False).encode("utf-8"))
            first = requests[0]["custom_id"]
            subject = f"{batch_id} {ours_of(self.oracle.current(), first) or first}"
            record: dict[str, Any] = {"id": batch_id, "subject": subject, "count": len(requests),
                                      "create_ns": self.emu.clock(), "latency_s": self.emu.latency_s, "stuck": False,
                                      "fault": None, "cancel_ns": None, "end_ns": None, "archive_ns": None,
                                      "counts": None}
            self.emu.bind_job_fault(record, subject)
            self.store.put(ACCT, "batches", record)
            self.store.count_call("job_creates", batch_id)
        return self._render(record)

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._render(self._current(batch_id))

    def list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            limit = int((query.get("limit") or [str(DEFAULT_LIMIT)])[0])
        except ValueError as exc:
            raise _invalid("limit must be an integer") from exc
        if not 1 <= limit <= MAX_LIMIT:
            raise _invalid(f"limit must be within 1..{MAX_LIMIT}")
        records = sorted(self.store.all(ACCT, "batches"), key=lambda r: (r["create_ns"], r["id"]), reverse=True)
        ids = [r["id"] for r in records]
        after = (query.get("after_id") or [""])[0]
        before = (query.get("before_id") or [""])[0]
        if after and before:
            raise _invalid("after_id and before_id cannot both be set")
        for cursor in (after, before):
            if cursor and cursor not in ids:
                raise _invalid(f"cursor {cursor} is not a batch of this workspace")
        if after:
            chosen = records[ids.index(after) + 1:][:limit]
            has_more = ids.index(after) + 1 + limit < len(records)
        elif before:
            end = ids.index(before)
            chosen = records[max(0, end - limit):end]
            has_more = end - limit > 0
        else:
            chosen = records[:limit]
            has_more = limit < len(records)
        data = [self._render(self._current(r["id"])) for r in chosen]
        return {"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    def cancel(self, batch_id: str) -> dict[str, Any]:
        with self.store.lock:
            record = self._current(batch_id)
            if record["end_ns"] is None and record["cancel_ns"] is None:
                record["cancel_ns"] = self.emu.clock()
                self.store.put(ACCT, "batches", record)
        return self._render(record)

    def results(self, batch_id: str) -> Payload:
        with self.store.lock:
            record = self._current(batch_id)
            if record["end_ns"] is None:
                raise _invalid(f"message batch {batch_id} has not ended; results are not available yet")
            if record["archive_ns"] is None and self.emu.fire(DELETE_KINDS, record["subject"]):
                record["archive_ns"] = self.emu.clock()
                self.store.put(ACCT, "batches", record)
                (self.store.files_dir(ACCT, batch_id) / "results.jsonl").unlink(missing_ok=True)
            if record["archive_ns"] is not None:
                raise ApiError(404, 5, f"results of message batch {batch_id} are no longer available")
        self.store.count_call("downloads", batch_id)
        file = self.store.files_dir(ACCT, batch_id) / "results.jsonl"
        rule = self.emu.fire(FILE_KINDS, record["subject"])
        return payloads.file_payload(file) if rule is None else _shaped(rule, batch_id, file.read_bytes())

    # ---- state

    def _current(self, batch_id: str) -> dict[str, Any]:
        """The batch record, ended first when it is due (latency passed, or canceled)."""
        record = self.store.get(ACCT, "batches", batch_id)
        if record is None:
            raise _missing(batch_id)
        if record["end_ns"] is not None:
            return record
        due = record["create_ns"] + int(record["latency_s"] * 1e9)
        if record["cancel_ns"] is not None or (not record["stuck"] and self.emu.clock() >= due):
            with self.store.lock:
                record = self.store.get(ACCT, "batches", batch_id) or record
                if record["end_ns"] is None:
                    self._finish(record, due)
        return record

    def _finish(self, record: dict[str, Any], due_ns: int) -> None:
        """Answer every request of the batch once, write the shuffled results and end the batch."""
        batch_id = record["id"]
        requests = read_json(self.store.files_dir(ACCT, batch_id) / "requests.json") or []
        ids = [r["custom_id"] for r in requests]
        fault = record.get("fault") or {}
        state = fault.get("state") if fault.get("fault") == "job_state" else None
        ended: dict[str, dict[str, Any]] = {}
        if record["cancel_ns"] is not None:
            ended = dict.fromkeys(ids, {"type": "canceled"})
        elif state == "JOB_STATE_FAILED":
            error = {"type": "error", "error": {"type": "api_error", "message": fault["message"]}}
            ended = dict.fromkeys(ids, {"type": "errored", "error": error})
        elif state is not None:
            kept = pick(ids, fault["partial"], request_set(ids), fault["rule"])
            outcome = {"type": "canceled"} if state == "JOB_STATE_CANCELLED" else {"type": "expired"}
            ended = {cid: outcome for cid in ids if cid not in kept}
        oracle = self.oracle.current()
        cached: set[str] = set()
        rows = []
        for request in requests:
            cid = request["custom_id"]
            result = ended.get(cid) or {"type": "succeeded",
                                        "message": self._message(batch_id, request, oracle, cached)}
            rows.append({"custom_id": cid, "result": result})
        rule = self.emu.fire(WRITE_KINDS, record["subject"])
        if rule is not None:
            ok = [r["custom_id"] for r in rows if r["result"]["type"] == "succeeded"]
            failed = pick(ok, rule.params["fraction"], request_set(ids), rule.index)
            error = {"type": "error", "error": {"type": "api_error", "message": rule.params["message"]}}
            for row in rows:
                if row["custom_id"] in failed:
                    row["result"] = {"type": "errored", "error": error}
        random.Random(batch_id).shuffle(rows)
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        write_bytes(self.store.files_dir(ACCT, batch_id) / "results.jsonl", data)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for row in rows:
            counts[row["result"]["type"]] += 1
        end_ns = self.emu.clock() if record["cancel_ns"] is not None else due_ns
        record.update(end_ns=end_ns, counts=counts)
        self.store.put(ACCT, "batches", record)

    def _message(self, batch_id: str, request: dict[str, Any], oracle: Mapping[str, str],
                 cached: set[str]) -> dict[str, Any]:
        """The Message answering one request (see the module docstring for answers and cache usage)."""
        params = request["params"]
        mapped = request["custom_id"]
        ours = ours_of(oracle, mapped)
        system = params.get("system") or ""
        system_text = system if isinstance(system, str) else "".join(b["text"] for b in system)
        messages = ([{"role": "system", "content": system_text}] if system_text else []) + params["messages"]
        content, _, usage = self.emu.answer(ours or mapped, messages)
        cache_read = cache_creation = 0
        if isinstance(system, list) and any("cache_control" in b for b in system):
            system_tokens = min(usage["prompt_tokens"], math.ceil(1.3 * len(system_text.split())))
            if system_text in cached:
                cache_read = system_tokens
            else:
                cache_creation = system_tokens
                cached.add(system_text)
        output_tokens = usage["completion_tokens"]
        truncated = output_tokens > params["max_tokens"]
        # Keyed by what was asked, not by the random batch id: the same request gets the same message id in any batch.
        digest = hashlib.sha256(f"{json.dumps(params, sort_keys=True)}\n{mapped}".encode()).hexdigest()[:24]
        return {"id": f"msg_{digest}", "type": "message", "role": "assistant", "model": params["model"],
                "content": [{"type": "text", "text": content}],
                "stop_reason": "max_tokens" if truncated else "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": usage["prompt_tokens"] - cache_read - cache_creation,
                          "output_tokens": min(output_tokens, params["max_tokens"]),
                          "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_creation}}

    def _render(self, record: dict[str, Any]) -> dict[str, Any]:
        ended = record["end_ns"] is not None
        if ended:
            state = "ended"
        elif record["cancel_ns"] is not None:
            state = "canceling"
        else:
            state = "in_progress"
        counts = record["counts"] if ended else {"processing": record["count"], "succeeded": 0, "errored": 0,
                                                 "canceled": 0, "expired": 0}
        return {"id": record["id"], "type": "message_batch", "processing_status": state, "request_counts": counts,
                "ended_at": rfc3339(record["end_ns"]) if ended else None,
                "created_at": rfc3339(record["create_ns"]),
                "expires_at": rfc3339(record["create_ns"] + 24 * 3600 * 10**9),
                "cancel_initiated_at": rfc3339(record["cancel_ns"]) if record["cancel_ns"] is not None else None,
                "archived_at": rfc3339(record["archive_ns"]) if record["archive_ns"] is not None else None,
                "results_url": f"{self.emu.base_url}{PREFIX}/{record['id']}/results" if ended else None}


def _json(body: bytes) -> Any:
    try:
        return json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise _invalid(f"request body is not valid JSON: {exc}") from exc


def _check_request(request: Any, index: int, seen: set[str]) -> None:
    """400 naming `requests[index]` unless it is `{custom_id, params}` with a valid, unique id and valid params."""
    where = f"requests.{index}"
    if not isinstance(request, dict) or set(request) != {"custom_id", "params"}:
        raise _invalid(f"{where}: must be an object with exactly custom_id and params")
    cid = request["custom_id"]
    if not isinstance(cid, str) or not ANTHROPIC_ID_RE.match(cid):
        raise _invalid(f"{where}.custom_id: must match {ANTHROPIC_ID_RE.pattern}")
    if cid in seen:
        raise _invalid(f"{where}.custom_id: {cid} is used more than once in this batch")
    seen.add(cid)
    params = request["params"]
    if not isinstance(params, dict):
        raise _invalid(f"{where}.params: must be an object")
    unknown = sorted(set(params) - PARAM_FIELDS)
    if unknown:
        raise _invalid(f"{where}.params.{unknown[0]}: Extra inputs are not permitted")
    if not isinstance(params.get("model"), str) or not params["model"]:
        raise _invalid(f"{where}.params.model: Field required")
    max_tokens = params.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _invalid(f"{where}.params.max_tokens: must be a positive integer")
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid(f"{where}.params.messages: must be a non-empty list")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant") or not isinstance(
                message.get("content"), (str, list)):
            raise _invalid(f"{where}.params.messages.{j}: role must be user or assistant, with content")
    system = params.get("system")
    if system is not None and not isinstance(system, str) and not (
            isinstance(system, list)
            and all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) and b["text"]
                    for b in system)):
        raise _invalid(f"{where}.params.system: must be a string or a list of non-empty text blocks")


_APIS: weakref.WeakKeyDictionary[Emulator, AnthropicBatches] = weakref.WeakKeyDictionary()
_APIS_LOCK = threading.Lock()


def handle(emu: Emulator, method: str, path: str, query: dict[str, list[str]], headers: Mapping[str, str],
           body: bytes) -> Reply:
    """`AnthropicBatches.handle` on the one instance per emulator (it keeps the id oracle's cache)."""
    with _APIS_LOCK:
        api = _APIS.get(emu)
        if api is None:
            api = _APIS[emu] = AnthropicBatches(emu)
    return api.handle(method, path, query, headers, body)
