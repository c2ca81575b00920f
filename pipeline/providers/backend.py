"""The provider interface the part tasks use: one `Backend` per provider API (Fireworks, OpenAI, Anthropic, local).

A part goes through `upload` → `submit` → `status` (until it ends) → `download`. Every method may be called again
after a crash at any point and must then re-attach to what exists remotely instead of repeating it; `submit` in
particular creates a paid batch at most once per part generation (see its contract).

Shapes shared by every backend:
- Request lines on disk (`PartSpec.requests_path`) are in the build's shape, `{"custom_id": ours, "body":
  {"messages": [...]}}`, with the job-level parameters in `PartSpec.inference_parameters` under their Fireworks names
  (`maxTokens`, `temperature`, `n`, optional `topP`, `topK`, `extraBody` = JSON text `{"stop": [...]}`). A backend
  converts them to its wire format deterministically (the same part always gives the same bytes).
- Result lines a backend's `download` writes are in the canonical shape `parsing.py` reads, with our custom ids:
  `{"custom_id", "response": {"body": {"choices": [{"message": {"content"}, "finish_reason"}], "usage":
  {"prompt_tokens", "completion_tokens", "total_tokens", ...}}}}`, or `{"custom_id", "error": {"code", "message"}}`
  for a request the provider answered with an error. Requests without any line are accounted for by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.providers.limits import Deadline
from targets.manifest import PartRecord

Save = Callable[[PartRecord], None]


@dataclass(frozen=True)
class PartSpec:
    """What a backend knows of one generation of one part."""

    jkey: str
    """The part's job key, e.g. `t07_control_p02` (for messages)."""
    requests_path: Path
    lines: int
    model: str
    inference_parameters: dict[str, Any]
    request_sha256: str
    client_key: str
    """Deterministic identity of this part generation within the run (run id, request checksum, generation):
    `[a-z0-9-]`, at most 63 characters. The Fireworks job id; the OpenAI `metadata.client_key`."""
    input_name: str
    """Deterministic name of the part's uploaded input (Fireworks dataset id, OpenAI file name stem)."""
    output_name: str
    """Deterministic name of the part's output (Fireworks output dataset id)."""
    display_name: str
    work_dir: Path
    """A durable directory of this part that only its backend writes (converted inputs, the local journal)."""
    input_display_name: str = ""
    """A readable name for the uploaded input, where the provider shows one."""


@dataclass(frozen=True)
class JobStatus:
    """One look at a part's batch."""

    job_id: str
    """The provider's id of the batch (recorded as the part's `job_id`)."""
    state: str
    """The provider's own state text (recorded as `provider_state`)."""
    decided: str
    """`pipeline.providers.job_states`: in_progress, completed, failed, expired (ended with partial output, which is
    collected) or cancelled."""
    output: str = ""
    """Where the results are (output dataset id, output file id, results URL); "" while there are none."""
    progress: dict[str, Any] | None = None
    """Provider progress counters, with `percent` when known."""
    message: str = ""
    snapshot: dict[str, Any] | None = None
    """The provider's raw JSON, written as the part's job breadcrumb."""


@dataclass(frozen=True)
class Request:
    """One request line of a part, as built: our custom id and its body (`messages`, optionally `stop`)."""

    custom_id: str
    body: dict[str, Any]
    where: str
    """`<file>:<line>`, for messages."""


def read_requests(part: PartSpec) -> Iterator[Request]:
    """The part's request lines in file order, each checked (`{"custom_id", "body": {"messages": [...]}}` with a
    non-empty list, custom ids unique); ValueError naming the file and line of the first bad one."""
    seen: set[str] = set()
    with open(part.requests_path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{part.requests_path}:{lineno}"
            try:
                row = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"{where}: request line is not JSON ({exc})") from exc
            body = row.get("body") if isinstance(row, dict) else None
            custom_id = row.get("custom_id") if isinstance(row, dict) else None
            if not isinstance(custom_id, str) or not custom_id or not isinstance(body, dict) \
                    or not isinstance(body.get("messages"), list) or not body["messages"]:
                raise ValueError(f"{where}: expected {{\"custom_id\", \"body\": {{\"messages\": [...]}}}}")
            if custom_id in seen:
                raise ValueError(f"{where}: duplicate custom_id {custom_id!r}")
            seen.add(custom_id)
            yield Request(custom_id, body, where)


class Backend(Protocol):
    """One provider API, as the part tasks drive it. See the module docstring for the shapes."""

    name: str
    resends_failed: bool
    """Whether requests a batch ended without an answer for (expired, cancelled, errored) are sent again, once, in a
    follow-up batch of just those requests (OpenAI, Anthropic); otherwise they are recorded as provider errors."""

    def upload(self, part: PartSpec, record: PartRecord, save: Save) -> None:
        """Make the part's requests available to the provider, re-attaching to an input uploaded before (found by
        its deterministic name and size). Provider ids go into `record.remote` (a dict) and are saved with `save` as
        soon as they are known. A provider without uploads does nothing."""

    def submit(self, part: PartSpec, record: PartRecord, save: Save, reserve: Callable[[], None]) -> JobStatus:
        """Create the part's batch exactly once.

        First reconcile: a batch already created for this part generation (by `record.job_id` when it is the
        provider's id, else by `client_key` or the recorded intent) is re-attached. Only when there is none:
        call `reserve()` (it checks stop and budget and persists the write-ahead intent; it raises to refuse),
        then create. The provider's id goes into `record.job_id` and is saved at once. A create whose response was
        lost must be found by the reconciliation of the next call, so a part is never paid twice."""

    def status(self, part: PartSpec, record: PartRecord) -> JobStatus | None:
        """One check of the part's batch; None when the provider does not know it."""

    def download(self, part: PartSpec, record: PartRecord, dest: Path, *, max_bytes: int,
                 deadline: Deadline) -> dict[str, Path]:
        """Save the batch's result files into `dest` (`{name: path}`), in the canonical result shape, writing at
        most `max_bytes` in total within `deadline` (`DownloadRefused` past either). `NotFound` when the output is
        gone for good (the part is then resubmitted once)."""
