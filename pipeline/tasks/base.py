"""The base of every pipeline task: run parameters, the manifest-backed target, decision logs.

`complete()` is the task's own done predicate AND its upstream's: Luigi stops walking the graph at the first
complete task, so a stage whose inputs went stale must notice it itself (ARCHITECTURE §2, "staleness propagates").
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import luigi
from luigi.task import flatten

from pipeline.control import outcome
from pipeline.control.layout import TRIAL_FILES, RunLayout, check_rid
from pipeline.control.run import Run, open_run, resolve_root
from pipeline.decisions import decision
from pipeline.naming import temp_str
from targets import store
from targets.fingerprint import fingerprint
from targets.lifecycle import CONTEXT_KEYS
from targets.manifest import TrialManifest
from targets.stage import StageTarget

log = logging.getLogger("pipeline")
# Task id -> complete(), shared by the nested checks of one outermost complete() call (which writes nothing), so a
# stage that several downstream stages require is evaluated once per check instead of once per path to it.
_memo = threading.local()


def run_layout(rid: str, root: str) -> RunLayout:
    """The layout `open_run` gives the run, without reading its config (a no-op resume needs only paths)."""
    if root and Path(root).is_absolute():
        return _absolute_layout(rid, root)
    return RunLayout(resolve_root(root or None), check_rid(rid))  # relative to the current directory / environment


@functools.lru_cache(maxsize=64)
def _absolute_layout(rid: str, root: str) -> RunLayout:
    return RunLayout(resolve_root(root), check_rid(rid))


class PipelineTask(luigi.Task):
    """A phase of one run. Subclasses define `stage`, `describe()` and `done() -> (bool, reason)`."""

    rid: str = luigi.Parameter(description="Run id: the run lives in <root>/run_<rid>/")
    # Part of the task's identity: two roots served by one luigid are two runs, never shared task ids.
    root: str = luigi.Parameter(default="",
                                description="Experiments root (default: $PIPELINE_EXPERIMENTS_DIR or ./experiments)")
    config: str = luigi.Parameter(default="", significant=False,
                                  description="Experiment config; used until the run's config is frozen")

    stage = "task"

    @property
    def run_ctx(self) -> Run:
        runs: dict[tuple[str, str, str], Run] | None = getattr(_memo, "runs", None)
        if runs is None:
            return open_run(self.rid, self.root or None, self.config or None)
        key = (self.rid, self.root, self.config)
        if key not in runs:  # within one completeness check nothing is written: the run cannot change
            runs[key] = open_run(self.rid, self.root or None, self.config or None)
        return runs[key]

    @property
    def layout(self) -> RunLayout:
        """The run's paths: from the parameters alone (no config is read)."""
        return run_layout(self.rid, self.root)

    def common(self) -> dict[str, Any]:
        """Parameters every upstream task inherits; the root is made absolute once, at the top."""
        return {"rid": self.rid, "root": str(resolve_root(self.root or None)), "config": self.config}

    def describe(self) -> str:
        return f"run={self.rid}"

    def on_failure(self, exception: BaseException) -> str:
        """What the scheduler (and luigid's page) shows: one line for an expected condition, else the traceback."""
        if outcome.expected(exception):
            return f"{type(exception).__name__}: {exception}"
        return super().on_failure(exception)

    def done(self) -> tuple[bool, str]:
        raise NotImplementedError

    def output(self) -> StageTarget:
        return StageTarget(f"{self.stage} {self.describe()}", self.done)

    def status(self) -> tuple[str, str]:
        """`("skip" | "run" | "re-run", reason)`: this stage's predicate, then its upstream's (cascading)."""
        target = self.output()
        if not target.exists():
            return "run", target.reason
        for dep in flatten(self.requires()):
            if not dep.complete():
                return "re-run", f"upstream {dep.stage} {dep.describe()} is not done"
        return "skip", target.reason

    def complete(self) -> bool:
        memo: dict[str, bool] | None = getattr(_memo, "checks", None)
        outermost = memo is None
        if memo is None:
            memo = _memo.checks = {}
            _memo.runs = {}
        try:
            if self.task_id not in memo:
                verb, reason = self.status()
                decision(verb, f"{self.stage} {self.describe()}", reason)
                memo[self.task_id] = verb == "skip"
            return memo[self.task_id]
        finally:
            if outermost:
                _memo.checks = _memo.runs = None

    def manifest(self, slug: str) -> TrialManifest | None:
        """The trial's manifest as it stands (a v1 or corrupt file is upgraded / rebuilt in memory only)."""
        return store.read(self.layout.trial_manifest(slug), TrialManifest, context=lambda: self.manifest_context(slug),
                          names=TRIAL_FILES)

    def update_manifest(self, slug: str, change: Callable[[TrialManifest], None]) -> TrialManifest:
        """Change the trial's manifest under its lock; a missing one is created, a v1 one upgraded (with a backup),
        a corrupt one quarantined and rebuilt from the breadcrumbs on disk first."""

        def apply(manifest: TrialManifest | None) -> TrialManifest:
            manifest = manifest or new_trial_manifest(self, slug)
            change(manifest)
            return manifest

        updated = store.update(self.layout.trial_manifest(slug), TrialManifest, apply,
                               context=lambda: self.manifest_context(slug), names=TRIAL_FILES)
        assert updated is not None
        return updated

    def manifest_context(self, slug: str) -> dict[str, Any]:
        return trial_context(self.run_ctx, slug)


