"""The OpenAI Batch API semantics of the emulator (shared/reference/batch_apis.md §2), independent of HTTP.

Routes (`OpenAIApi.route`, under any non-empty Bearer key): `POST /v1/files` (multipart `purpose`, `file`),
`GET /v1/files?purpose=&after=&limit=&order=`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
`POST /v1/batches`, `GET /v1/batches?after=&limit=` (newest first, limit ≤ 100), `GET /v1/batches/{id}`,
`POST /v1/batches/{id}/cancel`. Errors are OpenAI envelopes `{"error": {"message", "type", "param", "code"}}`
(`envelope`). State lives in the emulator's store under the account namespace `openai`: records of kind `files`
(contents in `files_dir("openai", <file id>)/content`) and `batches`.

Semantics:
- A create ALWAYS makes a new batch `batch_<hex>` (the real API has no client-chosen id and no dedupe); each is
  counted in `/emulator/calls` under `job_creates`, keyed by `metadata.client_key` (else the batch id). Uploads
  are counted under `uploads`, keyed by file name; content GETs under `downloads`, keyed by file id.
- A missing input file, an unknown endpoint or completion window, or bad metadata is a 400 at create. The lines
  are checked at create too (JSON, unique custom_id, `method` POST, `url` == endpoint, `body.model` and
  `body.messages`, one model per file), but as the real service does it asynchronously: a bad file makes the
  batch `failed` when validation ends, with `errors.data` naming the lines.
- Status follows the clock over the batch's latency L: validating (< L/4), in_progress (< 3L/4), finalizing (< L),
  then the first request that sees it due runs it once under the store lock: answers come from `model.answer`
  with the request's messages; the output file holds `{"id": "batch_req_…", "custom_id", "response":
  {"status_code": 200, "request_id", "body": <chat.completion>}, "error": null}` rows, shuffled (seeded by batch
  id). `request_counts` grow while in progress. Cancel: `cancelling` for L/4, then `cancelled` keeping the share
  of rows done when it was asked (409 for a batch already ended; that status is UNCONFIRMED).

Faults (`pipeline.emulator.faults`); the subject of every job and file fault is the batch's `metadata.client_key`,
else its batch id:
- at create: `job_state` (FAILED -> `failed` with `errors.data`, no files; EXPIRED / EARLY_STOPPED -> `expired`,
  CANCELLED -> `cancelled`, both keeping a `partial` fraction of the rows in the output file, the others in the
  error file as `{"response": null, "error": {"code": "batch_expired" | "batch_cancelled"}}`), `job_latency`
  (`seconds` instead of the server latency; `stuck` stays in_progress).
- when the batch runs: `error_rows` moves a `fraction` of the rows to the error file with `status_code` = the
  rule's `code` (500 unless it is an HTTP error status) and `body.error`.
- any request touching the output file: `output_deleted` deletes it (404 from then on).
- GET of the output file's content: the file kinds (`truncated`, `garbage`, `zip_bomb`, `endless`,
  `lying_length`, `slow_drip`, …) shape that one response exactly as for Fireworks's `BIJOutputSet.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
from pathlib import Path
from typing import Any

from pipeline.emulator import payloads
from pipeline.emulator.api import Emulator, _shaped
from pipeline.emulator.faults import DELETE_KINDS, FILE_KINDS, WRITE_KINDS, pick, request_set
from pipeline.emulator.payloads import Payload
from pipeline.emulator.wire import ROLES, ApiError, multipart_fields
from targets.atomic import write_bytes

ACCT = "openai"
ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/moderations",
             "/v1/images/generations", "/v1/images/edits", "/v1/videos")
SUPPORTED_ENDPOINT = "/v1/chat/completions"
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_FIELDS = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
MAX_BATCH_LINES = 50_000
MAX_BATCH_FILE_BYTES = 200 * 1024**2
MAX_FILES_PAGE = 10_000
MAX_BATCHES_PAGE = 100
DEFAULT_BATCHES_PAGE = 20
DAY_S = 24 * 3600
FILE_TTL_S = 30 * DAY_S
END_STATES = {"JOB_STATE_FAILED": "failed", "JOB_STATE_EXPIRED": "expired", "JOB_STATE_EARLY_STOPPED": "expired",
              "JOB_STATE_CANCELLED": "cancelled"}
"""OpenAI status a `job_state` fault ends a batch in."""
NOT_RUN = {"expired": ("batch_expired", "This request could not be executed before the completion window expired."),
           "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled.")}
TERMINAL = ("completed", "failed", "expired", "cancelled")

_FILES = re.compile(r"/v1/files(?:/([^/]+)(/content)?)?")
_BATCHES = re.compile(r"/v1/batches(?:/([^/]+)(/cancel)?)?")
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 409: "invalid_request_error",
          405: "invalid_request_error"}


class OpenAIError(ApiError):
    """An error response in OpenAI's envelope: HTTP status, `type`, `param`, `code` (`envelope` renders it)."""

    def __init__(self, http_status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(http_status, 0, message)
        self.param = param
        self.oa_code = code


def envelope(exc: ApiError) -> dict[str, Any]:
    """The OpenAI error body of any ApiError raised on these routes."""
    return {"error": {"message": exc.message, "type": _TYPES.get(exc.http_status, "server_error"),
                      "param": getattr(exc, "param", None), "code": getattr(exc, "oa_code", None)}}


def handles(path: str) -> bool:
    """True for the paths `OpenAIApi.route` serves (URL-decoded, no query)."""
    return bool(_FILES.fullmatch(path) or _BATCHES.fullmatch(path))


def _bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def _missing(kind: str, rid: str) -> OpenAIError:
    return OpenAIError(404, f"No such {kind}: {rid}", param="id")


def _hex(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _query_int(query: dict[str, list[str]], name: str, default: int, top: int) -> int:
    text = (query.get(name) or [""])[0]
    if not text:
        return default
    try:
        value = int(text)
    except ValueError as exc:
        raise _bad(f"{name} must be an integer, got {text!r}", name) from exc
    if not 1 <= value <= top:
        raise _bad(f"{name} must be between 1 and {top}, got {value}", name)
    return value


def _list_page(items: list[dict[str, Any]], after: str, limit: int) -> dict[str, Any]:
    """OpenAI cursor paging over `items` (already in list order): the `limit` items after the one with id `after`."""
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise _bad(f"after: no object with id {after!r}", "after")
        start = ids.index(after) + 1
    data = items[start:start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(items)}


def _check_lines(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], str, list[dict[str, Any]]]:
    """(requests, model, errors.data) of a batch input file: every line checked, errors naming their line."""
    errors: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()

    def fail(line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(errors) < 100:
            errors.append({"code": code, "message": message, "param": param, "line": line})

    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        fail(None, "invalid_file_format", "The input file is not UTF-8 encoded.")
        return [], "", errors
    for lineno, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError:
            fail(lineno, "invalid_json_line", "This line is not parseable as valid JSON.")
            continue
        if not isinstance(row, dict):
            fail(lineno, "invalid_json_line", "This line is not a JSON object.")
            continue
        custom_id = row.get("custom_id")
        body = row.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            fail(lineno, "missing_required_parameter", "custom_id is required.", "custom_id")
        elif custom_id in seen:
            fail(lineno, "duplicate_custom_id", f"The custom_id {custom_id!r} is not unique.", "custom_id")
        elif row.get("method") != "POST":
            fail(lineno, "invalid_method", "Only the POST method is supported.", "method")
        elif row.get("url") != endpoint:
            fail(lineno, "mismatched_endpoint", f"The url {row.get('url')!r} does not match the batch endpoint "
                                                f"{endpoint!r}.", "url")
        elif not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            fail(lineno, "missing_required_parameter", "body.model is required.", "body.model")
        elif not isinstance(body.get("messages"), list) or not body["messages"] or not all(
                isinstance(m, dict) and m.get("role") in ROLES for m in body["messages"]):
            fail(lineno, "invalid_request", "body.messages must be a non-empty list of messages with valid roles.",
                 "body.messages")
        else:
            seen.add(custom_id)
            models.add(body["model"])
            rows.append({"custom_id": custom_id, "body": body})
    if not rows and not errors:
        fail(None, "empty_file", "The input file is empty.")
    if len(rows) > MAX_BATCH_LINES:
        fail(None, "too_many_requests", f"The input file has more than {MAX_BATCH_LINES} requests.")
    if len(models) > 1:
        fail(None, "mismatched_model", f"The input file uses several models ({', '.join(sorted(models))}); a batch "
                                       "takes one model.", "body.model")
    return rows, next(iter(models), ""), errors


class OpenAIApi:
    """The OpenAI routes on one `Emulator` (its store, clock, latency, answers and faults); see the module docs."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.store = emu.store

    def route(self, method: str, path: str, query: dict[str, list[str]], content_type: str,
              body: bytes) -> dict[str, Any] | Payload:
        """The 200 answer of one request (a JSON-able dict, or a file body); OpenAIError / ApiError otherwise."""
        if (match := _FILES.fullmatch(path)) is not None:
            file_id, content = match.groups()
            if (method, file_id) == ("POST", None):
                return self.upload(multipart_fields(content_type, body, _bad))
            if (method, file_id) == ("GET", None):
                return self.list_files(query)
            if method == "GET" and file_id is not None:
                return self.file_content(file_id) if content else self.get_file(file_id)
        elif (match := _BATCHES.fullmatch(path)) is not None:
            batch_id, cancel = match.groups()
            if (method, batch_id) == ("POST", None):
                try:
                    spec = json.loads(body or b"{}")
                except ValueError as exc:
                    raise _bad(f"request body is not valid JSON: {exc}") from exc
                return self.create_batch(spec)
            if (method, batch_id) == ("GET", None):
                return self.list_batches(query)
            if batch_id is not None and (method, bool(cancel)) in (("GET", False), ("POST", True)):
                return self.cancel_batch(batch_id) if cancel else self.get_batch(batch_id)
        raise OpenAIError(405, f"{method} {path} is not supported")

    # ---- files

    def upload(self, form: dict[str, tuple[str | None, bytes]]) -> dict[str, Any]:
        purpose = form.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if purpose not in PURPOSES:
            raise _bad(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}", "purpose")
        if "file" not in form:
            raise _bad("file is required", "file")
        filename = Path(form["file"][0] or "").name
        data = form["file"][1]
        if not filename or filename.startswith("."):
            raise _bad(f"invalid file name {filename!r}", "file")
        if purpose == "batch":
            if not filename.endswith(".jsonl"):
                raise _bad("batch input files must have the .jsonl extension", "file")
            if len(data) > MAX_BATCH_FILE_BYTES:
                raise _bad(f"batch input files are limited to {MAX_BATCH_FILE_BYTES} bytes", "file")
        record = self._put_file(f"file-{secrets.token_hex(12)}", filename, purpose, data)
        self.store.count_call("uploads", filename)
        return _render_file(record)

    def _put_file(self, file_id: str, filename: str, purpose: str, data: bytes,
                  **extra: Any) -> dict[str, Any]:
        with self.store.lock:
            record = {"id": file_id, "filename": filename, "purpose": purpose, "bytes": len(data),
                      "create_ns": self.emu.clock(), "seq": self._seq("files"), **extra}
            write_bytes(self.store.files_dir(ACCT, file_id) / "content", data)
            self.store.put(ACCT, "files", record)
        return record

    def _file(self, file_id: str) -> dict[str, Any]:
        """The file record, after an `output_deleted` rule had its chance to delete a batch's output file."""
        with self.store.lock:
            record = self.store.get(ACCT, "files", file_id)
            if record is None:
                raise _missing("File", file_id)
            if record.get("role") == "output" and self.emu.fire(DELETE_KINDS, record["subject"]):
                self.store.delete(ACCT, "files", file_id)
                (self.store.files_dir(ACCT, file_id) / "content").unlink(missing_ok=True)
                raise _missing("File", file_id)
            return record

    def get_file(self, file_id: str) -> dict[str, Any]:
        return _render_file(self._file(file_id))

    def file_content(self, file_id: str) -> Payload:
        record = self._file(file_id)
        self.store.count_call("downloads", file_id)
        path = self.store.files_dir(ACCT, file_id) / "content"
        rule = self.emu.fire(FILE_KINDS, record["subject"]) if record.get("role") == "output" else None
        return payloads.file_payload(path) if rule is None else _shaped(rule, record["subject"], path.read_bytes())

    def list_files(self, query: dict[str, list[str]]) -> dict[str, Any]:
        purpose = (query.get("purpose") or [""])[0]
        order = (query.get("order") or ["desc"])[0]
        if order not in ("asc", "desc"):
            raise _bad(f"order must be asc or desc, got {order!r}", "order")
        records = [r for r in self.store.all(ACCT, "files") if not purpose or r["purpose"] == purpose]
        records.sort(key=lambda r: (r["create_ns"], r["seq"]), reverse=order == "desc")
        limit = _query_int(query, "limit", MAX_FILES_PAGE, MAX_FILES_PAGE)
        return _list_page([_render_file(r) for r in records], (query.get("after") or [""])[0], limit)

    # ---- batches

    def create_batch(self, spec: Any) -> dict[str, Any]:
        if not isinstance(spec, dict):
            raise _bad("request body must be a JSON object")
        unknown = sorted(set(spec) - BATCH_FIELDS)
        if unknown:
            raise _bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
        endpoint = spec.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise _bad(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", "endpoint")
        if endpoint != SUPPORTED_ENDPOINT:
            raise _bad(f"the emulator only runs {SUPPORTED_ENDPOINT} batches", "endpoint")
        if spec.get("completion_window") != "24h":
            raise _bad("completion_window must be '24h'", "completion_window")
        metadata = spec.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 16 or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()):
            raise _bad("metadata must map at most 16 string keys (≤ 64 chars) to strings (≤ 512 chars)", "metadata")
        input_id = spec.get("input_file_id")
        with self.store.lock:
            source = self.store.get(ACCT, "files", input_id) if isinstance(input_id, str) and input_id else None
            if source is None or source["purpose"] != "batch":
                raise _bad(f"input_file_id {input_id!r} is not an uploaded file with purpose 'batch'",
                           "input_file_id")
            data = (self.store.files_dir(ACCT, input_id) / "content").read_bytes()
            rows, model_name, errors = _check_lines(data, endpoint)
            batch_id = f"batch_{secrets.token_hex(12)}"
            subject = metadata.get("client_key") or batch_id
            record = {"id": batch_id, "endpoint": endpoint, "input_file_id": input_id, "metadata": metadata,
                      "model": model_name, "total": len(rows), "validation_errors": errors, "subject": subject,
                      "latency_s": self.emu.latency_s, "create_ns": self.emu.clock(), "seq": self._seq("batches"),
                      "stuck": False, "fault": None, "final_state": None}
            self.emu.bind_job_fault(record, subject)
            self.store.put(ACCT, "batches", record)
            self.store.count_call("job_creates", subject)
        return self._render(record, record["create_ns"], "validating")

    def _seq(self, kind: str) -> int:
        """The creation rank of a new record of `kind` (call under the store lock): it orders lists when records
        share a creation time."""
        return len(self.store.all(ACCT, kind))

    def _record(self, batch_id: str) -> dict[str, Any]:
        record = self.store.get(ACCT, "batches", batch_id)
        if record is None:
            raise _missing("Batch", batch_id)
        return record

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return self._view(self._record(batch_id))

    def list_batches(self, query: dict[str, list[str]]) -> dict[str, Any]:
        records = sorted(self.store.all(ACCT, "batches"), key=lambda r: (r["create_ns"], r["seq"]), reverse=True)
        limit = _query_int(query, "limit", DEFAULT_BATCHES_PAGE, MAX_BATCHES_PAGE)
        return _list_page([self._view(r) for r in records], (query.get("after") or [""])[0], limit)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        with self.store.lock:
            now = self.emu.clock()
            record = self._record(batch_id)
            if self._phase(record, now) == "due":
                record = self._finish(batch_id)
            status = self._phase(record, now)
            if status in TERMINAL:
                raise OpenAIError(409, f"Cannot cancel a batch with status '{status}'.")
            if record.get("cancel_ns") is None:
                record["cancel_ns"] = now
                self.store.put(ACCT, "batches", record)
            return self._render(record, now)

    def _view(self, record: dict[str, Any]) -> dict[str, Any]:
        now = self.emu.clock()
        if self._phase(record, now) == "due":
            record = self._finish(record["id"])
        return self._render(record, now)

    @staticmethod
    def _phase(record: dict[str, Any], now_ns: int) -> str:
        """The batch's status now; "due" when it is time to run it (which decides its final status)."""
        if record.get("final_state"):
            return record["final_state"]
        latency_ns = int(record["latency_s"] * 1e9)
        cancel_ns = record.get("cancel_ns")
        if cancel_ns is not None:
            return "due" if now_ns - cancel_ns >= latency_ns // 4 else "cancelling"
        elapsed = now_ns - record["create_ns"]
        if elapsed < latency_ns // 4:
            return "validating"
        if record["validation_errors"]:
            return "due"
        if record.get("stuck") or elapsed < 3 * latency_ns // 4:
            return "in_progress"
        return "finalizing" if elapsed < latency_ns else "due"

    def _finish(self, batch_id: str) -> dict[str, Any]:
        """Run a due batch once: write its output / error files and persist its final status."""
        with self.store.lock:
            record = self._record(batch_id)
            if record.get("final_state"):
                return record
            fault = record.get("fault") or {}
            latency_ns = int(record["latency_s"] * 1e9)
            end_ns = record["create_ns"] + latency_ns
            status = END_STATES[fault["state"]] if fault.get("fault") == "job_state" else "completed"
            keep = 1.0 if status == "completed" else fault.get("partial", 0.0)
            if record.get("cancel_ns") is not None:
                end_ns = record["cancel_ns"] + latency_ns // 4
                run_ns = record["create_ns"] + latency_ns // 4
                done = (record["cancel_ns"] - run_ns) / max(latency_ns // 2, 1)
                status, keep = "cancelled", min(max(done, 0.0), 1.0)
            if record["validation_errors"]:
                record.update(final_state="failed", errors=record["validation_errors"],
                              end_ns=record["create_ns"] + latency_ns // 4)
            elif status == "failed":
                record.update(final_state="failed", end_ns=end_ns, errors=[
                    {"code": "injected_failure", "message": fault["message"], "param": None, "line": None}])
            else:
                self._run(record, status, keep, end_ns)
            self.store.put(ACCT, "batches", record)
            return record

    def _run(self, record: dict[str, Any], status: str, keep: float, end_ns: int) -> None:
        """Answer the batch's requests into its output / error files; `keep` is the share that ran."""
        source = self.store.files_dir(ACCT, record["input_file_id"]) / "content"
        rows, _, _ = _check_lines(source.read_bytes(), record["endpoint"]) if source.exists() else ([], "", [])
        ids = [row["custom_id"] for row in rows]
        ran = set(ids) if keep >= 1.0 else pick(ids, keep, request_set(ids), (record.get("fault") or {}).get("rule", 0))
        rule = self.emu.fire(WRITE_KINDS, record["subject"])
        failed = pick(sorted(ran), rule.params["fraction"], record["subject"], rule.index) if rule else set()
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for row in rows:
            cid = row["custom_id"]
            req_id = f"batch_req_{_hex(record['id'], cid)}"
            if cid not in ran:
                code, message = NOT_RUN.get(status, NOT_RUN["expired"])
                errors.append({"id": req_id, "custom_id": cid, "response": None,
                               "error": {"code": code, "message": message}})
            elif cid in failed:
                assert rule is not None
                http_status = rule.params["code"] if 400 <= rule.params["code"] <= 599 else 500
                errors.append({"id": req_id, "custom_id": cid, "error": None, "response": {
                    "status_code": http_status, "request_id": _hex("req", record["id"], cid),
                    "body": {"error": {"message": rule.params["message"], "type": "server_error", "param": None,
                                       "code": None}}}})
            else:
                body = self._completion(record, row, end_ns)
                usage["input_tokens"] += body["usage"]["prompt_tokens"]
                usage["output_tokens"] += body["usage"]["completion_tokens"]
                usage["total_tokens"] += body["usage"]["total_tokens"]
                output.append({"id": req_id, "custom_id": cid, "error": None, "response": {
                    "status_code": 200, "request_id": _hex("req", record["id"], cid), "body": body}})
        random.Random(record["id"]).shuffle(output)
        random.Random(record["id"] + "#errors").shuffle(errors)
        files = {}
        for role, rows_out in (("output", output), ("error", errors)):
            if rows_out:
                data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_out).encode("utf-8")
                files[f"{role}_file_id"] = self._put_file(
                    f"file-{_hex('file', record['id'], role)}", f"batch_{record['id']}_{role}.jsonl",
                    f"batch_{role}", data, role=role, subject=record["subject"], batch_id=record["id"])["id"]
        record.update(final_state=status, end_ns=end_ns, usage=usage,
                      request_counts={"total": len(rows), "completed": len(output), "failed": len(errors)}, **files)

    def _completion(self, record: dict[str, Any], row: dict[str, Any], end_ns: int) -> dict[str, Any]:
        custom_id = row["custom_id"]
        content, finish_reason, usage = self.emu.answer(custom_id, row["body"]["messages"])
        # Keyed by what was asked, not by the random batch id: the same request gets the same answer id in any batch,
        # as the other wire formats' answers do (a resumed run's results equal an uninterrupted run's).
        asked = json.dumps(row["body"], sort_keys=True)
        return {"id": f"chatcmpl-{_hex(asked, custom_id)}", "object": "chat.completion",
                "created": end_ns // 10**9, "model": row["body"]["model"], "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage}

    def _render(self, record: dict[str, Any], now_ns: int, status: str | None = None) -> dict[str, Any]:
        """The batch object; `status` overrides the clock's (a create answers `validating`, as the service does)."""
        status = status or self._phase(record, now_ns)
        create_ns = record["create_ns"]
        latency_ns = int(record["latency_s"] * 1e9)
        final = record.get("final_state")
        marks: dict[str, int | None] = {"in_progress_at": None, "finalizing_at": None, "completed_at": None,
                                        "failed_at": None, "expired_at": None, "cancelling_at": None,
                                        "cancelled_at": None}
        if not record["validation_errors"] and status != "validating":
            marks["in_progress_at"] = create_ns + latency_ns // 4
        if status == "finalizing" or (final not in (None, "failed") and record.get("cancel_ns") is None):
            marks["finalizing_at"] = create_ns + 3 * latency_ns // 4
        if record.get("cancel_ns") is not None:
            marks["cancelling_at"] = record["cancel_ns"]
        if final:
            marks[f"{final}_at"] = record["end_ns"]
        counts = record.get("request_counts")
        if counts is None:
            done = 0
            if status == "in_progress" and not record.get("stuck"):
                share = (now_ns - create_ns - latency_ns // 4) / max(latency_ns // 2, 1)
                done = int(record["total"] * min(max(share, 0.0), 1.0))
            elif status == "finalizing":
                done = record["total"]
            counts = {"total": 0 if status == "validating" else record["total"], "completed": done, "failed": 0}
        errors = record.get("errors")
        return {"id": record["id"], "object": "batch", "endpoint": record["endpoint"],
                "errors": {"object": "list", "data": errors} if errors else None,
                "input_file_id": record["input_file_id"], "completion_window": "24h",
                "status": "finalizing" if status == "due" else status,
                "output_file_id": record.get("output_file_id"), "error_file_id": record.get("error_file_id"),
                "created_at": create_ns // 10**9, "expires_at": create_ns // 10**9 + DAY_S,
                **{k: (v // 10**9 if v is not None else None) for k, v in marks.items()},
                "request_counts": counts, "metadata": record["metadata"], "model": record["model"] or None,
                "usage": record.get("usage")}


def _render_file(record: dict[str, Any]) -> dict[str, Any]:
    created = record["create_ns"] // 10**9
    return {"id": record["id"], "object": "file", "bytes": record["bytes"], "created_at": created,
            "expires_at": created + FILE_TTL_S, "filename": record["filename"], "purpose": record["purpose"],
            "status": "processed", "status_details": None}
