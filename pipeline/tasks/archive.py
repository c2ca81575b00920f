"""ArchiveRun: a verified archive bundle of the finished run, recorded as every trial's `archived` stage."""

from __future__ import annotations

import logging
from typing import Any

import luigi

from pipeline.tasks.base import PipelineTask, decision
from pipeline.tasks.report import TrialReport
from pipeline.views.archive import archive_current, write_archive

log = logging.getLogger("pipeline")


class ArchiveRun(PipelineTask):
    """Done when every trial records the same archive, and that bundle is intact and holds the run as it is now."""

    out: str = luigi.Parameter(default="", significant=False,
                               description="Where bundles go (default: <root>/archives)")
    stage = "archived"

    def requires(self) -> TrialReport:
        return TrialReport(**self.common())

    def records(self) -> list[dict[str, Any] | None]:
        records = []
        for trial in self.run_ctx.trials:
            manifest = self.manifest(trial.slug)
            records.append(manifest.stage("archived").artifacts if manifest else None)
        return records

    def done(self) -> tuple[bool, str]:
        records = self.records()
        if not records or any(r != records[0] for r in records):
            return False, "not every trial records the same archive"
        return archive_current(self.layout, records[0])

    def run(self) -> dict[str, Any]:
        record = write_archive(self.layout, self.out or None)
        for trial in self.run_ctx.trials:
            self.update_manifest(trial.slug, lambda manifest: manifest.set_stage("archived", "completed", record))
        decision("done", f"{self.stage} {self.describe()}", f"{record['archive_path']} ({record['files']} files, "
                 f"{record['bytes']:,} bytes, verified)")
        return record
