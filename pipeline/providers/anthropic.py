"""Anthropic Message Batches: the REST client (`AnthropicClient`) and the part backend (`AnthropicBackend`).

Wire format: shared/reference/batch_apis.md §3. The client adds the `x-api-key` and `anthropic-version` headers to
API requests and to the results download (only on the API's own host: a `results_url` elsewhere is refused), and
parses the Anthropic error envelope `{"type": "error", "error": {"type", "message"}}` (its `type` becomes the
error's `code`). Retries, backoff and ambiguous-create recovery are `pipeline.providers.http.JsonApi`'s (529
overloaded is retried there).

Custom ids: ours (`dataset|id|condition|temp|k|type`) are not valid Anthropic ids (`^[a-zA-Z0-9_-]{1,64}$`), so
every request goes out as `pipeline.naming.anthropic_id(ours)`; the inverse comes from the part's request file
(built once per part; a collision within a part is refused). Results are written back with OUR ids.

Exactly-once creates without client ids or metadata (the API has neither). `submit`:
1. `record.job_id` already a batch id (`msgbatch_…`) that the API knows: re-attach.
2. A recorded intent (`record.remote["intent"]`: sha256 of the converted requests, their count, the UTC time taken
   before the create, and the ids of the look-alike batches that existed before it) for the same request set:
   list the batches created at or after intent time - `skew_s` whose request counts sum to our count, minus the
   recorded pre-existing ones. An ended candidate is ours only if its results hold exactly our mapped ids; one still
   in progress (or whose results are gone) cannot be inspected and is accepted on count + time alone. One
   candidate: re-attach. Two or more: `AmbiguousBatch` naming them, never another create.
3. Otherwise: the look-alikes existing now are recorded as not ours, the intent is saved, `reserve()` is called,
   then the create goes through `JsonApi._create` whose lookup is step 2 (so a create whose response was lost is
   found, not repeated). The batch id is saved at once.
The residual risk: after a crash between create and saving its id, another part's batch with the same count created
in the same window and still in progress is indistinguishable from ours; then the part refuses (two candidates) or,
if ours is not visible, may attach to the other one. Both need a create whose response was lost at the same time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from pipeline.decisions import decision
from pipeline.naming import ANTHROPIC_ID_RE, anthropic_id
from pipeline.parsing import iter_jsonl_lenient
from pipeline.providers import job_states
from pipeline.providers.backend import JobStatus, PartSpec, Save
from pipeline.providers.download import is_loopback_url, origin
from pipeline.providers.errors import NotFound, ProviderError
from pipeline.providers.http import JsonApi
from pipeline.providers.limits import Deadline, DownloadLimits, DownloadRefused
from targets.atomic import atomic_open, write_bytes
from targets.crashpoints import crashpoint
from targets.manifest import PartRecord

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
BATCHES_PATH = "/v1/messages/batches"
BATCH_ID_RE = re.compile(r"^msgbatch_[A-Za-z0-9_-]{1,128}$")
LIST_PAGE_SIZE = 1000
REQUESTS_FILE = "anthropic_requests.json"
RESULTS_FILE = "results.jsonl"
COUNT_KEYS = ("processing", "succeeded", "errored", "canceled", "expired")
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}
"""Anthropic `stop_reason` -> the OpenAI-style `finish_reason` the scorer reads (`length` = truncated)."""
PARAMETERS = {"maxTokens", "temperature", "n", "topP", "topK", "extraBody"}


class AmbiguousBatch(RuntimeError):
    """More than one remote batch could be this part's: a person must decide (no create is made)."""


# ---------------------------------------------------------------------------------------------- client


