"""The base of every pipeline task: run parameters, the manifest-backed target, decision logs.

`complete()` is the task's own done predicate AND its upstream's: Luigi stops walking the graph at the first
complete task, so a stage whose inputs went stale must notice it itself (ARCHITECTURE §2, "staleness propagates").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import luigi
from luigi.task import flatten

from pipeline.layout import RunLayout
from pipeline.run import Run, open_run, resolve_root
from targets import store
from targets.fingerprint import fingerprint
from targets.manifest import TrialManifest
from targets.stage import StageTarget

log = logging.getLogger("pipeline")
_logged: set[tuple[str, str]] = set()


def decision(verb: str, what: str, reason: str) -> None:
    """One log line per idempotency decision, printed once per process.

    A "skip" after a "run" / "re-run" of the same task is the post-run completeness check, not a decision.
    """
    if (what, verb) in _logged or (verb == "skip" and any((what, v) in _logged for v in ("run", "re-run"))):
        return
    _logged.add((what, verb))
    log.info("%s %s (%s)", verb, what, reason)


class PipelineTask(luigi.Task):
    """A phase of one run. Subclasses define `stage`, `describe()` and `done() -> (bool, reason)`."""

    rid: str = luigi.Parameter(description="Run id: the run lives in <root>/run_<rid>/")
    root: str = luigi.Parameter(default="", significant=False,
                                description="Experiments root (default: $PIPELINE_EXPERIMENTS_DIR or ./experiments)")
    config: str = luigi.Parameter(default="", significant=False,
                                  description="Experiment config; used until the run's config is frozen")

    stage = "task"

    @property
    def run_ctx(self) -> Run:
        return open_run(self.rid, self.root or None, self.config or None)

    @property
    def layout(self) -> RunLayout:
        return self.run_ctx.layout

    def common(self) -> dict[str, Any]:
        """Parameters every upstream task inherits; the root is made absolute once, at the top."""
        return {"rid": self.rid, "root": str(resolve_root(self.root or None)), "config": self.config}

    def describe(self) -> str:
        return f"run={self.rid}"

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
        verb, reason = self.status()
        decision(verb, f"{self.stage} {self.describe()}", reason)
        return verb == "skip"

    def manifest(self, slug: str) -> TrialManifest | None:
        return store.read(self.layout.trial_manifest(slug), TrialManifest)


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
