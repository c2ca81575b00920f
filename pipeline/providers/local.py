"""Local OpenAI-compatible servers (Ollama, llama.cpp server, vLLM) as a `Backend`: no batch API, so the part's
requests are sent one by one to `POST {base_url}/chat/completions`, and a durable journal makes that resumable.

Contract:
- `LocalClient` talks to one server: loopback http always, http to another host only with `allow_http`, https
  always. An API key (`LOCAL_API_KEY`) is sent as a Bearer header only when set. Each call carries
  `X-Client-Request-Id: <custom_id>` (ignored by real servers; the emulator answers by it), runs under the
  `JsonApi` retry policy (429 / 5xx / connection errors retried with backoff), and refuses a response body larger
  than its per-request bound (`ResponseTooLarge`, not retried).
- `LocalBackend` does the work in `status`: every request of the part that has no line in the journal
  (`work_dir/journal.jsonl`) is sent, at most `max_concurrent_requests` at a time, and each answer is appended
  as it arrives (one writer lock; write + flush + fsync per line), so a kill loses at most the requests in
  flight. A journal line is a canonical result line with our custom_id: `{"custom_id", "response": {"status_code":
  200, "body": <chat.completion>}}`, or `{"custom_id", "error": {"code", "message"}}` for a request answered with
  a 4xx, still failing with a 5xx after the retries, or answering something that is not a bounded
  chat.completion with choices. A torn last line (a kill mid-write) is ignored and truncated away before the
  next append; any other unreadable line is an error naming the journal and the line.
- Not journaled, because they say nothing about the request itself: no response at all or 429 after the retries
  (the pass stops sending and `status` answers in_progress with a message; the next check resumes) and 401/403
  (raised: every request would fail alike). When `should_stop()` turns True, no new request is sent and `status`
  answers in_progress once the requests in flight are journaled.
- The journal belongs to one part generation: `work_dir/journal.json` records its job id and request checksum. A
  journal of another generation is moved aside (`journal.superseded-<n>.jsonl`) before a new one starts, and
  `download` refuses it (`NotFound`). A second process checking the same part concurrently is turned away by an
  exclusive lock on `work_dir/journal.lock` (its `status` answers in_progress without sending anything).
- `download` copies the journal's lines for the part's requests (first answer per custom_id wins, in request-file
  order) into `dest/results.jsonl`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from pipeline.providers import job_states
from pipeline.providers.backend import JobStatus, PartSpec, Save, read_requests
from pipeline.providers.download import check_url
from pipeline.providers.errors import AuthError, NotFound, ProviderError, RateLimited, ServerDown
from pipeline.providers.http import JsonApi
from pipeline.providers.limits import BYTES_PER_TOKEN, Deadline, DownloadRefused, ensure_free_space
from targets.atomic import atomic_open, write_json
from targets.manifest import PartRecord

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:11434/v1"
REQUEST_ID_HEADER = "X-Client-Request-Id"
RESPONSE_ENVELOPE_BYTES = 64 * 1024
"""Allowance of one response beyond its generated text: ids, usage, logprob-free choice envelopes."""
JOURNAL = "journal.jsonl"
JOURNAL_META = "journal.json"
JOURNAL_LOCK = "journal.lock"
RESULTS = "results.jsonl"
_DEADLINE_EVERY = 256  # lines copied between deadline checks in `download`


class ResponseTooLarge(ProviderError):
    """A server answered more bytes than one request can legitimately produce (not retried)."""


class InvalidCompletion(ValueError):
    """A 2xx answer that is not a chat.completion with choices."""


class JournalError(ValueError):
    """A journal line other than the last cannot be read: the journal is damaged."""


# ---------------------------------------------------------------------------------------------- the client


class LocalClient(JsonApi):
    """One local OpenAI-compatible server; see the module docstring."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, *, allow_http: bool = False,
                 max_connections: int = 16, timeout: tuple[float, float] = (5.0, 600.0), max_retries: int = 6,
                 backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> None:
        # Read by check_base_url, which JsonApi.__init__ calls.
        self.allow_http = allow_http
        super().__init__(base_url, allow_loopback_http=True, timeout=timeout, max_retries=max_retries,
                         backoff_s=backoff_s, sleep=sleep)
        self._api_key = api_key or ""
        self.size_pool(max_connections)

    def __repr__(self) -> str:
        return f"LocalClient(base_url={self.base_url!r}, api_key={'set' if self._api_key else 'unset'})"

    @classmethod
    def from_env(cls, base_url: str = DEFAULT_BASE_URL, *, allow_http: bool = False,
                 environ: Mapping[str, str] = os.environ, **kwargs: Any) -> LocalClient:
        """A client whose API key is `LOCAL_API_KEY` when set (local servers mostly need none)."""
        return cls(base_url, environ.get("LOCAL_API_KEY") or None, allow_http=allow_http, **kwargs)

    def size_pool(self, connections: int) -> None:
        """Keep up to `connections` open connections, one per concurrent request (requests' default pool of 10
        would close and reopen the rest)."""
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(1, connections))
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def check_base_url(self, base: str) -> None:
        parts = urlsplit(base)
        if self.allow_http and parts.scheme.lower() == "http" and parts.hostname:
            return
        check_url(base, allow_loopback_http=True)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def reachable(self) -> str:
        """"" when the server answers at all (any HTTP status), else why not: one quick try, no retries, so a server
        that is down fails a run at once instead of after every request's backoff."""
        try:
            self._session.get(f"{self.base_url}/models", headers=self.auth_headers(), timeout=(2.0, 10.0)).close()
        except (requests.ConnectionError, requests.Timeout) as exc:
            return f"GET {self.base_url}/models: {type(exc).__name__}"
        return ""

    def chat(self, body: dict[str, Any], request_id: str, *, max_bytes: int) -> dict[str, Any]:
        """POST `{base_url}/chat/completions` under the retry policy; the parsed JSON answer.

        Raises ProviderError subclasses (after the retries for 429 / 5xx / no response), and `ResponseTooLarge`
        when the body exceeds `max_bytes`."""
        path = "/chat/completions"
        url = self.base_url + path
        headers = {REQUEST_ID_HEADER: request_id}

        def send() -> requests.Response:
            return self._send_bounded(url, body, headers, max_bytes, f"POST {path}")

        return self._with_retries(f"POST {path}", send) or {}

    def _send_bounded(self, url: str, body: dict[str, Any], extra_headers: dict[str, str], max_bytes: int,
                      shown: str) -> requests.Response:
        """Send, then read at most `max_bytes` of the body (streamed, so an endless answer costs no memory)."""
        headers = {**self.auth_headers(), "Accept": "application/json", **extra_headers}
        resp = self._session.post(url, json=body, headers=headers, timeout=self.timeout, stream=True)
        try:
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ResponseTooLarge(resp.status_code, "response_too_large",
                                       f"{shown}: response of {int(declared):,} bytes exceeds the bound of "
                                       f"{max_bytes:,}")
            data = bytearray()
            try:
                for chunk in resp.iter_content(1 << 16):
                    data += chunk
                    if len(data) > max_bytes:
                        raise ResponseTooLarge(resp.status_code, "response_too_large",
                                               f"{shown}: response exceeds the bound of {max_bytes:,} bytes")
            except requests.exceptions.ChunkedEncodingError as exc:
                # A body cut mid-way is a connection failure: retried like one.
                raise requests.ConnectionError(f"{shown}: response body cut short") from exc
            # What `resp.content` would have read itself; set here because the body was read under a bound.
            resp._content = bytes(data)
        finally:
            resp.close()
        return resp


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ChatRequest:
    """One request of a part: our custom_id and the exact body sent."""

    custom_id: str
    body: dict[str, Any]


