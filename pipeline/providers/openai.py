"""OpenAI Batch API backend: files, batches and result downloads on `requests` (wire format: shared/reference/
batch_apis.md §2), and the `Backend` that drives a part through it.

Contract:
- OpenAI has no client-chosen batch id and no idempotency key, and a create ALWAYS makes a new (paid) batch. So a
  part's batch is tagged `metadata.client_key = PartSpec.client_key` and every create is preceded by a
  reconciliation (the recorded batch id, else a scan of the batch list for that tag). A create whose response was
  lost is found by the same scan: inside `_create` before any retry, or by the next `submit`.
- Input files are named `<input_name>.jsonl`; an upload re-attaches to a file with that name and byte size.
- The API key (and the organization / project ids) go only into the headers of API requests, never into messages.
- Result lines are converted to the canonical shape of `pipeline.providers.backend`. Rows the batch never ran
  (error code `batch_expired` / `batch_cancelled`) get no line, so the caller accounts for them as missing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from pipeline.decisions import decision
from pipeline.providers.backend import JobStatus, PartSpec, Save, read_requests
from pipeline.providers.download import is_loopback_url
from pipeline.providers.errors import NotFound, ProviderError
from pipeline.providers.http import JsonApi
from pipeline.providers.job_states import CANCELLED, COMPLETED, EXPIRED, FAILED, IN_PROGRESS
from pipeline.providers.limits import Deadline, DownloadRefused
from targets.atomic import atomic_open, write_bytes
from targets.crashpoints import crashpoint
from targets.manifest import PartRecord

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
MAX_INPUT_LINES = 50_000
MAX_INPUT_BYTES = 200 * 1024**2
MAX_LIST_PAGE = 100
MAX_RESULT_LINE_BYTES = 64 * 1024**2
"""A single result line longer than this is refused rather than read into memory."""
INPUT_FILE = "openai_input.jsonl"
OUTPUT_NAME = "output.jsonl"
ERRORS_NAME = "errors.jsonl"
NOT_RUN_CODES = frozenset({"batch_expired", "batch_cancelled"})
"""Error codes of rows a batch ended before running: no result line (the caller accounts for them as missing)."""

_STATES = {"validating": IN_PROGRESS, "in_progress": IN_PROGRESS, "finalizing": IN_PROGRESS, "cancelling": IN_PROGRESS,
           "completed": COMPLETED, "failed": FAILED, "expired": EXPIRED, "cancelled": CANCELLED}
_PARAMS = {"maxTokens": "max_tokens", "temperature": "temperature", "n": "n", "topP": "top_p"}


class OpenAIClient(JsonApi):
    """One OpenAI project's Batch API (or the emulator's); see the module docstring. `base_url` includes `/v1`."""

    def __init__(self, base_url: str, api_key: str, *, organization: str = "", project: str = "",
                 allow_loopback_http: bool = False, timeout: tuple[float, float] = (5.0, 60.0), max_retries: int = 6,
                 backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> None:
        if not api_key:
            raise ValueError("OpenAI API key is empty")
        super().__init__(base_url, allow_loopback_http=allow_loopback_http, timeout=timeout, max_retries=max_retries,
                         backoff_s=backoff_s, sleep=sleep)
        self._api_key = api_key
        self.organization = organization
        self.project = project

    def __repr__(self) -> str:
        return f"OpenAIClient(base_url={self.base_url!r})"

    @staticmethod
    def missing_env(environ: Mapping[str, str] = os.environ) -> list[str]:
        """The required environment variables that are unset or empty."""
        return [name for name in ("OPENAI_API_KEY",) if not environ.get(name)]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> OpenAIClient:
        """OPENAI_API_KEY is required; OPENAI_BASE_URL defaults to the real API; OPENAI_ORGANIZATION and
        OPENAI_PROJECT are sent as headers when set. Loopback http is allowed exactly when the base URL itself is
        loopback http (the emulator)."""
        missing = cls.missing_env(environ)
        if missing:
            raise ValueError(f"environment variable(s) {', '.join(missing)} must be set for the OpenAI client")
        base_url = environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        loopback_http = urlsplit(base_url).scheme.lower() == "http" and is_loopback_url(base_url)
        return cls(base_url, environ["OPENAI_API_KEY"], organization=environ.get("OPENAI_ORGANIZATION") or "",
                   project=environ.get("OPENAI_PROJECT") or "", allow_loopback_http=loopback_http)

    def auth_headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._api_key}"}
        if self.organization:
            headers["OpenAI-Organization"] = self.organization
        if self.project:
            headers["OpenAI-Project"] = self.project
        return headers

    # ------------------------------------------------------------------------------------------ files

    def upload_file(self, path: Path, filename: str) -> dict[str, Any]:
        """POST /files (multipart, purpose=batch) of `path` under `filename`; the file object.

        An ambiguous failure looks for a file of that name and size before the next attempt (it may have landed)."""
        size = path.stat().st_size
        found: list[dict[str, Any]] = []

        def send() -> requests.Response:
            # Reopened per attempt so a retry sends the whole file again.
            with open(path, "rb") as fh:
                return self._session.post(self.base_url + "/files", data={"purpose": "batch"},
                                          files={"file": (filename, fh, "application/jsonl")},
                                          headers={**self.auth_headers(), "Accept": "application/json"},
                                          timeout=self.timeout)

        def recover() -> dict[str, Any] | None:
            try:
                match = self.find_file(filename, size)
            except ProviderError as exc:
                log.info("lookup after an ambiguous upload of %s failed too (%s)", filename, exc)
                return None
            if match is not None:
                found.append(match)
            return match

        result = self._with_retries("POST /files", send, recover=recover)
        return found[0] if found else result or {}

    def list_files(self, purpose: str = "batch") -> Iterator[dict[str, Any]]:
        """Every file of `purpose`, following `after` / `has_more`."""
        return self._paginate("/files", {"purpose": purpose})

    def find_file(self, filename: str, size: int) -> dict[str, Any] | None:
        """The newest usable batch file named `filename` of `size` bytes, or None."""
        matches = [f for f in self.list_files() if f.get("filename") == filename and f.get("bytes") == size
                   and f.get("status") != "error"]
        return max(matches, key=lambda f: f.get("created_at") or 0) if matches else None

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        return self._request("GET", f"/files/{quote(file_id, safe='')}", allow_404=True)

    def download_file_content(self, file_id: str, dest: Path, *, max_bytes: int, deadline: Deadline) -> int:
        """GET /files/{id}/content into `dest` atomically; the bytes written. At most `max_bytes` within `deadline`
        (DownloadRefused past either); a cut body or 429 / 5xx is retried while the deadline allows; 404 NotFound."""
        url = f"{self.base_url}/files/{quote(file_id, safe='')}/content"
        return self.fetch(url, dest, what=f"download of file {file_id}", max_bytes=max_bytes, deadline=deadline,
                          headers=self.auth_headers())

    # ------------------------------------------------------------------------------------------ batches

    def create_batch(self, input_file_id: str, metadata: dict[str, str], *,
                     lookup: Callable[[], dict[str, Any] | None]) -> tuple[dict[str, Any], bool]:
        """POST /batches; `(batch, created)`. Every create makes a new batch, so `lookup` (find the batch this
        create may already have made) runs before any retry; `created` is False when it found one."""
        body = {"input_file_id": input_file_id, "endpoint": ENDPOINT, "completion_window": COMPLETION_WINDOW,
                "metadata": metadata}
        return self._create("/batches", body, params=None, lookup=lookup)

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        return self._request("GET", f"/batches/{quote(batch_id, safe='')}", allow_404=True)

    def list_batches(self) -> Iterator[dict[str, Any]]:
        """Every batch of the project, newest first, following `after` / `has_more`."""
        return self._paginate("/batches", {"limit": MAX_LIST_PAGE})

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._request("POST", f"/batches/{quote(batch_id, safe='')}/cancel") or {}

    def _paginate(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        cursor = ""
        seen: set[str] = set()
        while True:
            page = self._request("GET", path, params={**params, **({"after": cursor} if cursor else {})}) or {}
            data = page.get("data") or []
            yield from data
            if not page.get("has_more") or not data:
                return
            cursor = str(page.get("last_id") or data[-1].get("id") or "")
            if not cursor or cursor in seen:
                # Stopping silently could hide the batch a reconciliation is looking for.
                raise ProviderError(200, None, f"GET {path}: pagination cursor {cursor!r} repeats or is missing")
            seen.add(cursor)


# ---------------------------------------------------------------------------------------------- requests


def _wire_parameters(part: PartSpec) -> dict[str, Any]:
    """The body parameters of every request of `part`, from its Fireworks-named inference parameters."""
    params = dict(part.inference_parameters)
    if "topK" in params:
        raise ValueError(f"part {part.jkey}: inference parameter topK={params['topK']!r} has no OpenAI equivalent; "
                         "remove top_k from the trial to run it on OpenAI")
    out: dict[str, Any] = {}
    for name, wire in _PARAMS.items():
        if name in params:
            out[wire] = params.pop(name)
    extra = params.pop("extraBody", None)
    if extra:
        try:
            decoded = json.loads(extra) if isinstance(extra, str) else extra
        except ValueError as exc:
            raise ValueError(f"part {part.jkey}: extraBody is not JSON ({exc})") from exc
        if not isinstance(decoded, dict) or set(decoded) - {"stop"}:
            raise ValueError(f"part {part.jkey}: extraBody may only hold {{\"stop\": [...]}} for OpenAI, "
                             f"got {extra!r}")
        if decoded.get("stop"):
            out["stop"] = decoded["stop"]
    if params:
        raise ValueError(f"part {part.jkey}: inference parameter(s) {', '.join(sorted(params))} are not supported "
                         "by the OpenAI backend")
    if "max_tokens" not in out:
        raise ValueError(f"part {part.jkey}: inference parameter maxTokens is required")
    return out


def convert_requests(part: PartSpec) -> bytes:
    """The part's requests as OpenAI batch input lines: deterministic bytes (sorted keys, compact, one line each).

    ValueError naming the part and line for a malformed request, an unsupported parameter, or an input past the
    Batch API's limits (50,000 lines, 200 MB)."""
    params = _wire_parameters(part)
    lines: list[bytes] = []
    size = 0
    for request in read_requests(part):
        wire_body = {"model": part.model, "messages": request.body["messages"], **params}
        if "stop" in request.body and "stop" not in wire_body:
            wire_body["stop"] = request.body["stop"]
        line = json.dumps({"custom_id": request.custom_id, "method": "POST", "url": ENDPOINT, "body": wire_body},
                          sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
        lines.append(line)
        size += len(line)
        if len(lines) > MAX_INPUT_LINES:
            raise ValueError(f"part {part.jkey}: more than {MAX_INPUT_LINES:,} requests, the OpenAI Batch API "
                             "limit per batch; lower batching.lines_per_part")
        if size > MAX_INPUT_BYTES:
            raise ValueError(f"part {part.jkey}: input exceeds {MAX_INPUT_BYTES:,} bytes, the OpenAI Batch API "
                             "limit per file; lower batching.max_part_bytes")
    return b"".join(lines)


# ---------------------------------------------------------------------------------------------- results


def _result_line(obj: Any, where: str) -> dict[str, Any] | None:
    """The canonical line of one OpenAI output / error row; None for a row the batch never ran."""
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError(f"{where}: result row has no custom_id")
    error = obj.get("error")
    if error:
        code = error.get("code") if isinstance(error, dict) else None
        if code in NOT_RUN_CODES:
            return None
        message = error.get("message") if isinstance(error, dict) else str(error)
        return {"custom_id": custom_id, "error": {"code": code or "error", "message": str(message or "")[:2000]}}
    response = obj.get("response")
    if not isinstance(response, dict):
        return {"custom_id": custom_id, "error": {"code": "no_response", "message": "row has neither response "
                                                                                    "nor error"}}
    status = response.get("status_code")
    body = response.get("body")
    if isinstance(status, int) and 200 <= status < 300 and isinstance(body, dict):
        return {"custom_id": custom_id, "response": {"body": body}}
    inner = body.get("error") if isinstance(body, dict) else None
    inner = inner if isinstance(inner, dict) else {}
    return {"custom_id": custom_id, "error": {"code": inner.get("code") or status or "error",
                                              "message": str(inner.get("message") or f"HTTP {status}")[:2000]}}


def convert_results(raw: Path, dest: Path, what: str, max_bytes: int) -> int:
    """Write the canonical lines of the OpenAI result file `raw` to `dest` atomically; the bytes written.

    ValueError naming `what` and the line for a row that is not a JSON object with a custom_id;
    DownloadRefused past `max_bytes`."""
    written = 0
    with open(raw, "rb") as src, atomic_open(dest, "wb") as out:
        lineno = 0
        while line := src.readline(MAX_RESULT_LINE_BYTES + 1):
            lineno += 1
            where = f"{what} line {lineno}"
            if len(line) > MAX_RESULT_LINE_BYTES:
                raise ValueError(f"{where}: longer than {MAX_RESULT_LINE_BYTES:,} bytes, refused")
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise ValueError(f"{where}: not valid JSON ({type(exc).__name__}); the result file is corrupt") from exc
            converted = _result_line(obj, where)
            if converted is None:
                continue
            data = json.dumps(converted, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
            written += len(data)
            if written > max_bytes:
                raise DownloadRefused(f"{what}: converted results exceed the limit of {max_bytes:,} bytes")
            out.write(data)
    return written


# ---------------------------------------------------------------------------------------------- backend


def _remote(record: PartRecord) -> dict[str, Any]:
    """The record's provider ids (`record.remote`), created empty when absent."""
    remote = getattr(record, "remote", None)
    if not isinstance(remote, dict):
        remote = {}
        record.remote = remote
    return remote


def _client_key(batch: dict[str, Any]) -> str:
    metadata = batch.get("metadata")
    return str(metadata.get("client_key") or "") if isinstance(metadata, dict) else ""


class OpenAIBackend:
    """`pipeline.providers.backend.Backend` on the OpenAI Batch API; see the module docstring."""

    name = "openai"
    resends_failed = True

    def __init__(self, client: OpenAIClient) -> None:
        self.client = client

    def input_file(self, part: PartSpec) -> tuple[Path, int]:
        """The part's converted input, (re)written only when its bytes differ; (path, size)."""
        data = convert_requests(part)
        path = part.work_dir / INPUT_FILE
        if not path.exists() or path.read_bytes() != data:
            write_bytes(path, data)
        return path, len(data)

    def upload(self, part: PartSpec, record: PartRecord, save: Save) -> None:
        """Re-attach to `record.remote["input_file_id"]`, else to a listed file of the same name and size, else
        upload; the file id is saved at once."""
        path, size = self.input_file(part)
        filename = f"{part.input_name}.jsonl"
        remote = _remote(record)
        known = remote.get("input_file_id")
        if known:
            existing = self.client.get_file(known)
            if existing is not None and existing.get("filename") == filename and existing.get("bytes") == size \
                    and existing.get("status") != "error":
                return
            log.info("part %s: recorded input file %s is gone or differs, looking for another", part.jkey, known)
        found = self.client.find_file(filename, size)
        if found is None:
            crashpoint("before dataset create")
            found = self.client.upload_file(path, filename)
            crashpoint("after upload")
            if found.get("bytes") != size:
                raise ProviderError(200, None, f"POST /files: {filename} was stored with {found.get('bytes')} bytes, "
                                               f"sent {size}")
        else:
            decision("re-attach", f"file {found.get('id')}", f"part {part.jkey}: already uploaded as {filename}")
        if not found.get("id"):
            raise ProviderError(200, None, f"POST /files: no file id returned for {filename}")
        remote["input_file_id"] = found["id"]
        record.remote = remote
        save(record)

    def _find_batch(self, part: PartSpec, input_file_id: str) -> dict[str, Any] | None:
        """The newest batch tagged with this part generation's client_key, preferring one on `input_file_id`.

        Any batch with the tag counts, whatever its input file: it is this part generation's paid work."""
        matches = [b for b in self.client.list_batches() if _client_key(b) == part.client_key]
        if not matches:
            return None
        return max(matches, key=lambda b: (b.get("input_file_id") == input_file_id, b.get("created_at") or 0))

    def _reconcile(self, part: PartSpec, record: PartRecord, input_file_id: str) -> dict[str, Any] | None:
        if record.job_id.startswith("batch_"):
            batch = self.client.get_batch(record.job_id)
            if batch is not None and _client_key(batch) == part.client_key:
                return batch
        return self._find_batch(part, input_file_id)

    def submit(self, part: PartSpec, record: PartRecord, save: Save, reserve: Callable[[], None]) -> JobStatus:
        """Re-attach to this part generation's batch (recorded id, else the list by client_key); only when there is
        none: `reserve()`, then create (a lost create response is found by the list before any retry)."""
        input_file_id = str(_remote(record).get("input_file_id") or "")
        batch = self._reconcile(part, record, input_file_id)
        if batch is None:
            if not input_file_id:
                raise ValueError(f"part {part.jkey}: no uploaded input file recorded; upload before submit")
            reserve()
            crashpoint("before job create")
            batch, created = self.client.create_batch(
                input_file_id, {"client_key": part.client_key, "part": part.jkey},
                lookup=lambda: self._find_batch(part, input_file_id))
            crashpoint("after job create")
            decision("submit" if created else "re-attach", f"batch {batch.get('id')}",
                     f"part {part.jkey}" if created else "found by its client_key after a lost create response")
        else:
            decision("re-attach", f"batch {batch.get('id')}", f"part {part.jkey} already submitted (client_key "
                     f"{part.client_key})")
        batch_id = batch.get("id")
        if not isinstance(batch_id, str) or not batch_id.startswith("batch_"):
            raise ProviderError(200, None, f"POST /batches: response has no batch id (got {batch_id!r})")
        if record.job_id != batch_id:
            record.job_id = batch_id
            save(record)
        return job_status(batch)

    def status(self, part: PartSpec, record: PartRecord) -> JobStatus | None:
        if not record.job_id.startswith("batch_"):
            return None
        batch = self.client.get_batch(record.job_id)
        return None if batch is None else job_status(batch)

    def download(self, part: PartSpec, record: PartRecord, dest: Path, *, max_bytes: int,
                 deadline: Deadline) -> dict[str, Path]:
        """`output.jsonl` (the output file's rows) and `errors.jsonl` (the error file's), canonical, for the files
        the batch has; raw downloads go through `part.work_dir` and share one `max_bytes` budget."""
        batch = self.client.get_batch(record.job_id) if record.job_id.startswith("batch_") else None
        if batch is None:
            raise NotFound(404, None, f"GET /batches/{record.job_id}: batch of part {part.jkey} not found")
        saved: dict[str, Path] = {}
        budget = converted = max_bytes
        for name, key in ((OUTPUT_NAME, "output_file_id"), (ERRORS_NAME, "error_file_id")):
            file_id = batch.get(key)
            if not file_id:
                continue
            raw = part.work_dir / f"download-{name}"
            try:
                budget -= self.client.download_file_content(str(file_id), raw, max_bytes=budget, deadline=deadline)
                converted -= convert_results(raw, dest / name,
                                             f"{key.removesuffix('_id')} {file_id} of part {part.jkey}", converted)
            finally:
                raw.unlink(missing_ok=True)
            saved[name] = dest / name
        return saved


def job_status(batch: dict[str, Any]) -> JobStatus:
    """One look at a batch as a JobStatus (see the module docstring of `pipeline.providers.job_states`)."""
    state = str(batch.get("status") or "")
    decided = _STATES.get(state, IN_PROGRESS)
    has_output = bool(batch.get("output_file_id") or batch.get("error_file_id"))
    if decided == CANCELLED and has_output:
        # Cancelled with partial results: collected like an expired batch.
        decided = EXPIRED
    counts = batch.get("request_counts") if isinstance(batch.get("request_counts"), dict) else None
    progress = None
    if counts is not None:
        total = int(counts.get("total") or 0)
        done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
        progress = {**counts, "percent": 100 * done // total if total else (100 if decided == COMPLETED else 0)}
    errors = batch.get("errors") if isinstance(batch.get("errors"), dict) else {}
    messages = [f"{e.get('code') or 'error'}: {e.get('message') or ''}"
                + (f" (line {e['line']})" if e.get("line") is not None else "")
                for e in (errors.get("data") or []) if isinstance(e, dict)]
    message = "; ".join(messages)[:2000]
    if not message and decided in (EXPIRED, CANCELLED):
        message = f"batch {state}" + (" with partial results" if has_output else " without results")
    return JobStatus(job_id=str(batch.get("id") or ""), state=state, decided=decided,
                     output=str(batch.get("output_file_id") or ""), progress=progress, message=message,
                     snapshot=batch)