class AnthropicClient(JsonApi):
    """The Message Batches API of one API key (or the emulator); see the module docstring."""

    def __init__(self, base_url: str, api_key: str, *, allow_loopback_http: bool = False,
                 timeout: tuple[float, float] = (5.0, 60.0), max_retries: int = 6, backoff_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not api_key:
            raise ValueError("Anthropic API key is empty")
        super().__init__(base_url, allow_loopback_http=allow_loopback_http, timeout=timeout, max_retries=max_retries,
                         backoff_s=backoff_s, sleep=sleep)
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"AnthropicClient(base_url={self.base_url!r})"

    @staticmethod
    def missing_env(environ: Mapping[str, str] = os.environ) -> list[str]:
        """The required environment variables that are unset or empty."""
        return [name for name in ("ANTHROPIC_API_KEY",) if not environ.get(name)]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> AnthropicClient:
        """ANTHROPIC_API_KEY is required; ANTHROPIC_BASE_URL defaults to the real API. Loopback http is allowed
        exactly when the base URL itself is loopback http (the emulator)."""
        missing = cls.missing_env(environ)
        if missing:
            raise ValueError(f"environment variable(s) {', '.join(missing)} must be set for the Anthropic client")
        base_url = environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL
        loopback_http = urlsplit(base_url).scheme.lower() == "http" and is_loopback_url(base_url)
        return cls(base_url, environ["ANTHROPIC_API_KEY"], allow_loopback_http=loopback_http)

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self._api_key, "anthropic-version": API_VERSION}

    @staticmethod
    def _batch_path(batch_id: str, *rest: str) -> str:
        if not BATCH_ID_RE.match(batch_id):
            raise ValueError(f"{batch_id!r} is not an Anthropic message batch id")
        return "/".join((BATCHES_PATH, quote(batch_id, safe=""), *rest))

    def create_batch(self, requests: list[dict[str, Any]], *,
                     lookup: Callable[[], dict[str, Any] | None]) -> tuple[dict[str, Any], bool]:
        """Create a batch of `requests`; `(batch, created)`. After an ambiguous failure `lookup` is asked for the
        batch this create may have made before any retry (see `JsonApi._create`)."""
        batch, created = self._create(BATCHES_PATH, {"requests": requests}, params=None, lookup=lookup)
        return checked_batch(batch, f"POST {BATCHES_PATH}"), created

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        """The batch, or None when the API does not know it (404)."""
        path = self._batch_path(batch_id)
        batch = self._request("GET", path, allow_404=True)
        return None if batch is None else checked_batch(batch, f"GET {path}")

    def list_batches(self, page_size: int = LIST_PAGE_SIZE) -> Iterator[dict[str, Any]]:
        """Every batch of the workspace (newest first, as the API lists them), following `after_id` / `has_more`."""
        after = ""
        seen: set[str] = set()
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if after:
                params["after_id"] = after
            page = self._request("GET", BATCHES_PATH, params=params) or {}
            data = page.get("data")
            if not isinstance(data, list):
                raise ProviderError(200, None, f"GET {BATCHES_PATH}: list response has no data list")
            for item in data:
                yield checked_batch(item, f"GET {BATCHES_PATH}")
            if not page.get("has_more") or not data:
                return
            after = str(page.get("last_id") or data[-1]["id"])
            if after in seen:
                raise ProviderError(200, None, f"GET {BATCHES_PATH}: cursor {after} repeats, stopping pagination")
            seen.add(after)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """Ask the API to cancel the batch (it goes `canceling`, then `ended`)."""
        path = self._batch_path(batch_id, "cancel")
        return checked_batch(self._request("POST", path) or {}, f"POST {path}")

    def download_results(self, url: str, dest: Path, *, max_bytes: int, deadline: Deadline) -> int:
        """Save a batch's `results_url` into `dest` (bounded like `download.fetch_url`); the bytes written.

        The URL must be on the API's own scheme and host, since the API key goes with it; interrupted downloads
        (no response, cut body, retryable status) are retried while the deadline allows. 404: NotFound."""
        if origin(url) != origin(self.base_url):
            raise ValueError(f"refusing results URL on {urlsplit(url).netloc!r}: the API key is only sent to "
                             f"{urlsplit(self.base_url).netloc!r}")
        headers = {**self.auth_headers(), "Accept": "application/binary"}
        return self.fetch(url, dest, what="download of the batch results", max_bytes=max_bytes, deadline=deadline,
                          headers=headers)


def checked_batch(batch: Any, shown: str) -> dict[str, Any]:
    """`batch` when it looks like a MessageBatch (id, processing_status, integer request_counts); else ProviderError."""
    if not isinstance(batch, dict) or not isinstance(batch.get("id"), str) or not BATCH_ID_RE.match(batch["id"]):
        raise ProviderError(200, None, f"{shown}: response is not a message batch with a valid id")
    counts = batch.get("request_counts")
    if not isinstance(batch.get("processing_status"), str) or not isinstance(counts, dict) or not all(
            isinstance(counts.get(k, 0), int) and not isinstance(counts.get(k, 0), bool) and counts.get(k, 0) >= 0
            for k in COUNT_KEYS):
        raise ProviderError(200, None, f"{shown}: batch {batch['id']} has no valid processing_status / request_counts")
    return batch