@PipelineTask.event_handler(luigi.Event.FAILURE)
def _remember_failure(task: PipelineTask, exc: BaseException) -> None:
    """The cause of a failure decides the invocation's exit code (waiting, budget, stopped or failed)."""
    try:
        layout = task.layout
    except Exception:  # a config that cannot be opened was already reported by the task itself
        return
    outcome.record_failure(layout, exc)


def prompt_records(run: Run, slug: str) -> dict[str, dict[str, Any]]:
    """`{condition: {path, sha256, tokens}}` of the trial's system prompts as the run's config has them now."""
    prompts = {}
    for cond in ("control", "treatment"):
        path = run.prompt_path(run.trial(slug).prompt_set, cond)
        fp = fingerprint(path)
        prompts[cond] = {"path": str(path), "sha256": fp.sha256 if fp else None,
                         "tokens": len(path.read_text(encoding="utf-8").split()) if fp else 0}
    return prompts


def trial_context(run: Run, slug: str) -> dict[str, Any]:
    """Trial `slug`'s identity (`targets.lifecycle.CONTEXT_KEYS`: what a new manifest starts from) plus where its files
    are and how they are named: the context a corrupt manifest is rebuilt with. Raises ConfigError (a ValueError)
    when the run has no such trial."""
    trial = run.trial(slug)
    return {"run_id": run.rid, "trial": trial.as_manifest(), "temps": list(trial.temps),
            "samples_per_item": {temp_str(t): run.cfg.samples_per_item[temp_str(t)] for t in trial.temps},
            "prompts": prompt_records(run, slug), "results_dir": run.layout.results_dir(slug), "names": TRIAL_FILES}


def new_trial_manifest(task: PipelineTask, slug: str) -> TrialManifest:
    """A fresh v2 manifest for a trial of the task's run."""
    context = trial_context(task.run_ctx, slug)
    return TrialManifest(**{key: context[key] for key in CONTEXT_KEYS})


def unchanged_after_upstream(task: PipelineTask) -> bool:
    """Is the stage done after all, now that its upstream ran? (then one `skip` line, and its run() writes nothing)

    Luigi decides what runs before anything runs: a stage whose upstream is not done is scheduled although the
    upstream may rebuild exactly what it had (a prompt set's build re-run for its treatment prompt leaves the control
    parts other trials read as they were). Re-checked when it is its turn, with the upstream current, the stage's own
    predicate decides: a stage runs again only when something it reads changed."""
    ok, why = task.done()
    if ok:
        log.info("skip %s %s (%s; checked again after its upstream ran)", task.stage, task.describe(), why)
    return ok


def artifact_record(layout: RunLayout, path: Path, **extra: Any) -> dict[str, Any]:
    """What a stage records about a file it wrote: run-relative path plus fingerprint."""
    fp = fingerprint(path)
    if fp is None:
        raise FileNotFoundError(path)
    return {"path": layout.rel(path), **fp.as_dict(), **extra}


def artifact_current(layout: RunLayout, record: dict[str, Any] | None) -> tuple[bool, str]:
    """Is the file a stage recorded still there, unchanged? (stat short-cut, checksum decides)"""
    if not record or "path" not in record:
        return False, "no artifact recorded"
    path = layout.run_dir / record["path"]
    fp = fingerprint(path, record)
    if fp is None:
        return False, f"{record['path']} is missing"
    if fp.sha256 != record.get("sha256"):
        return False, f"{record['path']} changed since it was written"
    rows = f" {record['rows']} rows" if "rows" in record else ""
    return True, f"{record['path']}{rows} unchanged"


def inputs_changed(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """The first input whose fingerprint differs from what the stage recorded, as a reason; None if all match."""
    recorded = recorded or {}
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            if key not in recorded:
                return f"new input {key}"
            if key not in current or current[key] is None:
                return f"input {key} is missing"
            return f"{key} changed since this stage ran"
    return None
