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

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from pipeline.decisions import decision
from pipeline.providers import job_states
from pipeline.providers.backend import JobStatus, PartSpec, Save
from pipeline.providers.download import check_url, fetch_url, is_loopback_url, redact_url
from pipeline.providers.errors import NotFound, ProviderError
from pipeline.providers.http import RETRY_STATUSES, JsonApi
from pipeline.providers.limits import Deadline, DownloadRefused
from targets.crashpoints import crashpoint
from targets.manifest import PartRecord

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.fireworks.ai"
MAX_MULTIPART_BYTES = 150 * 1024**2
ALREADY = "it already existed (409, or found after a lost response)"


class FireworksClient(JsonApi):
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
        super().__init__(base_url, allow_loopback_http=allow_loopback_http, timeout=timeout, max_retries=max_retries,
                         backoff_s=backoff_s, sleep=sleep)
        self.account_id = account_id
        self._api_key = api_key

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

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"}

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


class FireworksBackend:
    """The Fireworks batch API as a `pipeline.providers.backend.Backend`: the input is a dataset, the batch a job,
    both under ids we choose (`PartSpec.input_name`, `PartSpec.client_key`), so a create is re-attached by GET."""

    name = "fireworks"
    resends_failed = False

    def __init__(self, client: FireworksClient, *, poll_s: float) -> None:
        self.client = client
        self.poll_s = poll_s

    def upload(self, part: PartSpec, record: PartRecord, save: Save) -> None:
        """Create the part's input dataset (or re-attach to it) and upload its lines, then wait until it is READY."""
        client = self.client
        crashpoint("before dataset create")
        dataset = client.get_dataset(record.dataset_id)
        if dataset is None:
            dataset, created = client.create_dataset(record.dataset_id, display_name=part.input_display_name,
                                                     example_count=part.lines)
            decision("create" if created else "re-attach", f"dataset {record.dataset_id}",
                     f"part {part.jkey}, {part.lines} lines" if created else ALREADY)
        else:
            decision("re-attach", f"dataset {record.dataset_id}", f"known remotely, state {dataset.get('state')}")
        declared = int(dataset.get("exampleCount") or part.lines)
        if declared != part.lines:
            raise RuntimeError(f"remote dataset {record.dataset_id} declares {declared} examples but part {part.jkey} "
                               f"has {part.lines}; it is not this part's content. Delete the remote dataset or start a "
                               "new run id.")
        crashpoint("after dataset create")
        if dataset.get("state") != "READY":
            try:
                client.upload_dataset_file(record.dataset_id, part.requests_path)
            except ProviderError as exc:
                # A retried upload whose first attempt landed (response lost) is refused: READY means it did land.
                again = client.get_dataset(record.dataset_id)
                if not again or again.get("state") != "READY":
                    raise
                decision("re-attach", f"dataset {record.dataset_id}",
                         f"upload answered {exc.status} but the dataset is READY")
            crashpoint("after upload")
            client.wait_dataset_ready(record.dataset_id, poll_s=self.poll_s)

    def submit(self, part: PartSpec, record: PartRecord, save: Save, reserve: Callable[[], None]) -> JobStatus:
        """GET the job by its id first; after an interrupted create also look for our display name (a provider that
        did not keep our id); only then reserve and create (a 409 re-attaches)."""
        client = self.client
        interrupted = record.state == "submitting"  # a create may have been sent before a crash
        crashpoint("before job create")
        job = client.get_job(record.job_id)
        if job is None and interrupted:
            job = self.find_by_display_name(part.display_name, record.dataset_id)
            if job is not None:  # the provider did not keep our id: adopt the one it chose
                record.job_id = str(job.get("name", "")).rsplit("/", 1)[-1] or record.job_id
        if job is not None:
            decision("re-attach", f"job {record.job_id}", f"part {part.jkey} already submitted, state {job.get('state')}")
        else:
            reserve()
            job, created = client.create_job(
                record.job_id, model=part.model, input_dataset_id=record.dataset_id,
                output_dataset_id=record.output_dataset_id, display_name=part.display_name,
                inference_parameters=part.inference_parameters)
            decision("submit" if created else "re-attach", f"job {record.job_id}",
                     f"part {part.jkey}" if created else ALREADY)
        crashpoint("after job create")
        return self._status(job, record)

    def find_by_display_name(self, display_name: str, dataset_id: str) -> dict[str, Any] | None:
        """Reconcile a create whose id the provider may not have kept: the job with our deterministic display name."""
        for job in self.client.list_jobs():
            if job.get("displayName") == display_name and str(job.get("inputDatasetId", "")).endswith(f"/{dataset_id}"):
                return job
        return None

    def status(self, part: PartSpec, record: PartRecord) -> JobStatus | None:
        job = self.client.get_job(record.job_id)
        return None if job is None else self._status(job, record)

    @staticmethod
    def _status(job: dict[str, Any], record: PartRecord) -> JobStatus:
        state = str(job.get("state") or "")
        progress = job.get("jobProgress") if isinstance(job.get("jobProgress"), dict) else None
        status = job.get("status") if isinstance(job.get("status"), dict) else {}
        return JobStatus(job_id=record.job_id, state=state, decided=job_states.classify(state),
                         output=str(job.get("outputDatasetId") or record.output_dataset_id).split("/")[-1],
                         progress=progress, message=str(status.get("message") or ""), snapshot=job)

    def download(self, part: PartSpec, record: PartRecord, dest: Path, *, max_bytes: int,
                 deadline: Deadline) -> dict[str, Path]:
        return self.client.download_dataset(record.output_dataset_id, dest, max_bytes=max_bytes, deadline=deadline)