def request_count(batch: dict[str, Any]) -> int:
    """How many requests a (checked) batch holds: the sum of its request counts, whatever their state."""
    return sum(batch["request_counts"].get(k, 0) for k in COUNT_KEYS)


def _created_at(batch: dict[str, Any]) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(batch.get("created_at")))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------- requests


def wire_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """Job-level parameters (Fireworks names) as Anthropic `params` fields; ValueError for what has no equivalent."""
    unknown = sorted(set(params) - PARAMETERS)
    if unknown:
        raise ValueError(f"inference parameter(s) {', '.join(unknown)} have no Anthropic equivalent")
    n = params.get("n", 1)
    if n not in (None, 1):
        raise ValueError(f"n={n}: Anthropic returns one completion per request; use samples_per_item instead of n")
    max_tokens = params.get("maxTokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"maxTokens must be a positive integer for Anthropic, got {max_tokens!r}")
    out: dict[str, Any] = {"max_tokens": max_tokens}
    temperature = params.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1:
            raise ValueError(f"temperature must be within [0, 1] for Anthropic, got {temperature!r}")
        out["temperature"] = temperature
    if params.get("topP") is not None:
        out["top_p"] = params["topP"]
    if params.get("topK") is not None:
        out["top_k"] = params["topK"]
    stops = _extra_stops(params.get("extraBody"))
    if stops:
        out["stop_sequences"] = stops
    return out


def _extra_stops(extra: Any) -> list[str]:
    if extra in (None, ""):
        return []
    try:
        body = json.loads(extra) if isinstance(extra, str) else extra
    except ValueError as exc:
        raise ValueError(f"extraBody is not valid JSON: {exc}") from exc
    if not isinstance(body, dict) or set(body) - {"stop"}:
        raise ValueError(f"extraBody {extra!r}: only {{\"stop\": [...]}} has an Anthropic equivalent")
    return _stop_list(body.get("stop"), "extraBody.stop")


def _stop_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"{where} must be a string or a list of non-empty strings")
    return list(stops)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise ValueError(f"{where}: system content must be text")


