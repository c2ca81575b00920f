"""TrialReport: `reports/report.md` per trial and, for the whole run, `aggregate_report.md`.

`TrialReport --rid X` (no trial) is the task users run (`python -m pipeline run --rid X`): it covers every trial of
the run. Creating it checks the config, read-only: an explicit `--config` that differs from the run's frozen config
is refused (exit 3) unless `--accept-config-drift`; an invalid config exits 2 with the problems listed.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import luigi

from pipeline.control import exit_codes, noop_index, outcome
from pipeline.control.config import ConfigError
from pipeline.control.run import ConfigDriftError, accept_drift, config_drift, config_fingerprint, open_run, refuse_drift
from pipeline.pricing import unlisted_message, unlisted_models
from pipeline.provider import check_credentials
from pipeline.tasks.analyze import ComputeStats, OptionalAnalyses, ScorePredictions, SummarizeCosts
from pipeline.tasks.base import (
    PipelineTask,
    artifact_current,
    artifact_record,
    decision,
    inputs_changed,
    unchanged_after_upstream,
)
from pipeline.tasks.download import SCRATCH
from pipeline.tasks.parse import TrialTask
from targets import store
from targets.atomic import write_text
from targets.lifecycle import read_raw
from targets.manifest import RunState

log = logging.getLogger("pipeline")
_forced: set[str] = set()
_checked: set[tuple[Any, ...]] = set()


class TrialReport(TrialTask):
    """Done when the report was rendered from the current scores, statistics and costs (or `--force`).

    Constructing it checks the config, read-only: invalid → exit 2, a drift not accepted → exit 3. Process control
    (signals, stop, sweeps, the exit code, the no-op index) is the runner's (`pipeline.control.runner`), never this
    task's: `complete()` only reads.
    """

    trial: str = luigi.Parameter(default="", description="Trial slug; empty = every trial plus the aggregate report")
    accept_config_drift: bool = luigi.BoolParameter(significant=False, description="Adopt a changed --config")
    force: bool = luigi.BoolParameter(significant=False, description="Rebuild the report(s) even if current")
    no_wait: bool = luigi.BoolParameter(significant=False, description="Cron mode: check running jobs once, record "
                                        "their progress and exit (code 5 while waiting) instead of waiting for them")
    stage = "report"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        key = (self.rid, self.root, self.config, self.trial, self.accept_config_drift)
        if key not in _checked:
            _checked.add(key)
            # A run verified complete under its frozen config, unchanged since, was checked then: without --config
            # there is nothing new to check.
            if self.config or not self._unchanged_since_verified():
                self._check_config()

    def complete(self) -> bool:
        if self._unchanged_since_verified():
            return True
        return super().complete()

    def indexable(self) -> bool:
        """Whether a verified-complete state of this task may short-cut later checks (`pipeline.control.noop_index`)."""
        if self.trial or self.force:
            return False
        # Only runs that are not adopted are ever indexed: a confirmed index answers without reading the config.
        return noop_index.confirmed(self.layout, self.task_id) or not self.run_ctx.adopted

    def _unchanged_since_verified(self) -> bool:
        """The no-op short-cut (`pipeline.control.noop_index`): one directory walk instead of the graph's predicates."""
        if self.trial or self.force:
            return False
        try:
            files = noop_index.unchanged(self.layout, self.task_id, (SCRATCH,))
        except ValueError:  # an invalid rid: the config check says so
            return False
        if files is None:
            return False
        decision("skip", f"{self.stage} {self.describe()}", f"verified complete before, and none of its {files:,} "
                 "files changed since")
        return True

    def _check_config(self) -> None:
        try:
            run = open_run(self.rid, self.root or None, self.config or None)
            diff = config_drift(run, self.config or None)
            if diff and not self.accept_config_drift:
                raise refuse_drift(run, self.config, diff)
            if not outcome.controlled() and (diff or self.no_wait):
                what = "--accept-config-drift (it writes the run's frozen config)" if diff else "--no-wait"
                raise ConfigError(f"{what} needs the runner, which owns process control: "
                                  f"`python -m pipeline run --rid {self.rid} …` takes the same options")
            if self.trial:
                run.trial(self.trial)
        except ConfigDriftError as exc:
            log.error("%s", exc)
            sys.exit(exit_codes.CONFIG_DRIFT)
        except (ConfigError, ValueError) as exc:
            log.error("%s", exc)
            sys.exit(exit_codes.CONFIG_INVALID)

    def preflight(self) -> str | None:
        """Read-only checks before the runner lets anything be frozen, built or sent: the problem, or None. A run
        verified complete and unchanged, and given no other config, sends nothing, so it needs nothing."""
        if not self.config and self._unchanged_since_verified():
            return None
        try:
            run = open_run(self.rid, self.root or None, self.config or None)
            check_credentials(run)
        except ConfigError as exc:
            return str(exc)
        unlisted = unlisted_models(run.cfg, {t.model_id for t in run.trials})
        if unlisted and not run.cfg.pricing.allow_unlisted_models and not run.adopted:
            return unlisted_message(run.cfg, unlisted)
        return None

    def accept_pending_drift(self) -> None:
        """Adopt an accepted `--config` (the runner calls this once Luigi's process lock is held)."""
        if self.accept_config_drift and self.config:
            if accept_drift(open_run(self.rid, self.root or None, self.config or None), self.config):
                noop_index.forget(self.layout)  # the run changed after any earlier "unchanged" answer

    def describe(self) -> str:
        return f"trial={self.trial}" if self.trial else f"run={self.rid} (aggregate)"

    def requires(self) -> list[PipelineTask]:
        common = {**self.common(), "force": self.force}
        if not self.trial:
            return [TrialReport(trial=t.slug, **common) for t in self.run_ctx.trials]
        base = self.common()
        return [ScorePredictions(trial=self.trial, **base), ComputeStats(trial=self.trial, **base),
                SummarizeCosts(trial=self.trial, **base), OptionalAnalyses(trial=self.trial, **base)]

    def current_inputs(self) -> dict[str, Any]:
        if not self.trial:
            return {t.slug: TrialReport(trial=t.slug, **self.common()).input_sha("report") for t in self.run_ctx.trials}
        provenance = self.provenance()
        return {**{stage: self.input_sha(stage) for stage in ("scored", "stats", "costs")},
                "prompts": {cond: record.get("sha256") for cond, record in sorted(provenance["prompts"].items())},
                "jobs": {key: job["job_id"] for key, job in provenance["jobs"].items()},
                "config_hash": provenance["config_hash"], "provider": provenance["provider"]}

    def provenance(self) -> dict[str, Any]:
        """What the trial's report names as its provenance: the prompts its predictions answer (recorded when they
        were parsed), every part's job id and state, the run's config hash and the provider that answered (a report
        recorded before reports named it lacks this input, so it is rendered again, now with its provider)."""
        manifest = self.manifest(self.trial)
        jobs = {}
        for ref in self.refs():
            owner = manifest if ref.owner == self.trial else self.manifest(ref.owner)
            record = owner.parts.get(ref.jkey) if owner else None
            jobs[ref.jkey if ref.owner == self.trial else f"{ref.owner}/{ref.jkey}"] = {
                "job_id": record.job_id if record else None, "state": record.state if record else None}
        return {"prompts": dict(manifest.prompts) if manifest else {}, "jobs": jobs,
                "config_hash": config_fingerprint(self.run_ctx.cfg), "provider": self.run_ctx.cfg.provider.served_by}

    def done(self) -> tuple[bool, str]:
        if self.force and self.task_id not in _forced:
            return False, "--force"
        if self.trial:
            path = self.layout.trial_manifest(self.trial)
            kind = read_raw(path)[0] if path.exists() else "v2"
            if kind != "v2":
                # Everything may still be valid, but the file on disk must be upgraded / repaired (with a copy aside).
                return False, f"trial manifest is {kind} on disk"
            ok, why = self.stage_done("report", self.current_inputs())
            if ok:
                manifest = self.manifest(self.trial)
                html_ok, html_why = artifact_current(self.layout, manifest.stage("report").artifacts.get("html")
                                                     if manifest else None)
                if not html_ok:
                    return False, f"report.html: {html_why}"
            return ok, why
        state = store.read(self.layout.run_state, RunState)
        record = state.aggregate_report if state else {}
        for key in ("file", "html"):
            ok, why = artifact_current(self.layout, record.get(key))
            if not ok:
                return False, why
        changed = inputs_changed(record.get("inputs"), self.current_inputs())
        return (False, changed) if changed else (True, f"{why}, trial reports unchanged")

    def run(self) -> None:
        if unchanged_after_upstream(self):  # --force makes done() false until the report was written once
            return
        inputs = self.current_inputs()
        if self.trial:
            self._trial_report(inputs)
        else:
            self._aggregate(inputs)
        _forced.add(self.task_id)

    def _load(self, slug: str) -> dict[str, Any]:
        import pandas as pd

        from pipeline.stats.optional.analyses import OUTPUT_FILES

        layout = self.layout
        # written by OptionalAnalyses from the same scores; a run whose optional stage predates it has none (n/a)
        rules = layout.results_dir(slug) / OUTPUT_FILES["unanswerable_rules"]
        return {
            "per_item": pd.read_csv(layout.per_item_scores(slug), dtype={"item_key": str, "condition": str, "type": str}),
            "significance": json.loads(layout.significance(slug).read_text(encoding="utf-8")),
            "costs": json.loads(layout.costs(slug).read_text(encoding="utf-8")),
            "unanswerable": json.loads(rules.read_text(encoding="utf-8")) if rules.is_file() else None,
        }

    def _trial_report(self, inputs: dict[str, Any]) -> None:
        from pipeline.report.html import render_trial_html
        from pipeline.report.render import render_trial_report

        run = self.run_ctx
        trial = run.trial(self.trial)
        manifest = self.manifest(self.trial)
        assert manifest is not None
        provenance = self.provenance()
        prompts = {}
        for cond in ("control", "treatment"):
            path = run.prompt_path(trial.prompt_set, cond)
            shown = self.layout.rel(path) if path.is_relative_to(self.layout.run_dir) else str(path)
            prompts[cond] = {**provenance["prompts"].get(cond, {}), "path": shown}
        from pipeline.naming import temp_str

        ctx = {"rid": self.rid, "provider": provenance["provider"],
               "trial": {"slug": trial.slug, "model": trial.model_id, "prompt_set": trial.prompt_set,
                         "top_p": trial.top_p, "top_k": trial.top_k, "max_new_tokens": trial.max_new_tokens.model_dump()},
               "temps": list(trial.temps),
               "samples_per_item": {temp_str(t): run.cfg.samples_per_item[temp_str(t)] for t in trial.temps},
               "prompts": prompts, **self._load(self.trial),
               "score_summary": manifest.stage("scored").artifacts.get("summary", {}),
               "jobs": provenance["jobs"], "config_hash": provenance["config_hash"]}
        path, html = self.layout.report_md(self.trial), self.layout.report_html(self.trial)
        write_text(path, render_trial_report(ctx))
        write_text(html, render_trial_html(ctx))
        self.record_stage("report", {"report_md": self.layout.rel(path), "report_html": self.layout.rel(html),
                                     "file": artifact_record(self.layout, path), "html": artifact_record(self.layout, html),
                                     "inputs": inputs})
        log.info("done report trial=%s (%s)", self.trial, self.layout.rel(path))

    def _aggregate(self, inputs: dict[str, Any]) -> None:
        from pipeline.report.html import render_aggregate_html
        from pipeline.report.render import render_aggregate_report

        path, html = self.layout.aggregate_report, self.layout.aggregate_report_html
        trials = [{"slug": t.slug, "model": t.model_id, "prompt_set": t.prompt_set, **self._load(t.slug),
                   "report_href": self.layout.report_html(t.slug).relative_to(html.parent).as_posix()}
                  for t in self.run_ctx.trials]
        ctx = {"rid": self.rid, "provider": self.run_ctx.cfg.provider.served_by, "trials": trials}
        write_text(path, render_aggregate_report(ctx))
        write_text(html, render_aggregate_html(ctx))
        record = {"file": artifact_record(self.layout, path), "html": artifact_record(self.layout, html), "inputs": inputs}

        def change(state: RunState | None) -> RunState:
            state = state or RunState(run_id=self.rid, config_hash="")
            state.aggregate_report = record
            return state

        store.update(self.layout.run_state, RunState, change)
        log.info("done aggregate report run=%s (%s)", self.rid, path)
