"""JSON-over-HTTP transport shared by every provider client: retries, backoff, `Retry-After`, and creates that
are safe to repeat.

Contract:
- Retries: 429 / 500 / 502 / 503 / 504 / 529 and connection errors / timeouts, exponential backoff with jitter,
  honouring `Retry-After` (seconds or HTTP date); other 4xx raise at once. Errors are `pipeline.providers.errors`
  classes whose messages name the method and path.
- A create that fails ambiguously (no response, 5xx) may have committed: `_create` calls its `lookup` before the
  next attempt, and a 409 becomes `(existing, False)` via the lookup, never a blind retry.
- Credentials go only into the headers of API requests (`auth_headers`), never into logs or messages.
- Plain http is refused except to a loopback host when `allow_loopback_http` (the local emulator).
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests

from pipeline.providers.download import check_url, fetch_url, is_loopback_url
from pipeline.providers.errors import AlreadyExists, ProviderError, ProviderUnavailable, RateLimited, error_for_status
from pipeline.providers.limits import Deadline, DownloadRefused

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
AMBIGUOUS_STATUSES = frozenset({500, 502, 503, 504, 529})
MAX_BACKOFF_S = 120.0

_Recover = Callable[[], "dict[str, Any] | None"]


class JsonApi:
    """A provider's REST API under the retry policy of the module docstring; subclasses supply `auth_headers`."""

    def __init__(self, base_url: str, *, allow_loopback_http: bool = False, timeout: tuple[float, float] = (5.0, 60.0),
                 max_retries: int = 6, backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> None:
        base = base_url.rstrip("/")
        self.allow_loopback_http = allow_loopback_http
        self.check_base_url(base)
        self.base_url = base
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._rng = random.Random()
        self._session = requests.Session()
        # Environment proxies must not intercept traffic to the local emulator.
        self._session.trust_env = not is_loopback_url(base)

    def check_base_url(self, base: str) -> None:
        """Raise ValueError for a base URL this client must not talk to (see the module docstring); a subclass
        with a wider policy (the local-server client) overrides it."""
        check_url(base, allow_loopback_http=self.allow_loopback_http)

    def auth_headers(self) -> dict[str, str]:
        """The headers that authenticate one API request."""
        raise NotImplementedError

    def close(self) -> None:
        self._session.close()

    def fetch(self, url: str, dest: Path, *, what: str, max_bytes: int, deadline: Deadline,
              headers: Mapping[str, str] | None = None) -> int:
        """Save `url` into `dest` with `download.fetch_url` (bounded, atomic; `headers` go to the URL's own origin
        only); the bytes written. No response, a cut body or a retryable status is retried while the deadline allows
        another try (DownloadRefused when it does not); other errors, 404 included, raise at once."""
        attempt = 0
        while True:
            try:
                return fetch_url(url, dest, max_bytes=max_bytes, timeout=self.timeout,
                                 allow_loopback_http=self.allow_loopback_http, session=self._session,
                                 deadline=deadline, headers=headers)
            except ProviderError as exc:
                if exc.status not in (0, *RETRY_STATUSES) or attempt >= self.max_retries:
                    raise
                delay = self._delay(attempt, None)
                if delay >= deadline.left():
                    raise DownloadRefused(f"{what}: interrupted ({exc}) with too little of its deadline of "
                                          f"{deadline.seconds:g} s left to retry") from exc
                log.info("%s interrupted (%s), retry %d in %.1f s", what, exc, attempt + 1, delay)
                self._sleep(delay)
                attempt += 1

    def _create(self, path: str, body: dict[str, Any], *, params: dict[str, str] | None,
                lookup: _Recover) -> tuple[dict[str, Any], bool]:
        recovered: list[dict[str, Any]] = []

        def recover() -> dict[str, Any] | None:
            try:
                found = lookup()
            except ProviderError as exc:
                log.info("lookup after an ambiguous create on %s failed too (%s)", path, exc)
                return None
            if found is not None:
                recovered.append(found)
            return found

        try:
            result = self._request("POST", path, params=params, json_body=body, recover=recover)
        except AlreadyExists:
            existing = lookup()
            if existing is None:
                raise
            log.info("create %s: already exists, reusing it", path)
            return existing, False
        if recovered:
            log.info("create %s: found after an ambiguous failure, reusing it", path)
            return recovered[0], False
        return result or {}, True

    def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                 json_body: Any = None, upload: Path | None = None, form: Mapping[str, str] | None = None,
                 allow_404: bool = False, recover: _Recover | None = None) -> dict[str, Any] | None:
        """One API call under the retry policy; see `_with_retries`. `upload` goes as the multipart field `file`,
        beside the fields of `form`."""
        url = self.base_url + path
        return self._with_retries(
            f"{method} {path}",
            lambda: self._send(method, url, params=params, json_body=json_body, upload=upload, form=form),
            allow_404=allow_404, recover=recover)

    def _with_retries(self, shown: str, send: Callable[[], requests.Response], *, allow_404: bool = False,
                      recover: _Recover | None = None) -> dict[str, Any] | None:
        """Call `send` until it succeeds; the JSON body, or None for a 404 when `allow_404`.

        `recover` is called after an ambiguous failure (no response / 5xx); a non-None result ends the call.
        """
        attempt = 0
        while True:
            try:
                resp = send()
            except (requests.ConnectionError, requests.Timeout) as exc:
                failure: ProviderError = ProviderUnavailable(0, None, f"{shown}: {type(exc).__name__}")
                retry_after = None
            else:
                log.debug("%s -> %s", shown, resp.status_code)
                if resp.status_code < 300:
                    return _json_body(resp, shown)
                if resp.status_code == 404 and allow_404:
                    return None
                failure = _error_from(resp, shown)
                if resp.status_code not in RETRY_STATUSES:
                    raise failure
                retry_after = _retry_after(resp)
            if recover is not None and not isinstance(failure, RateLimited) and recover() is not None:
                return None
            if attempt >= self.max_retries:
                raise failure
            delay = self._delay(attempt, retry_after)
            log.info("%s failed (%s), retry %d/%d in %.1f s", shown, failure, attempt + 1, self.max_retries, delay)
            self._sleep(delay)
            attempt += 1

    def _send(self, method: str, url: str, *, params: Mapping[str, Any] | None, json_body: Any,
              upload: Path | None, form: Mapping[str, str] | None = None) -> requests.Response:
        headers = {**self.auth_headers(), "Accept": "application/json"}
        if upload is None:
            return self._session.request(method, url, params=params, json=json_body, headers=headers,
                                         timeout=self.timeout)
        # Reopened per attempt so a retry sends the whole file again.
        with open(upload, "rb") as fh:
            return self._session.request(method, url, params=params, headers=headers, timeout=self.timeout,
                                         data=dict(form or {}), files={"file": (upload.name, fh, "application/octet-stream")})

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_BACKOFF_S)
        return min(self.backoff_s * 2**attempt, MAX_BACKOFF_S) * self._rng.uniform(0.5, 1.5)


def _json_body(resp: requests.Response, shown: str) -> dict[str, Any]:
    if not resp.content.strip():
        return {}
    try:
        data = resp.json()
    except ValueError as exc:
        raise ProviderError(resp.status_code, None, f"{shown}: response is not JSON") from exc
    if not isinstance(data, dict):
        raise ProviderError(resp.status_code, None, f"{shown}: response is not a JSON object")
    return data


def _error_from(resp: requests.Response, shown: str) -> ProviderError:
    """gRPC status `{code, message}`, OpenAI envelope `{error: {message, code}}` or Anthropic envelope `{type: "error",
    error: {type, message}}` (its `error.type` is the code), else the raw text."""
    code: int | str | None = None
    detail = resp.text[:300].strip()
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error") if isinstance(data.get("error"), dict) else data
        code = inner.get("type") if data.get("type") == "error" else inner.get("code")
        detail = str(inner.get("message") or detail)
    return error_for_status(resp.status_code, code, f"{shown}: {detail or resp.reason}")


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()
