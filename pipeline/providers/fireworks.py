"""Fireworks batch-inference REST client (datasets, uploads, batch jobs, result downloads) on `requests`.

Contract (wire format: shared/reference/batch_apis.md §1):
- Ids are chosen by the caller; creates are safe to repeat: a 409 ALREADY_EXISTS becomes `(existing, False)` via a
  GET, never a blind retry. When a create fails ambiguously (connection error, timeout, 5xx) the resource is
  looked up before the next attempt, because the create may have committed. `created` is True only when this
  call's own create was confirmed by a 2xx.
- Retries: 429 / 500 / 502 / 503 / 504 and connection errors / timeouts, exponential backoff with jitter, honouring
  `Retry-After` (seconds or HTTP date); other 4xx raise at once. Errors are `pipeline.providers.errors` classes
  whose messages name the method and path. The API key is only ever put in the Authorization header of API
  requests (never on signed URLs, never in logs or messages).
- Plain http is refused except to a loopback host when `allow_loopback_http` (the local emulator).
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from pipeline.providers.download import check_url, fetch_url, is_loopback_url, redact_url
from pipeline.providers.errors import (
    AlreadyExists,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    error_for_status,
)
from pipeline.providers.limits import Deadline, DownloadRefused

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.fireworks.ai"
MAX_MULTIPART_BYTES = 150 * 1024**2
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
AMBIGUOUS_STATUSES = frozenset({500, 502, 503, 504})
MAX_BACKOFF_S = 120.0

_Recover = Callable[[], "dict[str, Any] | None"]


class FireworksClient:
    """One account of the Fireworks control plane (or the emulator); see the module docstring."""

    multipart_limit_bytes: int = MAX_MULTIPART_BYTES
    """Uploads above this size use the signed-URL flow; an instance attribute so tests can lower it."""

    def __init__(self, base_url: str, api_key: str, account_id: str, *, allow_loopback_http: bool = False,
                 timeout: tuple[float, float] = (5.0, 60.0), max_retries: int = 6, backoff_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not api_key:
            raise ValueError("Fireworks API key is empty")
        if not account_id:
            raise ValueError("Fireworks account id is empty")
        base = base_url.rstrip("/")
        check_url(base, allow_loopback_http=allow_loopback_http)
        self.base_url = base
        self.account_id = account_id
        self.allow_loopback_http = allow_loopback_http
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._api_key = api_key
        self._rng = random.Random()
        self._session = requests.Session()
        # Environment proxies must not intercept traffic to the local emulator.
        self._session.trust_env = not is_loopback_url(base)

    def __repr__(self) -> str:
        return f"FireworksClient(base_url={self.base_url!r}, account_id={self.account_id!r})"

    @staticmethod
    def missing_env(environ: Mapping[str, str] = os.environ) -> list[str]:
        """The required environment variables that are unset or empty."""
        return [name for name in ("FIREWORKS_API_KEY", "FIREWORKS_ACCOUNT_ID") if not environ.get(name)]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FireworksClient:
        """FIREWORKS_API_KEY and FIREWORKS_ACCOUNT_ID are required; FIREWORKS_BASE_URL defaults to the real API.

        Loopback http is allowed exactly when the base URL itself is loopback http (the emulator).
        """
        missing = cls.missing_env(environ)
        if missing:
            raise ValueError(f"environment variable(s) {', '.join(missing)} must be set for the Fireworks client")
        base_url = environ.get("FIREWORKS_BASE_URL") or DEFAULT_BASE_URL
        loopback_http = urlsplit(base_url).scheme.lower() == "http" and is_loopback_url(base_url)
        return cls(base_url, environ["FIREWORKS_API_KEY"], environ["FIREWORKS_ACCOUNT_ID"],
                   allow_loopback_http=loopback_http)

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------------------------------ names

    def dataset_name(self, dataset_id: str) -> str:
        """Full resource name; a name already starting with `accounts/` is returned unchanged."""
        return dataset_id if dataset_id.startswith("accounts/") else f"accounts/{self.account_id}/datasets/{dataset_id}"

    @staticmethod
    def bare_id(name: str) -> str:
        """`accounts/a/datasets/x` -> `x` (bare ids pass through)."""
        return name.rsplit("/", 1)[-1]

    def _path(self, *segments: str) -> str:
        return f"/v1/accounts/{quote(self.account_id, safe='')}/" + "/".join(quote(s, safe=":") for s in segments)

    # ------------------------------------------------------------------------------------------ datasets

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        return self._request("GET", self._path("datasets", self.bare_id(dataset_id)), allow_404=True)

    def create_dataset(self, dataset_id: str, *, display_name: str, example_count: int) -> tuple[dict[str, Any], bool]:
        body = {"datasetId": dataset_id,
                "dataset": {"displayName": display_name, "userUploaded": {}, "exampleCount": str(int(example_count)),
                            "format": "CHAT"}}
        return self._create(self._path("datasets"), body, params=None, lookup=lambda: self.get_dataset(dataset_id))

    def upload_dataset_file(self, dataset_id: str, path: Path) -> None:
        """Upload one input file: `:upload` multipart up to the limit, else the signed-URL flow."""
        size = path.stat().st_size
        ds_path = self._path("datasets", f"{dataset_id}:upload")
        if size <= self.multipart_limit_bytes:
            self._request("POST", ds_path, upload=path)
            return
        endpoint = self._request("POST", self._path("datasets", f"{dataset_id}:getUploadEndpoint"),
                                 json_body={"filenameToSize": {path.name: str(size)}}) or {}
        urls = endpoint.get("filenameToSignedUrls") or {}
        if path.name not in urls:
            raise ProviderError(200, None, f"POST {ds_path}: no signed URL returned for {path.name!r}")
        self._put_signed(urls[path.name], path, size)
        self._request("POST", self._path("datasets", f"{dataset_id}:validateUpload"), json_body={})

    def _put_signed(self, url: str, path: Path, size: int) -> None:
        """PUT the raw bytes to a signed storage URL: no API key, exactly the signed headers."""
        check_url(url, allow_loopback_http=self.allow_loopback_http)
        headers = {"Content-Type": "application/octet-stream", "x-goog-content-length-range": f"{size},{size}"}

        def send() -> requests.Response:
            with open(path, "rb") as fh:
                return self._session.put(url, data=fh, headers=headers, timeout=self.timeout)

        self._with_retries(f"PUT {redact_url(url)}", send)

    def wait_dataset_ready(self, dataset_id: str, *, timeout_s: float = 900, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll until the dataset is READY; NotFound if it vanishes, TimeoutError past `timeout_s`."""
        started = time.monotonic()
        slept = 0.0
        while True:
            dataset = self.get_dataset(dataset_id)
            if dataset is None:
                raise NotFound(404, 5, f"GET {self._path('datasets', dataset_id)}: dataset disappeared while waiting")
            if dataset.get("state") == "READY":
                return dataset
            # Count injected sleeps too, so a fake sleep still ends the loop.
            if max(time.monotonic() - started, slept) >= timeout_s:
                raise TimeoutError(f"dataset {dataset_id} still {dataset.get('state')!r} after {timeout_s:g} s")
            self._sleep(poll_s)
            slept += poll_s

    # ------------------------------------------------------------------------------------------ jobs

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._request("GET", self._path("batchInferenceJobs", self.bare_id(job_id)), allow_404=True)

    def create_job(self, job_id: str, *, model: str, input_dataset_id: str, output_dataset_id: str, display_name: str,
                   inference_parameters: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        body = {"model": model, "inputDatasetId": self.dataset_name(input_dataset_id),
                "outputDatasetId": self.dataset_name(output_dataset_id), "displayName": display_name,
                "inferenceParameters": inference_parameters}
        return self._create(self._path("batchInferenceJobs"), body, params={"batchInferenceJobId": job_id},
                            lookup=lambda: self.get_job(job_id))

    def list_jobs(self, page_size: int = 200) -> Iterator[dict[str, Any]]:
        """Every job of the account, following nextPageToken."""
        path = self._path("batchInferenceJobs")
        token = ""
        seen: set[str] = set()
        while True:
            params: dict[str, Any] = {"pageSize": page_size}
            if token:
                params["pageToken"] = token
            page = self._request("GET", path, params=params) or {}
            yield from page.get("batchInferenceJobs") or []
            token = page.get("nextPageToken") or ""
            if not token:
                return
            if token in seen:
                raise ProviderError(200, None, f"GET {path}: nextPageToken repeats, stopping pagination")
            seen.add(token)

    def delete_job(self, job_id: str) -> None:
        """Delete (= cancel) a job; deleting a job that is already gone is not an error."""
        self._request("DELETE", self._path("batchInferenceJobs", self.bare_id(job_id)), allow_404=True)

    # ------------------------------------------------------------------------------------------ results

    def download_dataset(self, dataset_id: str, dest_dir: Path, *, max_bytes: int = 2 * 1024**3,
                         deadline: Deadline | None = None) -> dict[str, Path]:
        """Save every file of a dataset into `dest_dir` by basename; `{basename: path}`.

        Uses the dataset's `externalUrl` when set, else fresh signed URLs from `:getDownloadEndpoint` (re-requested
        after a failed file, since they expire). `max_bytes` bounds the total over all files, `deadline` the whole
        download, retries included (DownloadRefused past either).
        """
        bare = self.bare_id(dataset_id)
        saved: dict[str, Path] = {}
        budget = max_bytes
        attempt = 0
        while True:
            urls = self._download_urls(bare)
            try:
                for name, url in sorted(urls.items()):
                    if name in saved:
                        continue
                    dest = dest_dir / name
                    budget -= fetch_url(url, dest, max_bytes=budget, timeout=self.timeout,
                                        allow_loopback_http=self.allow_loopback_http, session=self._session,
                                        deadline=deadline)
                    saved[name] = dest
                return saved
            except ProviderError as exc:
                # 403: the signed URL expired; 5xx / cut body: transient. Both deserve fresh URLs.
                if exc.status not in (0, 403, *RETRY_STATUSES) or attempt >= self.max_retries:
                    raise
                delay = self._delay(attempt, None)
                if deadline is not None and delay >= deadline.left():
                    raise DownloadRefused(f"download of dataset {bare}: interrupted ({exc}) with too little of its "
                                          f"deadline of {deadline.seconds:g} s left to retry") from exc
                log.info("download of dataset %s interrupted (%s), retrying with fresh URLs", bare, exc)
                self._sleep(delay)
                attempt += 1

    def _download_urls(self, bare: str) -> dict[str, str]:
        dataset = self.get_dataset(bare)
        if dataset is None:
            raise NotFound(404, 5, f"GET {self._path('datasets', bare)}: dataset not found")
        external = dataset.get("externalUrl") or ""
        if external:
            raw = {urlsplit(external).path: external}
        else:
            endpoint = self._request("GET", self._path("datasets", f"{bare}:getDownloadEndpoint")) or {}
            raw = endpoint.get("filenameToSignedUrls") or {}
        urls: dict[str, str] = {}
        for key, url in raw.items():
            name = PurePosixPath(key).name
            if not name or name in (".", "..") or name.startswith("."):
                raise ValueError(f"dataset {bare}: unsafe file name {key!r} in download listing")
            if name in urls:
                raise ValueError(f"dataset {bare}: two files share the basename {name!r}")
            urls[name] = url
        return urls

    # ------------------------------------------------------------------------------------------ transport

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
                 json_body: Any = None, upload: Path | None = None, allow_404: bool = False,
                 recover: _Recover | None = None) -> dict[str, Any] | None:
        """One API call under the retry policy; see `_with_retries`."""
        url = self.base_url + path
        return self._with_retries(f"{method} {path}",
                                  lambda: self._send(method, url, params=params, json_body=json_body, upload=upload),
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
              upload: Path | None) -> requests.Response:
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        if upload is None:
            return self._session.request(method, url, params=params, json=json_body, headers=headers,
                                         timeout=self.timeout)
        # Reopened per attempt so a retry sends the whole file again.
        with open(upload, "rb") as fh:
            return self._session.request(method, url, params=params, headers=headers, timeout=self.timeout,
                                         files={"file": (upload.name, fh, "application/octet-stream")})

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
    """gRPC status `{code, message}` or OpenAI envelope `{error: {message, code}}`, else the raw text."""
    code: int | str | None = None
    detail = resp.text[:300].strip()
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error") if isinstance(data.get("error"), dict) else data
        code = inner.get("code")
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
