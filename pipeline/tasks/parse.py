"""ParsePredictions: every part of a trial downloaded, then `results_combined.jsonl` and `predictions.csv`.

The parts are dynamic dependencies (their number is known only once the batches are built), yielded as one
list. The combine step reads only the per-part `results.jsonl` files, in plan order, and never its own output.
"""

from __future__ import annotations

import logging
from typing import Any

import luigi

from pipeline.naming import temp_label
from pipeline.parsing import PredictionColumns, combine_results, write_predictions
from pipeline.plan import PartRef
from pipeline.progress import Progress
from pipeline.tasks.base import (
    PipelineTask,
    artifact_current,
    artifact_record,
    inputs_changed,
    prompt_records,
    unchanged_after_upstream,
)
from pipeline.tasks.build import BuildBatches
from pipeline.tasks.download import DownloadPart
from pipeline.tasks.prepare import PrepareData
from pipeline.tasks.remote import run_parts
from targets.atomic import atomic_open
from targets.fingerprint import fingerprint
from targets.manifest import TrialManifest

log = logging.getLogger("pipeline")


class TrialTask(PipelineTask):
    """A stage of one trial."""

    trial: str = luigi.Parameter(description="Trial slug")

    def describe(self) -> str:
        return f"trial={self.trial}"

    def record_stage(self, stage: str, artifacts: dict[str, Any]) -> None:
        self.update_manifest(self.trial, lambda manifest: manifest.set_stage(stage, "completed", artifacts))

    def stage_done(self, stage: str, current_inputs: dict[str, Any]) -> tuple[bool, str]:
        manifest = self.manifest(self.trial)
        if manifest is None:
            return False, "no trial manifest yet"
        record = manifest.stage(stage)
        if record.status != "completed":
            return False, f"{stage} is {record.status}"
        ok, why = artifact_current(self.layout, record.artifacts.get("file"))
        if not ok:
            return False, why
        changed = inputs_changed(record.artifacts.get("inputs"), current_inputs)
        if changed:
            return False, changed
        return True, f"{why}, inputs unchanged"

    def refs(self) -> list[PartRef]:
        """The parts this trial reads (owned or shared), as planned from the current batch inputs."""
        return run_parts(self)[self.trial]

    def input_sha(self, stage: str, artifact: str = "file") -> str | None:
        """The checksum of an artifact an upstream stage of this trial recorded (its `file` unless named), if it is
        still current."""
        manifest = self.manifest(self.trial)
        if manifest is None:
            return None
        record = manifest.stage(stage).artifacts.get(artifact)
        ok, _ = artifact_current(self.layout, record)
        return record["sha256"] if ok else None


def part_results_fingerprints(task: PipelineTask, refs: list[PartRef]) -> dict[str, str | None]:
    """`{owner/jkey: sha256}` of each part's results, trusting recorded checksums when the stat matches."""
    known: dict[tuple[str, str], dict] = {}
    for owner in {r.owner for r in refs}:
        manifest = task.manifest(owner)
        for entry in (manifest.stage("downloaded").artifacts.get("parts", []) if manifest else []):
            known[(owner, entry["job_key"])] = entry
    out: dict[str, str | None] = {}
    for ref in refs:
        fp = fingerprint(task.layout.part_results(ref.owner, ref.jkey), known.get((ref.owner, ref.jkey)))
        out[f"{ref.owner}/{ref.jkey}"] = fp.sha256 if fp else None
    return out


class ParsePredictions(TrialTask):
    """Done when predictions.csv is the one recorded and every part's results are those it was parsed from."""

    stage = "parsed"
    # Luigi raises a dependency's priority to its dependent's: above polling (so every trial yields its parts before
    # a worker blocks on a job) and below uploads/submissions (so every part is sent before any poll).
    priority = 25

    def requires(self) -> list[luigi.Task]:
        run = self.run_ctx
        builds = [BuildBatches(prompt_set=ps, temp=t, **self.common())
                  for ps in dict.fromkeys(tr.prompt_set for tr in run.trials) for t in run.cfg.temps]
        return [PrepareData(**self.common()), *builds]

    def current_inputs(self) -> dict[str, Any]:
        """Each part's results checksum and the checksum of the requests they must answer."""
        refs = self.refs()
        return {"parts": part_results_fingerprints(self, refs),
                "requests": {f"{r.owner}/{r.jkey}": r.request_sha256 for r in refs}}

    def done(self) -> tuple[bool, str]:
        ok, why = self.stage_done("parsed", self.current_inputs())
        if not ok and why.startswith("parts changed"):
            why = "results of some parts changed since parsing"
        elif not ok and why.startswith("requests changed"):
            why = "the requests of some parts changed since parsing (prompt, instructions, data, model or parameters)"
        return ok, why

    def run(self):  # type: ignore[override]  # a generator: Luigi resumes it after the yielded parts are done
        if unchanged_after_upstream(self):  # e.g. another prompt set's build ran again: it requires every build
            return
        refs = self.refs()
        yield [DownloadPart(trial=r.owner, jkey=r.jkey, **self.common()) for r in refs]
        predictions = self.layout.predictions(self.trial)
        combined_path = self.layout.combined_results(self.trial)
        sources = [self.layout.part_results(ref.owner, ref.jkey) for ref in refs]
        # The per-part files are already canonical JSON lines, so the combine copies their bytes as they are.
        with atomic_open(combined_path, "wb") as combined:
            combine_results(sources, combined)
        progress = Progress(self, f"parse {self.trial}", len(sources), unit="parts")
        columns = PredictionColumns()
        with atomic_open(predictions, "w", newline="") as out:
            parsed = write_predictions(sources, out, progress.update, columns)
        # The same rows, columnar: ScorePredictions reads these instead of the CSV when they are the recorded ones.
        columns_path = self.layout.prediction_columns(self.trial)
        with atomic_open(columns_path, "wb") as fh:
            columns.save(fh)
        del columns
        rows = parsed.rows
        expected = sum(r.lines for r in refs)
        if rows != expected:
            raise ValueError(f"trial {self.trial}: {rows} predictions for {expected} requests; re-run to repair the parts")
        inputs = self.current_inputs()
        artifacts = {"predictions_csv": self.layout.rel(predictions), "row_count": rows,
                     "file": artifact_record(self.layout, predictions, rows=rows), "inputs": inputs, "errors": parsed.errors,
                     "columns": artifact_record(self.layout, columns_path, rows=rows)}
        self._record(refs, artifacts, combined_path)
        log.info("done parsed trial=%s (%d predictions from %d parts)", self.trial, rows, len(refs))

    def _record(self, refs: list[PartRef], artifacts: dict[str, Any], combined_path) -> None:
        shared = {f"t{temp_label(r.temp)}": {"mode": "reuse", "producer_trial": r.owner, "temp": r.temp,
                                              "condition": r.condition}
                  for r in refs if r.shared}

        prompts = prompt_records(self.run_ctx, self.trial)

        def change(manifest: TrialManifest) -> None:
            downloaded = manifest.stage("downloaded").artifacts
            parts = [{"job_key": r.jkey, "owner": r.owner, "path": self.layout.rel(self.layout.part_results(r.owner, r.jkey))}
                     for r in refs]
            manifest.set_stage("downloaded", "completed", {**downloaded, "combined_path": self.layout.rel(combined_path),
                                                           "n_results": artifacts["row_count"], "trial_parts": parts})
            manifest.set_stage("parsed", "completed", artifacts)
            manifest.control_registry.update(shared)
            manifest.prompts = prompts  # the prompts of the requests these predictions answer

        self.update_manifest(self.trial, change)