def convert_line(row: Any, base: Mapping[str, Any], model: str, *, prompt_caching: bool, where: str,
                 part: str = "") -> dict[str, Any]:
    """One request line of ours as an Anthropic batch request (custom id mapped); ValueError naming `where`."""
    if not isinstance(row, dict) or not isinstance(row.get("custom_id"), str) or not row["custom_id"]:
        raise ValueError(f"{where}: request line without a custom_id")
    body = row.get("body")
    if not isinstance(body, dict) or set(body) - {"messages", "stop"} or not isinstance(body.get("messages"), list):
        raise ValueError(f"{where}: body must hold messages (and optionally stop) only")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in body["messages"]:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            system.append(_text_of(message.get("content"), where))
        elif role in ("user", "assistant"):
            messages.append({"role": role, "content": message.get("content")})
        else:
            raise ValueError(f"{where}: message role {role!r} has no Anthropic equivalent (system/user/assistant)")
    if not messages:
        raise ValueError(f"{where}: no user message")
    params: dict[str, Any] = {"model": model, **base, "messages": messages}
    line_stops = _stop_list(body.get("stop"), f"{where}: body.stop")
    if line_stops:
        params["stop_sequences"] = list(dict.fromkeys([*params.get("stop_sequences", []), *line_stops]))
    text = "\n\n".join(s for s in system if s)
    if text:
        params["system"] = ([{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
                            if prompt_caching else text)
    return {"custom_id": anthropic_id(row["custom_id"], part), "params": params}


def inverse_ids(custom_ids: Iterator[str] | list[str], where: str, part: str = "") -> dict[str, str]:
    """`{anthropic_id(ours, part): ours}` over a part's custom ids; ValueError on a duplicate or a collision."""
    inverse: dict[str, str] = {}
    for ours in custom_ids:
        mapped = anthropic_id(ours, part)
        prior = inverse.setdefault(mapped, ours)
        if prior != ours:
            raise ValueError(f"{where}: custom ids {prior!r} and {ours!r} map to the same Anthropic id {mapped}")
        if not ANTHROPIC_ID_RE.match(mapped):
            raise ValueError(f"{where}: mapped id {mapped!r} is not a valid Anthropic custom_id")
    return inverse


# ---------------------------------------------------------------------------------------------- results


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def canonical_line(row: dict[str, Any], ours: str) -> dict[str, Any]:
    """One Anthropic result line as the canonical result shape (see `pipeline.providers.backend`), with our id."""
    result = row.get("result") if isinstance(row.get("result"), dict) else {}
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            return {"custom_id": ours, "error": {"code": "malformed_result", "message": "succeeded result without "
                                                                                        "a message content list"}}
        text = "".join(b["text"] for b in content
                       if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))
        usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
        cache_read = _count(usage.get("cache_read_input_tokens"))
        cache_creation = _count(usage.get("cache_creation_input_tokens"))
        prompt = _count(usage.get("input_tokens")) + cache_read + cache_creation
        completion = _count(usage.get("output_tokens"))
        stop_reason = message.get("stop_reason") if isinstance(message.get("stop_reason"), str) else ""
        return {"custom_id": ours, "response": {"body": {
            "id": str(message.get("id") or ""), "model": str(message.get("model") or ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH_REASONS.get(stop_reason, stop_reason), "stop_reason": stop_reason}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                      "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_creation}}}}
    if kind == "errored":
        outer = result.get("error") if isinstance(result.get("error"), dict) else {}
        inner = outer.get("error") if isinstance(outer.get("error"), dict) else outer
        return {"custom_id": ours, "error": {"code": str(inner.get("type") or "errored"),
                                             "message": str(inner.get("message") or "request errored")[:2000]}}
    if kind in ("expired", "canceled"):
        return {"custom_id": ours, "error": {"code": kind, "message": f"request {kind} before it was processed"}}
    return {"custom_id": ours, "error": {"code": "unknown_result", "message": f"unknown result type {kind!r}"}}


# ---------------------------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class _Converted:
    requests: list[dict[str, Any]]
    data: bytes
    checksum: str


class AnthropicBackend:
    """`pipeline.providers.backend.Backend` on the Message Batches API; see the module docstring."""

    name = "anthropic"
    resends_failed = True

    def __init__(self, client: AnthropicClient, *, prompt_caching: bool, skew_s: float = 120.0,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.client = client
        self.prompt_caching = prompt_caching
        self.skew_s = skew_s
        self._now = now
        self._inverse: dict[tuple[str, str], dict[str, str]] = {}

    # ---- requests

    def convert(self, part: PartSpec) -> _Converted:
        """The part's requests in Anthropic form and their deterministic bytes (also kept in the work dir)."""
        base = wire_parameters(part.inference_parameters)
        problems: list[str] = []
        ours: list[str] = []
        requests = []
        for lineno, row in iter_jsonl_lenient(part.requests_path, problems):
            requests.append(convert_line(row, base, part.model, prompt_caching=self.prompt_caching,
                                         where=f"{part.requests_path.name}:{lineno}", part=part.client_key))
            ours.append(row["custom_id"])
        if problems:
            raise ValueError(f"{part.jkey}: unreadable request lines: {'; '.join(problems[:3])}")
        if not requests:
            raise ValueError(f"{part.jkey}: {part.requests_path} holds no requests")
        self._inverse[self._key(part)] = inverse_ids(ours, part.jkey, part.client_key)
        data = json.dumps(requests, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
        target = part.work_dir / REQUESTS_FILE
        if not target.exists() or target.read_bytes() != data:
            write_bytes(target, data)
        return _Converted(requests, data, hashlib.sha256(data).hexdigest())

    @staticmethod
    def _key(part: PartSpec) -> tuple[str, str]:
        return str(part.requests_path), part.request_sha256

    def inverse(self, part: PartSpec) -> dict[str, str]:
        """`{mapped id: our custom id}` of the part, built once per part from its request file."""
        key = self._key(part)
        if key not in self._inverse:
            self.convert(part)
        return self._inverse[key]

    def upload(self, part: PartSpec, record: PartRecord, save: Save) -> None:
        """Nothing is uploaded (requests go inline in the create); converting here refuses bad parts early."""
        self.convert(part)

    # ---- submit

    def submit(self, part: PartSpec, record: PartRecord, save: Save, reserve: Callable[[], None]) -> JobStatus:
        converted = self.convert(part)
        count = len(converted.requests)
        expected = set(self.inverse(part))
        limits = DownloadLimits.for_part(count, max_tokens=int(part.inference_parameters["maxTokens"]))
        if BATCH_ID_RE.match(record.job_id or ""):
            batch = self.client.get_batch(record.job_id)
            if batch is not None:
                return self._status(batch)
            log.warning("%s: batch %s is unknown to the API, looking for the part's batch by its intent",
                        part.jkey, record.job_id)
        remote = dict(getattr(record, "remote", None) or {})
        prior = remote.get("intent") if isinstance(remote.get("intent"), dict) else None
        if prior is not None and prior.get("checksum") != converted.checksum:
            prior = None
        started = self._now()
        since = _parse_time(prior["time"]) if prior else started
        excluded = set(prior.get("excluded") or []) if prior else set()
        look_alikes = self._look_alikes(count, since, excluded)
        if prior is not None:
            found = self._choose(part, look_alikes, expected, limits)
            if found is not None:
                decision("re-attach", f"batch {found['id']}", f"part {part.jkey}: created after its recorded intent "
                         f"with its {count} requests")
                return self._attach(part, record, save, found)
        # Whatever looks like our batch now existed before our create: it is not ours.
        excluded |= {b["id"] for b in look_alikes}
        remote["intent"] = {"checksum": converted.checksum, "count": count, "time": _time_text(since),
                            "excluded": sorted(excluded)}
        record.remote = remote
        save(record)
        reserve()

        def lookup() -> dict[str, Any] | None:
            return self._choose(part, self._look_alikes(count, since, excluded), expected, limits)

        crashpoint("before job create")
        batch, created = self.client.create_batch(converted.requests, lookup=lookup)
        crashpoint("after job create")
        decision("submit" if created else "re-attach", f"batch {batch['id']}",
                 f"part {part.jkey}" if created else "found by its request count and time after a lost create response")
        return self._attach(part, record, save, batch)

    def _attach(self, part: PartSpec, record: PartRecord, save: Save, batch: dict[str, Any]) -> JobStatus:
        if record.job_id != batch["id"]:
            record.job_id = batch["id"]
            save(record)
        return self._status(batch)

    def _look_alikes(self, count: int, since: datetime, excluded: set[str]) -> list[dict[str, Any]]:
        """Batches created at or after `since` - skew (or at an unreadable time) holding `count` requests, minus
        `excluded`."""
        start = since - timedelta(seconds=self.skew_s)
        found = []
        for batch in self.client.list_batches():
            created = _created_at(batch)
            if batch["id"] in excluded or request_count(batch) != count or (created is not None and created < start):
                continue
            found.append(batch)
        return found

    def _choose(self, part: PartSpec, look_alikes: list[dict[str, Any]], expected: set[str],
                limits: DownloadLimits) -> dict[str, Any] | None:
        """The one look-alike that may be ours (see the module docstring), None, or AmbiguousBatch."""
        candidates = [b for b in look_alikes if self._may_be_ours(part, b, expected, limits)]
        if len(candidates) > 1:
            ids = ", ".join(b["id"] for b in candidates)
            raise AmbiguousBatch(f"{part.jkey}: batches {ids} could each be this part's (same request count, created "
                                 "after its recorded intent); cancel the wrong one(s) and set the part's job_id, "
                                 "no new batch is created")
        return candidates[0] if candidates else None

    def _may_be_ours(self, part: PartSpec, batch: dict[str, Any], expected: set[str], limits: DownloadLimits) -> bool:
        url = batch.get("results_url")
        if batch["processing_status"] != "ended" or batch.get("archived_at") or not isinstance(url, str) or not url:
            return True  # not inspectable: accepted on count and time
        probe = part.work_dir / f".probe-{batch['id']}.jsonl"
        try:
            self.client.download_results(url, probe, max_bytes=limits.max_bytes,
                                         deadline=Deadline(limits.deadline_s, f"results of batch {batch['id']}"))
        except NotFound:
            return True
        try:
            problems: list[str] = []
            ids = {row.get("custom_id") for _, row in iter_jsonl_lenient(probe, problems)}
            if problems:
                raise ValueError(f"results of batch {batch['id']} are unreadable ({problems[0]}); cannot tell "
                                 "whether it is this part's batch")
        finally:
            probe.unlink(missing_ok=True)
        return ids == expected

    # ---- status and results

    def status(self, part: PartSpec, record: PartRecord) -> JobStatus | None:
        if not BATCH_ID_RE.match(record.job_id or ""):
            return None
        batch = self.client.get_batch(record.job_id)
        return None if batch is None else self._status(batch)

    @staticmethod
    def _status(batch: dict[str, Any]) -> JobStatus:
        state = batch["processing_status"]
        counts = {k: batch["request_counts"].get(k, 0) for k in COUNT_KEYS}
        total = sum(counts.values())
        done = total - counts["processing"]
        progress = {**counts, "total": total, "percent": 100 * done // total if total else 0}
        if state != "ended":
            return JobStatus(batch["id"], state, job_states.IN_PROGRESS, progress=progress, snapshot=batch)
        url = batch.get("results_url")
        output = url if isinstance(url, str) and not batch.get("archived_at") else ""
        failed = {k: v for k, v in counts.items() if k not in ("processing", "succeeded") and v}
        decided = job_states.COMPLETED if not failed and counts["succeeded"] == total else job_states.EXPIRED
        message = ", ".join(f"{v} {k}" for k, v in failed.items())
        return JobStatus(batch["id"], state, decided, output=output, progress=progress, message=message,
                         snapshot=batch)

    def download(self, part: PartSpec, record: PartRecord, dest: Path, *, max_bytes: int,
                 deadline: Deadline) -> dict[str, Path]:
        """The results as `results.jsonl` in canonical shape with our ids. The raw download (bounded by
        `max_bytes`) is a transient file in `dest`; the converted file is bounded by `max_bytes` too."""
        if not BATCH_ID_RE.match(record.job_id or ""):
            raise ValueError(f"{part.jkey}: job_id {record.job_id!r} is not an Anthropic batch id")
        batch = self.client.get_batch(record.job_id)
        if batch is None:
            raise NotFound(404, "not_found_error", f"batch {record.job_id} of {part.jkey} is gone")
        if batch["processing_status"] != "ended":
            raise ProviderError(200, None, f"batch {record.job_id} of {part.jkey} has not ended")
        url = batch.get("results_url")
        if batch.get("archived_at") or not isinstance(url, str) or not url:
            raise NotFound(404, "not_found_error", f"results of batch {record.job_id} ({part.jkey}) are gone")
        inverse = self.inverse(part)
        raw = dest / ".anthropic-results.raw.jsonl"
        target = dest / RESULTS_FILE
        try:
            self.client.download_results(url, raw, max_bytes=max_bytes, deadline=deadline)
            self._convert_results(part, raw, target, inverse, max_bytes)
        finally:
            raw.unlink(missing_ok=True)
        return {RESULTS_FILE: target}

    @staticmethod
    def _convert_results(part: PartSpec, raw: Path, target: Path, inverse: dict[str, str], max_bytes: int) -> None:
        problems: list[str] = []
        written = 0
        foreign = 0
        with atomic_open(target, "wb") as out:
            for lineno, row in iter_jsonl_lenient(raw, problems):
                ours = inverse.get(row.get("custom_id"))  # type: ignore[arg-type]
                if ours is None:
                    foreign += 1
                    if foreign <= 3:
                        log.warning("%s: result line %d has custom_id %.80r, not one of the part's; dropped",
                                    part.jkey, lineno, row.get("custom_id"))
                    continue
                data = (json.dumps(canonical_line(row, ours), ensure_ascii=False) + "\n").encode("utf-8")
                written += len(data)
                if written > max_bytes:
                    raise DownloadRefused(f"{part.jkey}: converted results exceed the limit of {max_bytes} bytes")
                out.write(data)
            if problems:  # raised inside the block, so nothing is kept
                raise ValueError(f"{part.jkey}: results are not valid JSONL: {'; '.join(problems[:3])}")
            if foreign and not written:  # raised inside the block too
                raise NotFound(404, None, f"{part.jkey}: none of the {foreign} results of its batch answer its "
                                          "requests: the batch is another part's (a reconciliation can match a batch "
                                          "still in progress only by its request count and time); resubmitting")
        if foreign:
            log.warning("%s: %d result line(s) with foreign custom ids dropped", part.jkey, foreign)


def _time_text(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: Any) -> datetime:
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError as exc:
        raise ValueError(f"recorded intent time {text!r} is not an ISO time") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)
