"""Every path of a run, in one place.

```
<root>/run_<RID>/
  effective_config.yaml  run_state.json  STOP_REQUESTED  aggregate_report.md  aggregate_report.html
  prompts/                     frozen prompt texts and task instructions
  prepared/                    snapshot of the prepared data (+ prepared_manifest.json)
  batch_inputs/                shards, parts, build_manifest.json
  .emulator/                   state of the run's embedded emulator
  <trial>/results/             trial_manifest.json, t{T}_{cond}_p{NN}/results.jsonl, breadcrumbs, tables
  <trial>/reports/report.md  report.html
```
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from targets.lifecycle import decode_json

_RID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def default_root() -> Path:
    """`$PIPELINE_EXPERIMENTS_DIR`, else `./experiments` of the current directory."""
    return Path(os.environ.get("PIPELINE_EXPERIMENTS_DIR") or "experiments").expanduser().resolve()


def check_rid(rid: str) -> str:
    if not _RID.match(rid) or ".." in rid:
        raise ValueError(f"run id {rid!r} must match [A-Za-z0-9][A-Za-z0-9_.-]* (it names a directory)")
    return rid


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run. Pure: nothing is created on disk by this class."""

    root: Path
    rid: str

    @cached_property
    def run_dir(self) -> Path:
        return self.root / f"run_{self.rid}"

    @property
    def effective_config(self) -> Path:
        return self.run_dir / "effective_config.yaml"

    @property
    def run_state(self) -> Path:
        return self.run_dir / "run_state.json"

    @property
    def stop_file(self) -> Path:
        return self.run_dir / "STOP_REQUESTED"

    @property
    def aggregate_report(self) -> Path:
        return self.run_dir / "aggregate_report.md"

    @property
    def aggregate_report_html(self) -> Path:
        return self.run_dir / "aggregate_report.html"

    @property
    def prompts_dir(self) -> Path:
        return self.run_dir / "prompts"

    @property
    def prepared_dir(self) -> Path:
        return self.run_dir / "prepared"

    @property
    def prepared_manifest(self) -> Path:
        return self.prepared_dir / "prepared_manifest.json"

    def prepared_file(self, kind: str) -> Path:
        return self.prepared_dir / f"{kind}.jsonl"

    @property
    def batch_inputs(self) -> Path:
        return self.run_dir / "batch_inputs"

    @property
    def build_manifest(self) -> Path:
        return self.batch_inputs / "build_manifest.json"

    def shard(self, temp_label: str, prompt_set_suffix: str, condition: str) -> Path:
        return self.batch_inputs / f"t{temp_label}{prompt_set_suffix}_{condition}.jsonl"

    def shard_part(self, temp_label: str, prompt_set_suffix: str, condition: str, part: int) -> Path:
        return self.batch_inputs / f"t{temp_label}{prompt_set_suffix}_{condition}.p{part:02d}.jsonl"

    @property
    def emulator_dir(self) -> Path:
        return self.run_dir / ".emulator"

    def trial_dir(self, slug: str) -> Path:
        return self.run_dir / slug

    @lru_cache(maxsize=4096)  # noqa: B019 - layouts are few and long-lived; a no-op resume asks thousands of times
    def results_dir(self, slug: str) -> Path:
        return self.trial_dir(slug) / "results"

    def reports_dir(self, slug: str) -> Path:
        return self.trial_dir(slug) / "reports"

    def trial_manifest(self, slug: str) -> Path:
        return self.results_dir(slug) / "trial_manifest.json"

    def part_dir(self, slug: str, jkey: str) -> Path:
        return self.results_dir(slug) / jkey

    @lru_cache(maxsize=65536)  # noqa: B019 - see results_dir
    def part_results(self, slug: str, jkey: str) -> Path:
        return self.part_dir(slug, jkey) / TRIAL_FILES.part_results

    def job_breadcrumb(self, slug: str, jkey: str) -> Path:
        return self.results_dir(slug) / f"{jkey}{TRIAL_FILES.job_suffix}"

    def output_dataset_breadcrumb(self, slug: str, jkey: str) -> Path:
        return self.results_dir(slug) / f"{jkey}{TRIAL_FILES.output_suffix}"

    def part_breadcrumb(self, slug: str, jkey: str) -> Path:
        """The part's mirror of its manifest record and download entry (`targets.lifecycle.mirror_parts` writes it)."""
        return self.results_dir(slug) / f"{jkey}{TRIAL_FILES.part_suffix}"

    def combined_results(self, slug: str) -> Path:
        return self.results_dir(slug) / TRIAL_FILES.combined_results

    def predictions(self, slug: str) -> Path:
        return self.results_dir(slug) / TRIAL_FILES.predictions

    def prediction_columns(self, slug: str) -> Path:
        """The predictions scoring reads, columnar (ParsePredictions writes it beside predictions.csv)."""
        return self.results_dir(slug) / "predictions.npz"

    def per_item_scores(self, slug: str) -> Path:
        return self.results_dir(slug) / TRIAL_FILES.per_item_scores

    def scored_rows(self, slug: str) -> Path:
        """Per-prediction scores aligned with predictions.csv (ScorePredictions writes, OptionalAnalyses reads)."""
        return self.results_dir(slug) / "scored_rows.npz"

    def significance(self, slug: str) -> Path:
        return self.results_dir(slug) / TRIAL_FILES.significance

    def costs(self, slug: str) -> Path:
        return self.results_dir(slug) / TRIAL_FILES.costs

    def report_md(self, slug: str) -> Path:
        return self.reports_dir(slug) / TRIAL_FILES.report_md

    def report_html(self, slug: str) -> Path:
        return self.reports_dir(slug) / "report.html"

    def rel(self, path: Path) -> str:
        """A path relative to the run directory, as recorded in manifests."""
        return Path(path).relative_to(self.run_dir).as_posix()


