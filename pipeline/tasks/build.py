"""BuildBatches: request shards and type-homogeneous parts for one prompt set at one temperature."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import luigi

from pipeline.batches import build_lines, render, split_parts
from pipeline.control.adopt import original_parts
from pipeline.naming import CONDITIONS, temp_label, temp_str
from pipeline.plan import build_key, prompt_set_suffix
from pipeline.tasks.base import (
    PipelineTask,
    artifact_current,
    artifact_record,
    decision,
    inputs_changed,
    unchanged_after_upstream,
)
from pipeline.tasks.prepare import PrepareData, load_prepared_rows, prepared_checksums
from targets import store
from targets.atomic import write_bytes
from targets.fingerprint import current_sha
from targets.manifest import BuildManifest

log = logging.getLogger("pipeline")
FORMAT_VERSION = 2


class BuildBatches(PipelineTask):
    """Done when `build_manifest.json` records this build with the current inputs and every file is unchanged."""

    prompt_set: str = luigi.Parameter()
    temp: float = luigi.FloatParameter()
    stage = "built"

    def describe(self) -> str:
        return f"run={self.rid} prompt_set={self.prompt_set} T={temp_str(self.temp)}"

    def requires(self) -> PrepareData:
        return PrepareData(**self.common())

    def current_inputs(self) -> dict[str, Any]:
        run = self.run_ctx
        return {
            "format_version": FORMAT_VERSION,
            "prepared": prepared_checksums(self),
            "control_prompt": current_sha(run.prompt_path(self.prompt_set, "control")),
            "treatment_prompt": current_sha(run.prompt_path(self.prompt_set, "treatment")),
            "instructions": {k: current_sha(run.instructions_path(k)) for k in ("open_book", "closed_book")},
            "samples": run.cfg.samples_per_item[temp_str(self.temp)],
            "lines_per_part": run.cfg.batching.lines_per_part,
            # only when there is one, so the builds of runs without a byte limit keep their recorded inputs
            **({"max_part_bytes": limit} if (limit := run.cfg.part_byte_limit()) is not None else {}),
            "stop": list(run.cfg.stop) if not run.cfg.use_batch_api else [],
        }

    def done(self) -> tuple[bool, str]:
        manifest = store.read(self.layout.build_manifest, BuildManifest)
        entry = manifest.builds.get(build_key(self.prompt_set, self.temp)) if manifest else None
        if entry is None:
            return False, "not built yet"
        changed = None if entry.get("adopted") else inputs_changed({"all": entry.get("inputs")}, {"all": self.current_inputs()})
        if changed:
            return False, "prepared data, prompts or batching settings changed since the build"
        for record in entry["files"]:
            ok, why = artifact_current(self.layout, record)
            if not ok:
                return False, why
        n = sum(len(entry["parts"][c]) for c in CONDITIONS)
        return True, f"{len(entry['files'])} files, {n} parts, inputs unchanged"

    def run(self) -> None:
        if unchanged_after_upstream(self):
            return
        if self.run_ctx.adopted and self._adopt():
            return
        run = self.run_ctx
        inputs = self.current_inputs()
        closed, open_ = load_prepared_rows(self, "closed_book"), load_prepared_rows(self, "open_book")
        instructions = {"open": run.instructions_path("open_book").read_text(encoding="utf-8"),
                        "closed": run.instructions_path("closed_book").read_text(encoding="utf-8")}
        label, suffix = temp_label(self.temp), prompt_set_suffix(run, self.prompt_set)
        files: list[dict[str, Any]] = []
        parts: dict[str, list[dict[str, Any]]] = {}
        shards: dict[str, dict[str, Any]] = {}
        for cond in CONDITIONS:
            lines = build_lines(
                closed_rows=closed, open_rows=open_, condition=cond, temp=self.temp,
                samples=inputs["samples"], system_prompt=run.prompt_path(self.prompt_set, cond).read_text(encoding="utf-8"),
                instructions=instructions, stop=run.cfg.stop, use_batch_api=run.cfg.use_batch_api)
            shard = self.layout.shard(label, suffix, cond)
            write_bytes(shard, render(lines))
            record = artifact_record(self.layout, shard, lines=len(lines))
            files.append(record)
            shards[shard.name] = {"prompt_set": self.prompt_set, "condition": cond, "temp": self.temp,
                                  "path": record["path"], "lines": len(lines), "size": record["size"],
                                  "sha256": record["sha256"], "part_index": 0}
            parts[cond] = []
            chunks = split_parts(lines, run.cfg.batching.lines_per_part, run.cfg.part_byte_limit())
            for index, chunk in enumerate(chunks, 1):
                path = self.layout.shard_part(label, suffix, cond, index)
                write_bytes(path, render(chunk))
                rec = artifact_record(self.layout, path, lines=len(chunk))
                files.append(rec)
                parts[cond].append({"index": index, "type": chunk[0].type, "path": rec["path"],
                                    "lines": len(chunk), "sha256": rec["sha256"]})
            self._remove_stale_parts(label, suffix, cond, len(chunks))

        def change(manifest: BuildManifest | None) -> BuildManifest:
            manifest = manifest or BuildManifest()
            manifest.temps = sorted(set(manifest.temps) | {self.temp})
            manifest.prompt_sets[self.prompt_set] = {
                c: str(run.prompt_path(self.prompt_set, c).relative_to(run.layout.run_dir)
                       if run.prompt_path(self.prompt_set, c).is_relative_to(run.layout.run_dir)
                       else run.prompt_path(self.prompt_set, c)) for c in CONDITIONS}
            manifest.shards.update(shards)
            manifest.builds[build_key(self.prompt_set, self.temp)] = {"inputs": inputs, "files": files, "parts": parts}
            return manifest

        store.update(self.layout.build_manifest, BuildManifest, change)
        log.info("done built %s (%s)", self.describe(),
                 ", ".join(f"{c}: {shards[self.layout.shard(label, suffix, c).name]['lines']} lines in "
                           f"{len(parts[c])} parts" for c in CONDITIONS))

    def _adopt(self) -> bool:
        """Register the parts an original run already wrote, as they are; False when it wrote none for this build."""
        label, suffix = temp_label(self.temp), prompt_set_suffix(self.run_ctx, self.prompt_set)
        found = {c: original_parts(self.layout.batch_inputs, label, suffix, c) for c in CONDITIONS}
        if not all(found.values()):
            return False
        files: list[dict[str, Any]] = []
        parts: dict[str, list[dict[str, Any]]] = {}
        for cond, paths in found.items():
            parts[cond] = []
            for index, path in enumerate(paths, 1):
                types = {json.loads(line)["custom_id"].rsplit("|", 1)[-1] for line in path.read_text().splitlines() if line}
                rec = artifact_record(self.layout, path, lines=sum(1 for line in path.open() if line.strip()))
                files.append(rec)
                parts[cond].append({"index": index, "type": types.pop() if len(types) == 1 else "mixed",
                                    "path": rec["path"], "lines": rec["lines"], "sha256": rec["sha256"]})

        def change(manifest: BuildManifest | None) -> BuildManifest:
            manifest = manifest or BuildManifest()
            manifest.builds[build_key(self.prompt_set, self.temp)] = {"adopted": True, "inputs": None, "files": files,
                                                                      "parts": parts}
            return manifest

        store.update(self.layout.build_manifest, BuildManifest, change)
        decision("adopt", f"{self.stage} {self.describe()}", "batch inputs written by the original system: "
                 + ", ".join(f"{c} {len(p)} parts" for c, p in parts.items()))
        return True

    def _remove_stale_parts(self, label: str, suffix: str, cond: str, count: int) -> None:
        index = count + 1
        while True:
            stale: Path = self.layout.shard_part(label, suffix, cond, index)
            if not stale.exists():
                return
            stale.unlink()
            log.info("removed stale part %s (the rebuild has only %d parts)", stale.name, count)
            index += 1
