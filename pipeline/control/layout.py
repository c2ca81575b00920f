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
        return self.part_dir(slug, jkey) / "results.jsonl"

    def job_breadcrumb(self, slug: str, jkey: str) -> Path:
        return self.results_dir(slug) / f"{jkey}_job.json"

    def output_dataset_breadcrumb(self, slug: str, jkey: str) -> Path:
        return self.results_dir(slug) / f"{jkey}_OUTPUT_DATASET_ID.txt"

    def part_breadcrumb(self, slug: str, jkey: str) -> Path:
        """The part's mirror of its manifest record and download entry (`targets.lifecycle.mirror_parts` writes it)."""
        return self.results_dir(slug) / f"{jkey}_part.json"

    def combined_results(self, slug: str) -> Path:
        return self.results_dir(slug) / "results_combined.jsonl"

    def predictions(self, slug: str) -> Path:
        return self.results_dir(slug) / "predictions.csv"

    def per_item_scores(self, slug: str) -> Path:
        return self.results_dir(slug) / "per_item_scores.csv"

    def scored_rows(self, slug: str) -> Path:
        """Per-prediction scores aligned with predictions.csv (ScorePredictions writes, OptionalAnalyses reads)."""
        return self.results_dir(slug) / "scored_rows.npz"

    def significance(self, slug: str) -> Path:
        return self.results_dir(slug) / "significance.json"

    def costs(self, slug: str) -> Path:
        return self.results_dir(slug) / "costs.json"

    def report_md(self, slug: str) -> Path:
        return self.reports_dir(slug) / "report.md"

    def report_html(self, slug: str) -> Path:
        return self.reports_dir(slug) / "report.html"

    def rel(self, path: Path) -> str:
        """A path relative to the run directory, as recorded in manifests."""
        return Path(path).relative_to(self.run_dir).as_posix()