def chat_body(model: str, messages: list[Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The chat-completions body of one request from the part's Fireworks-named inference parameters (see
    `pipeline.providers.backend`). `extraBody` may only carry `stop`: anything else would be silently dropped."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": int(params["maxTokens"]),
                            "temperature": float(params["temperature"]), "n": int(params.get("n", 1))}
    if params.get("topP") is not None:
        body["top_p"] = float(params["topP"])
    if params.get("topK") is not None:
        body["top_k"] = int(params["topK"])
    extra_text = params.get("extraBody")
    if extra_text:
        extra = json.loads(extra_text) if isinstance(extra_text, str) else extra_text
        if not isinstance(extra, dict) or set(extra) - {"stop"}:
            raise ValueError(f"inference parameter extraBody {extra_text!r}: only {{\"stop\": [...]}} is supported "
                             "by the local backend")
        if extra.get("stop"):
            body["stop"] = list(extra["stop"])
    return body


def load_requests(part: PartSpec) -> list[ChatRequest]:
    """The part's requests in file order; ValueError naming file and line for a malformed or duplicate one."""
    out = [ChatRequest(request.custom_id, chat_body(part.model, request.body["messages"], part.inference_parameters))
           for request in read_requests(part)]
    if len(out) != part.lines:
        raise ValueError(f"{part.requests_path}: {len(out)} requests, but part {part.jkey} declares {part.lines}")
    return out


