"""The trial manifest, schema v2, as pydantic models.

Keys follow the original system (`schema_version, timestamps, run_id, trial, temps, samples_per_item, prompts,
datasets, jobs, job_status, stage_status`) so its readers keep working; `parts` (per-part remote state) and
`control_registry` are ours. Unknown keys written by other versions are preserved (`extra="allow"`).
`jobs[group][i]` and `datasets[group][i]` always describe part `i+1`: lists are padded, never compacted.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from targets.fingerprint import request_checksum

STAGES = ("downloaded", "parsed", "scored", "stats", "costs", "report", "archived")
StageState = Literal["pending", "in_progress", "completed", "failed", "stale"]
PartState = Literal[
    "planned", "uploading", "uploaded", "submitting", "submitted", "running",
    "completed", "failed", "expired", "cancelled",
]


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True)


class Timestamps(_Open):
    created_at: str = Field(default_factory=utcnow)
    updated_at: str = Field(default_factory=utcnow)


class StageRecord(_Open):
    status: StageState = "pending"
    updated_at: str | None = None
    artifacts: dict[str, Any] = Field(default_factory=dict)


class PartRecord(_Open):
    """Everything known about one part's remote life. Written before every create call (write-ahead intent)."""

    group: str
    index: int = Field(ge=1)
    type: Literal["open", "closed"]
    input_path: str
    input_sha256: str
    lines: int = Field(ge=0)
    model: str
    inference_parameters: dict[str, Any]
    generation: int = Field(default=0, ge=0)
    dataset_id: str
    job_id: str
    output_dataset_id: str
    state: PartState = "planned"
    provider_state: str | None = None
    progress: dict[str, Any] | None = None  # the provider's last jobProgress, as checked
    estimated_usd: float | None = Field(default=None, ge=0)  # budget estimate of one generation, fixed at upload
    resubmissions: int = Field(default=0, ge=0)
    history: list[dict[str, Any]] = Field(default_factory=list)
    updated_at: str = Field(default_factory=utcnow)

    @property
    def request_sha256(self) -> str:
        """The checksum of the requests this record sends (`targets.fingerprint.request_checksum`), from its own
        fields, so records written before the checksum was stored are compared exactly too."""
        return request_checksum(self.input_sha256, self.model, self.inference_parameters)


class TrialManifest(_Open):
    schema_version: Literal[2] = 2
    timestamps: Timestamps = Field(default_factory=Timestamps)
    run_id: str
    trial: dict[str, Any]
    temps: list[float]
    samples_per_item: dict[str, int]
    prompts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    datasets: dict[str, list[str | None]] = Field(default_factory=dict)
    jobs: dict[str, list[str | None]] = Field(default_factory=dict)
    job_status: dict[str, str] = Field(default_factory=dict)
    stage_status: dict[str, StageRecord] = Field(default_factory=lambda: {s: StageRecord() for s in STAGES})
    parts: dict[str, PartRecord] = Field(default_factory=dict)
    control_registry: dict[str, Any] = Field(default_factory=dict)

    @field_validator("stage_status")
    @classmethod
    def _all_stages(cls, value: dict[str, StageRecord]) -> dict[str, StageRecord]:
        for stage in STAGES:
            value.setdefault(stage, StageRecord())
        return value

    def set_stage(self, stage: str, status: StageState, artifacts: dict[str, Any] | None = None) -> None:
        record = self.stage_status.get(stage) or StageRecord()
        record.status = status
        record.updated_at = utcnow()
        if artifacts is not None:
            record.artifacts = artifacts
        self.stage_status[stage] = record

    def stage(self, stage: str) -> StageRecord:
        return self.stage_status.get(stage) or StageRecord()

    def set_part(self, jkey: str, record: PartRecord) -> None:
        """Record a part and mirror it into the original's `datasets` / `jobs` / `job_status` keys."""
        record.updated_at = utcnow()
        self.parts[jkey] = record
        for table, value in ((self.datasets, record.dataset_id), (self.jobs, record.job_id)):
            column = list(table.get(record.group, []))
            column.extend([None] * (record.index - len(column)))
            column[record.index - 1] = value
            table[record.group] = column
        self.job_status[jkey] = record.state


class RunState(_Open):
    """`run_state.json`: run-level facts (schema 1, original-compatible) plus our drift and report records."""

    schema_version: int = 1
    run_id: str
    config_hash: str
    created_at: str = Field(default_factory=utcnow)
    phases: dict[str, Any] = Field(default_factory=dict)
    last_checkpoint: str | None = None
    stop_requested: bool = False
    config_drift: list[dict[str, Any]] = Field(default_factory=list)
    aggregate_report: dict[str, Any] = Field(default_factory=dict)


class PreparedManifest(_Open):
    schema_version: int = 1
    created_at: str = Field(default_factory=utcnow)
    updated_at: str = Field(default_factory=utcnow)
    datasets: dict[str, dict[str, Any]]
    source: dict[str, Any] = Field(default_factory=dict)


class BuildManifest(_Open):
    """`batch_inputs/build_manifest.json`: the original's `shards` table plus our `parts` and per-build inputs."""

    schema_version: int = 1
    created_at: str = Field(default_factory=utcnow)
    updated_at: str = Field(default_factory=utcnow)
    temps: list[float] = Field(default_factory=list)
    prompt_sets: dict[str, Any] = Field(default_factory=dict)
    shards: dict[str, dict[str, Any]] = Field(default_factory=dict)
    parts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    builds: dict[str, dict[str, Any]] = Field(default_factory=dict)