# ------------------------------------------------------------------------------------- a trial's results dir

# Provider ids: bare (`[a-z0-9-]`, at most 63) or as a resource name `accounts/<account>/<kind>/<id>`.
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_RESOURCE = re.compile(r"accounts/([^/]+)/([^/]+)/([^/]+)")
_STATE = re.compile(r"[A-Za-z_]{1,64}")


def _bare_id(value: object, kind: str, what: str) -> str:
    """`accounts/<acct>/<kind>/<id>` or a bare id -> the checked bare id; ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, not a string")
    ident = value
    resource = _RESOURCE.fullmatch(value)
    if resource:
        account, found_kind, ident = resource.groups()
        if found_kind != kind or not _ID.fullmatch(account):
            raise ValueError(f"{what} {value[:120]!r} is not accounts/<account>/{kind}/<id>")
    if not _ID.fullmatch(ident):
        raise ValueError(f"{what} {value[:120]!r} is not a valid id")
    return ident


def _job_json(data: bytes) -> dict[str, Any]:
    """The generic breadcrumb dict of a `<jkey>_job.json` (the provider's job object as the pipeline saved it)."""
    obj, why = decode_json(data)
    if why:
        raise ValueError(why)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    job_id = _bare_id(obj.get("name"), "batchInferenceJobs", "name")
    state = obj.get("state")
    if state is not None and not (isinstance(state, str) and _STATE.fullmatch(state)):
        raise ValueError(f"state {str(state)[:120]!r} is not a job state")
    optional = {key: _bare_id(obj[wire], "datasets", wire) if obj.get(wire) is not None else None
                for key, wire in (("output_dataset_id", "outputDatasetId"), ("input_dataset_id", "inputDatasetId"))}
    return {"job_name": obj["name"], "job_id": job_id,
            "state": state.upper().removeprefix("JOB_STATE_").lower() if state else None, "provider_state": state,
            **optional}


def _output_txt(data: bytes) -> str:
    """The bare output dataset id of a `<jkey>_OUTPUT_DATASET_ID.txt` (one line, bare or as a resource name)."""
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if not text or "\n" in text:
        raise ValueError("not a single line")
    return _bare_id(text, "datasets", "output dataset id")


def _valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


@dataclass(frozen=True)
class TrialFiles:
    """The names of a trial's results dir and how its breadcrumbs read: what `targets.lifecycle` needs to upgrade,
    rebuild and mirror a trial manifest (its `TrialNames`), kept here with every other path of a run."""

    # A part's job key `t<T>_<control|treatment>_p<NN>`: `group` and `index` (1 for the first part).
    job_key: re.Pattern[str] = re.compile(r"(?P<group>t[0-9]+_(?:control|treatment))_p(?P<index>[0-9]{2,})")
    job_suffix: str = "_job.json"
    output_suffix: str = "_OUTPUT_DATASET_ID.txt"
    part_suffix: str = "_part.json"
    part_results: str = "results.jsonl"
    combined_results: str = "results_combined.jsonl"
    predictions: str = "predictions.csv"
    per_item_scores: str = "per_item_scores.csv"
    significance: str = "significance.json"
    costs: str = "costs.json"
    reports_dir: str = "../reports"  # relative to the results dir
    report_md: str = "report.md"

    @property
    def stage_files(self) -> dict[str, str]:
        """The artifacts stage inference looks for, by role, relative to the results dir."""
        return {"combined": self.combined_results, "predictions": self.predictions, "scores": self.per_item_scores,
                "significance": self.significance, "costs": self.costs,
                "report": f"{self.reports_dir}/{self.report_md}"}

    def parse_job(self, data: bytes) -> dict[str, Any]:
        return _job_json(data)

    def parse_output(self, data: bytes) -> str:
        return _output_txt(data)

    def valid_id(self, value: str) -> bool:
        return _valid_id(value)


TRIAL_FILES = TrialFiles()