def response_bound(params: Mapping[str, Any]) -> int:
    """The most bytes one answer may take: every generated token as escaped JSON, plus an envelope."""
    return max(int(params.get("n", 1)), 1) * int(params["maxTokens"]) * BYTES_PER_TOKEN + RESPONSE_ENVELOPE_BYTES


def check_completion(body: Any, shown: str) -> dict[str, Any]:
    """`body` when it is a chat.completion with a non-empty list of choices each holding a message."""
    if not isinstance(body, dict) or body.get("object") != "chat.completion":
        raise InvalidCompletion(f"{shown}: answer is not a chat.completion object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise InvalidCompletion(f"{shown}: chat.completion has no choices")
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise InvalidCompletion(f"{shown}: choices[{i}] has no message object")
    if "usage" in body and not isinstance(body["usage"], dict | None):
        raise InvalidCompletion(f"{shown}: usage is not an object")
    return body


def error_line(custom_id: str, code: Any, message: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "error": {"code": code, "message": message[:1000]}}


# ---------------------------------------------------------------------------------------------- the journal


def read_journal(path: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """`({custom_id: (offset, length)} of the first line per id, end of the last complete line)`.

    A last line without its newline, or that does not parse, is torn: it is left out, and the returned end lies
    before it. JournalError for an unreadable line anywhere else."""
    lines: dict[str, tuple[int, int]] = {}
    good_end = 0
    size = path.stat().st_size
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            start = fh.tell()
            raw = fh.readline()
            if not raw:
                return lines, good_end
            lineno += 1
            last = fh.tell() >= size
            try:
                obj = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                obj = None
            cid = obj.get("custom_id") if isinstance(obj, dict) else None
            if not isinstance(cid, str) or not cid or ("response" not in obj and "error" not in obj):
                if last:
                    log.info("%s: torn last line %d ignored", path, lineno)
                    return lines, good_end
                raise JournalError(f"{path}:{lineno} is not a result line; the journal is damaged (move it away "
                                   "to ask every request again)")
            lines.setdefault(cid, (start, len(raw)))
            good_end = fh.tell()


class _Journal:
    """The open journal of one part generation: appends under one lock, each line flushed and fsynced."""

    def __init__(self, path: Path, answered: set[str]) -> None:
        self.path = path
        self.answered = answered
        self._lock = threading.Lock()
        self._fh: IO[bytes] = open(path, "ab")  # noqa: SIM115 (closed by close())

    def append(self, line: dict[str, Any]) -> None:
        data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self.answered.add(line["custom_id"])

    def close(self) -> None:
        self._fh.close()


def _journal_meta(job_id: str, part: PartSpec) -> dict[str, Any]:
    return {"job_id": job_id, "request_sha256": part.request_sha256, "requests": part.lines}


def _journal_is_ours(part: PartSpec, job_id: str) -> bool:
    meta_path = part.work_dir / JOURNAL_META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return False
    return meta == _journal_meta(job_id, part)


@contextlib.contextmanager
def _part_lock(work_dir: Path) -> Iterator[bool]:
    """Holds the part's exclusive lock while inside; yields False (without waiting) when another process has it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / JOURNAL_LOCK, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _open_journal(part: PartSpec, job_id: str) -> _Journal:
    """The part's journal, resumed (torn tail truncated) when it is this generation's, else started afresh."""
    path = part.work_dir / JOURNAL
    if path.exists() and not _journal_is_ours(part, job_id):
        n = 1
        while (aside := part.work_dir / f"journal.superseded-{n}.jsonl").exists():
            n += 1
        log.warning("%s belongs to another generation of part %s; moved to %s", path, part.jkey, aside.name)
        os.replace(path, aside)
    if not path.exists():
        write_json(part.work_dir / JOURNAL_META, _journal_meta(job_id, part))
        return _Journal(path, set())
    lines, good_end = read_journal(path)
    if good_end < path.stat().st_size:
        # Appending after a torn line would glue the next answer onto it.
        os.truncate(path, good_end)
    return _Journal(path, set(lines))


# ---------------------------------------------------------------------------------------------- the backend


class _Halt(Exception):
    """The pass must stop sending: the server is unreachable or rate limits past the retries."""


class LocalBackend:
    """`Backend` over a local OpenAI-compatible server; see the module docstring."""

    name = "local"
    resends_failed = False

    def __init__(self, client: LocalClient, max_concurrent_requests: int, *,
                 should_stop: Callable[[], bool] | None = None) -> None:
        if max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be at least 1, got {max_concurrent_requests}")
        self.client = client
        self.max_concurrent_requests = max_concurrent_requests
        client.size_pool(max_concurrent_requests)
        self.should_stop = should_stop or (lambda: False)

    @staticmethod
    def job_id(part: PartSpec) -> str:
        return f"local-{part.client_key}"

    def upload(self, part: PartSpec, record: PartRecord, save: Save) -> None:
        """Nothing to upload: requests are read from `part.requests_path` when they are sent."""

    def submit(self, part: PartSpec, record: PartRecord, save: Save, reserve: Callable[[], None]) -> JobStatus:
        """Records the part's job id (reserving once per generation); no remote batch exists, `status` sends."""
        job_id = self.job_id(part)
        if record.job_id != job_id:
            reserve()
            record.job_id = job_id
            save(record)
        return JobStatus(job_id=job_id, state="submitted", decided=job_states.IN_PROGRESS,
                         message="requests are sent by the status checks")

    def status(self, part: PartSpec, record: PartRecord) -> JobStatus | None:
        """Send every request not yet journaled (see the module docstring); None before `submit`."""
        job_id = self.job_id(part)
        if record.job_id != job_id:
            return None
        requests_ = load_requests(part)
        with _part_lock(part.work_dir) as locked:
            if not locked:
                return JobStatus(job_id=job_id, state="busy", decided=job_states.IN_PROGRESS,
                                 message=f"another process is answering part {part.jkey}")
            journal = _open_journal(part, job_id)
            try:
                pending = [r for r in requests_ if r.custom_id not in journal.answered]
                down = self.client.reachable() if pending else ""
                if down:
                    raise ServerDown(0, None, f"local server {self.client.base_url} does not answer "
                                                       f"({down}); start it or fix provider.base_url, then run again: "
                                                       f"the {len(journal.answered)} answers journaled so far are kept")
                before = len(journal.answered)
                halted = self._answer(pending, journal, response_bound(part.inference_parameters)) if pending else ""
            finally:
                journal.close()
        wanted = {r.custom_id for r in requests_}
        answered = len(wanted & journal.answered)
        if halted and len(journal.answered) == before:
            # Not one answer in this pass: waiting would only retry a server that is down or refusing us; fail the
            # part with the cause, its journal kept for the next run.
            raise ServerDown(0, None, f"local server {self.client.base_url} gave no answer for part "
                                               f"{part.jkey}: {halted}. Start it or fix provider.base_url, then run "
                                               f"again: the {answered} answers journaled so far are kept")
        total = len(requests_)
        progress = {"percent": 100 * answered // total if total else 100, "answered": answered, "total": total}
        snapshot = {"job_id": job_id, "journal": str(journal.path), "base_url": self.client.base_url, **progress}
        if answered == total:
            return JobStatus(job_id=job_id, state="completed", decided=job_states.COMPLETED,
                             output=str(journal.path), progress=progress, snapshot=snapshot)
        state = "unreachable" if halted else "stopped" if self.should_stop() else "running"
        return JobStatus(job_id=job_id, state=state, decided=job_states.IN_PROGRESS, progress=progress,
                         message=halted, snapshot=snapshot)

    def _answer(self, pending: list[ChatRequest], journal: _Journal, max_bytes: int) -> str:
        """Send `pending` with at most `max_concurrent_requests` in flight, journaling each answer; "" when the pass
        ran to the end or was stopped, else why it halted. Raises what a request raised that is not an answer."""
        slots = threading.BoundedSemaphore(self.max_concurrent_requests)
        halt = threading.Event()
        failures: list[BaseException] = []

        def one(request: ChatRequest) -> None:
            try:
                journal.append(self._answer_one(request, max_bytes))
            except BaseException as exc:  # noqa: BLE001 (collected, then raised by the pass)
                failures.append(exc)
                halt.set()
            finally:
                slots.release()

        with ThreadPoolExecutor(self.max_concurrent_requests, thread_name_prefix="local-chat") as pool:
            for request in pending:
                slots.acquire()
                # Checked after a slot frees up, so a stop or a halt during the wait sends nothing more.
                if halt.is_set() or self.should_stop():
                    slots.release()
                    break
                pool.submit(one, request)
        fatal = [exc for exc in failures if not isinstance(exc, _Halt)]
        if fatal:
            raise fatal[0]
        return str(failures[0]) if failures else ""

    def _answer_one(self, request: ChatRequest, max_bytes: int) -> dict[str, Any]:
        """The journal line of one request; raises _Halt / AuthError for failures that are not about it."""
        cid = request.custom_id
        try:
            body = self.client.chat(request.body, cid, max_bytes=max_bytes)
            return {"custom_id": cid, "response": {"status_code": 200,
                                                   "body": check_completion(body, f"answer to {cid!r}")}}
        except InvalidCompletion as exc:
            return error_line(cid, "invalid_response", str(exc))
        except AuthError:
            raise
        except RateLimited as exc:
            raise _Halt(f"the server still rate-limits after the retries: {exc}") from exc
        except ProviderError as exc:
            if exc.status == 0:
                raise _Halt(f"the server does not answer: {exc}") from exc
            if exc.code is None:
                # A 2xx without a JSON object, or an error status without a code of its own.
                return error_line(cid, "invalid_response" if exc.status < 300 else f"http_{exc.status}", str(exc))
            return error_line(cid, exc.code, str(exc))

    def download(self, part: PartSpec, record: PartRecord, dest: Path, *, max_bytes: int,
                 deadline: Deadline) -> dict[str, Path]:
        """The journal's lines for the part's requests (first per custom_id, in request-file order) as
        `dest/results.jsonl`; NotFound without this generation's journal."""
        path = part.work_dir / JOURNAL
        if not path.exists() or not _journal_is_ours(part, self.job_id(part)):
            raise NotFound(404, None, f"part {part.jkey}: no journal of job {self.job_id(part)} in {part.work_dir}")
        lines, _ = read_journal(path)
        ids = [r.custom_id for r in load_requests(part)]
        ensure_free_space(dest, min(max_bytes, path.stat().st_size), f"download of part {part.jkey}")
        out = dest / RESULTS
        written = 0
        with open(path, "rb") as src, atomic_open(out, "wb") as fh:
            for i, cid in enumerate(ids):
                if i % _DEADLINE_EVERY == 0:
                    deadline.check(f"{i} of {len(ids)} lines copied")
                where = lines.get(cid)
                if where is None:
                    continue
                offset, length = where
                written += length
                if written > max_bytes:
                    raise DownloadRefused(f"part {part.jkey}: results exceed the bound of {max_bytes:,} bytes")
                src.seek(offset)
                fh.write(src.read(length))
        return {RESULTS: out}
