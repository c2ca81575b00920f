"""PrepareData: freeze the run's config and snapshot the prepared data into the run, with checksums."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.control.run import freeze
from pipeline.data.prepared import read_prepared
from pipeline.tasks.base import PipelineTask, artifact_current, artifact_record, inputs_changed
from targets import store
from targets.atomic import write_text
from targets.fingerprint import current_sha, fingerprint
from targets.manifest import PreparedManifest

log = logging.getLogger("pipeline")
KINDS = ("open_book", "closed_book")
FORMAT_VERSION = 1


def select_rows(kind: str, rows: list[dict], sizes: dict[str, int | None]) -> list[dict]:
    """Apply the config's size caps: per-dataset caps first, then the per-kind cap (input order kept)."""
    per_dataset = {"squad_v2": sizes.get("squad_v2_max_items"), "triviaqa": sizes.get("triviaqa_max_items"),
                   "nq_open": sizes.get("nq_open_max_items")}
    taken: dict[str, int] = {}
    out: list[dict] = []
    for row in rows:
        cap = per_dataset.get(row["dataset"])
        if cap is not None and taken.get(row["dataset"], 0) >= cap:
            continue
        taken[row["dataset"]] = taken.get(row["dataset"], 0) + 1
        out.append(row)
    kind_cap = sizes.get(f"{kind}_max_items")
    return out[:kind_cap] if kind_cap else out


class PrepareData(PipelineTask):
    """Done when `prepared/` holds both files, their checksums match `prepared_manifest.json`, and they were made
    from the current source files with the current size caps."""

    stage = "prepared"

    def current_inputs(self, known: dict[str, Any] | None = None) -> dict[str, Any]:
        """The source files' checksums and the size caps: everything the snapshot is made from (`select_rows`).

        `known` (the recorded `source_files` fingerprints) spares re-hashing sources whose size and mtime match.
        """
        run = self.run_ctx
        source = Path(run.cfg.paths.prepared_dir)
        return {"format_version": FORMAT_VERSION, "sizes": run.cfg.sizes.model_dump(),
                "sources": {kind: current_sha(source / f"{kind}.jsonl", (known or {}).get(kind)) for kind in KINDS}}

    def done(self) -> tuple[bool, str]:
        manifest = store.read(self.layout.prepared_manifest, PreparedManifest)
        if manifest is None:
            return False, "no prepared snapshot yet"
        counts = []
        for kind in KINDS:
            ok, why = artifact_current(self.layout, manifest.datasets.get(kind))
            if not ok:
                return False, why
            counts.append(f"{kind} {manifest.datasets[kind]['items']} items")
        recorded = manifest.source.get("inputs")
        if self.run_ctx.adopted and recorded is None:
            return True, ", ".join(counts) + ", snapshot written by the original system"
        current = self.current_inputs(manifest.source.get("source_files"))
        if recorded is not None and not all(current["sources"].values()):
            # The sources moved away after the snapshot was taken: there is nothing newer to compare with, and the
            # snapshot itself is verified above.
            current["sources"] = {k: v or recorded.get("sources", {}).get(k) for k, v in current["sources"].items()}
        changed = inputs_changed(recorded, current)
        if changed:
            return False, f"source data or size caps changed since the snapshot ({changed})"
        return True, ", ".join(counts) + ", checksums match, sources and size caps unchanged"

    def run(self) -> None:
        run = self.run_ctx
        if not run.frozen:
            freeze(run.layout, run.cfg, run.source)
            run = self.run_ctx
        source = Path(run.cfg.paths.prepared_dir)
        sizes = run.cfg.sizes.model_dump()
        inputs = self.current_inputs()
        datasets = {}
        for kind in KINDS:
            path = source / f"{kind}.jsonl"
            if not path.exists():
                raise FileNotFoundError(f"{path}: prepared data file missing; set paths.prepared_dir in the config to a "
                                        "directory holding open_book.jsonl and closed_book.jsonl "
                                        "(see `python -m pipeline prepare-data --help`)")
            rows = select_rows(kind, read_prepared(path, kind), sizes)
            target = self.layout.prepared_file(kind)
            write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            datasets[kind] = artifact_record(self.layout, target, items=len(rows))
        if not any(d["items"] for d in datasets.values()):
            raise ValueError(f"{source}: both prepared files are empty after size caps; nothing to evaluate")
        store.update(self.layout.prepared_manifest, PreparedManifest,
                     lambda _: PreparedManifest(datasets=datasets, source={
                         "prepared_dir": str(source), "inputs": inputs,
                         "source_files": {kind: fingerprint(source / f"{kind}.jsonl").as_dict() for kind in KINDS}}))
        log.info("done prepared run=%s (%s)", self.rid,
                 ", ".join(f"{k} {v['items']} items" for k, v in datasets.items()))


def prepared_checksums(task: PipelineTask) -> dict[str, str | None] | None:
    """`{kind: sha256}` of the run's prepared snapshot, as recorded (None before it exists)."""
    manifest = store.read(task.layout.prepared_manifest, PreparedManifest)
    return {k: v.get("sha256") for k, v in sorted(manifest.datasets.items())} if manifest else None


def load_prepared_rows(task: PipelineTask, kind: str) -> list[dict]:
    return read_prepared(task.layout.prepared_file(kind), kind)
