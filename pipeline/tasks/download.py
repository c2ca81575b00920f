"""DownloadPart: a part's results fetched from its output dataset, checked, and written as `results.jsonl`.

Downloads are hostile input: fresh signed URLs per attempt, bounded size, archives unpacked with limits, lines
with foreign custom_ids dropped, duplicates resolved deterministically, and every request of the part accounted
for (a result, a provider error, or a recorded "missing"). An output that is gone for good is downgraded and
resubmitted once under the next generation.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import budget
from pipeline.parsing import (
    check_part_results,
    has_answer,
    input_custom_ids,
    line_custom_id,
    merge_results,
    result_lines,
    with_missing,
)
from pipeline.plan import PartRef, build_key, remote_ids
from pipeline.progress import Progress
from pipeline.provider import make_backend
from pipeline.providers.backend import PartSpec
from pipeline.providers.bounded_command import run_bounded
from pipeline.providers.download import extract_jsonl_bundle
from pipeline.providers.errors import NotFound, ProviderError
from pipeline.providers.limits import Deadline, DownloadLimits, DownloadRefused, ensure_free_space
from pipeline.tasks.base import PipelineTask, artifact_record, decision
from pipeline.tasks.remote import (
    SUBMITTED_OR_LATER,
    UPLOADED_OR_LATER,
    JobEnded,
    OutputGone,
    PartTask,
    PollJob,
    check_stop,
    part_spec,
    wait,
)
from targets import store
from targets.atomic import write_bytes, writer_tag
from targets.crashpoints import crashpoint
from targets.fingerprint import fingerprint, sha256_file
from targets.manifest import BuildManifest, PartRecord, TrialManifest

log = logging.getLogger("pipeline")
SCRATCH = ".download"

DOWNLOAD_ATTEMPTS = 3


class DownloadPart(PartTask):
    """Done when `results.jsonl` parses, holds only this part's custom_ids, and accounts for all of them."""

    stage = "downloaded"
    priority = 20

    def requires(self) -> PollJob:
        return PollJob(trial=self.trial, jkey=self.jkey, **self.common())

    def status(self) -> tuple[str, str]:
        # Results recorded for the current requests are enough: the remote chain above is history once downloaded.
        target = self.output()
        return ("skip" if target.exists() else "run"), target.reason

    def done(self) -> tuple[bool, str]:
        results = self.layout.part_results(self.trial, self.jkey)
        known = download_entry(self.manifest(self.trial), self.jkey)
        if known is not None and "sha256" not in known:
            known = None  # inferred from the files on disk by a manifest upgrade: paths and counts, not a record
        fp = fingerprint(results, known)
        if fp is None:
            return False, "results.jsonl missing"
        ref = self.ref()
        if known is not None:
            if known.get("request_sha256") != ref.request_sha256:
                return False, ("results.jsonl holds the answers to other requests (prompt, instructions, data, model or "
                               "parameters changed since it was downloaded)")
            if known.get("sha256") != fp.sha256:
                return False, "results.jsonl changed since it was downloaded"
            return True, f"results.jsonl {known.get('rows')} rows for the current requests, unchanged"
        if not self.written_by_original():
            return False, "results.jsonl is not recorded as downloaded for the current requests"
        check = check_part_results(results, input_custom_ids(ref.path))
        if not check.valid:
            detail = check.problems[0] if check.problems else f"{len(check.missing)} input ids have no result"
            return False, f"results.jsonl invalid: {detail}"
        return True, f"results.jsonl {check.rows} rows, written by the original system for these request files"

    def written_by_original(self) -> bool:
        """Results and request files both come from a run of the original system (adopted as they are), so the
        results answer exactly these requests: the only case where custom_ids are accepted as the evidence."""
        if not self.run_ctx.adopted:
            return False
        build = store.read(self.layout.build_manifest, BuildManifest)
        task = self.upstream_build()
        entry = build.builds.get(build_key(task.prompt_set, task.temp)) if build else None
        return bool(entry and entry.get("adopted"))

    def run(self) -> None:
        record = self.record()
        assert record is not None
        ref = self.ref()
        expected = input_custom_ids(ref.path)
        before = self.layout.part_results(self.trial, self.jkey)
        if before.exists() or download_entry(self.manifest(self.trial), self.jkey) is not None:
            decision("repair", f"downloaded part={self.jkey}", f"results missing, invalid or for other requests; "
                     f"output dataset {record.output_dataset_id} known")
        progress = Progress(self, f"download {self.jkey}", 3, unit="steps", terminal=False)
        progress.update(0, f"fetching output dataset {record.output_dataset_id}")
        try:
            found, problems = self.fetch(record, expected)
        except OutputGone as gone:
            record = self.resubmit(ref, record, str(gone))
            found, problems = self.fetch(record, expected)
        progress.update(1, f"checking {len(found):,} lines against {len(expected):,} requests")
        if make_backend(self.run_ctx).resends_failed:
            found = self.resend_failed(ref, record, found, expected)
        reason = f"no result in output dataset {record.output_dataset_id} (job {record.provider_state})"
        found, missing = with_missing(found, expected, reason)
        if missing:
            log.warning("part %s: %d of %d requests have no result; recorded as provider errors (%s)",
                        self.jkey, len(missing), len(expected), problems[0] if problems else reason)
        progress.update(2, f"writing {len(found):,} results")
        results = self.layout.part_results(self.trial, self.jkey)
        write_bytes(results, result_lines(found))
        entry = artifact_record(self.layout, results, job_key=self.jkey, rows=len(found), input_sha256=ref.sha256,
                                request_sha256=ref.request_sha256,
                                missing=len(missing), errors=sum(1 for o in found if not has_answer(o)))
        record_download(self, self.trial, entry)
        progress.update(3, "done")
        decision("done", f"{self.stage} {self.describe()}", f"{len(found)} results, {entry['errors']} errors")

    def resend_failed(self, ref: PartRef, record: PartRecord, found: list[dict], expected: list[str]) -> list[dict]:
        """Send the requests the batch ended without an answer for (expired, cancelled, errored) again, once, as a
        follow-up batch of just those requests; its answers replace the failures. The follow-up's record lives in
        the part's record (`followup`), written before each of its steps like the part's own, so a resume
        re-attaches to it; a second failure stays a provider error."""
        by_id = {line_custom_id(o): o for o in found}
        failed = [c for c in expected if c not in by_id or not has_answer(by_id[c])]
        if not failed and "followup" not in (record.model_extra or {}):
            return found
        follow, spec = self.followup(ref, record, failed)
        backend = make_backend(self.run_ctx)

        def save(sub: PartRecord) -> None:
            record.followup = sub.model_dump(mode="json")  # type: ignore[attr-defined]
            self.save(record)

        if follow.state not in UPLOADED_OR_LATER:
            check_stop(self)
            follow.state = "uploading"
            save(follow)
            backend.upload(spec, follow, save)
            follow.state = "uploaded"
            save(follow)
        if follow.state not in SUBMITTED_OR_LATER:
            def reserve() -> None:
                check_stop(self)
                budget.reserve(self.run_ctx, ref, follow, save)

            job = backend.submit(spec, follow, save, reserve)
            follow.job_id, follow.state, follow.provider_state = job.job_id, "submitted", job.state
            save(follow)
        if follow.state in ("failed", "cancelled"):
            return found
        if follow.state != "completed":
            try:
                wait(self, follow, spec=spec, save=save)
            except JobEnded as ended:
                log.warning("part %s: the follow-up batch of its %d failed requests ended too (%s); they stay "
                            "provider errors", self.jkey, follow.lines, ended)
                return found
        limits = self.limits()
        scratch = self.scratch / "followup"
        try:
            files = backend.download(spec, follow, scratch, max_bytes=limits.max_bytes,
                                     deadline=Deadline(limits.deadline_s, f"download of part {self.jkey}'s follow-up"))
            resent, _ = merge_results(unpack(files, scratch / "unpacked", limits.max_bytes),
                                      input_custom_ids(spec.requests_path))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        recovered = {line_custom_id(o): o for o in resent if has_answer(o)}
        decision("resend", f"part {self.jkey}", f"{len(recovered)} of {follow.lines} failed requests answered by "
                 f"follow-up batch {follow.job_id}")
        return [recovered.get(c) or by_id[c] for c in expected if c in recovered or c in by_id]

    def followup(self, ref: PartRef, record: PartRecord, failed: list[str]) -> tuple[PartRecord, PartSpec]:
        """The follow-up batch of the part's current generation: recorded, or written now (its requests file holds
        the failed requests' lines in the part's order) and recorded before anything is sent."""
        work = self.layout.part_dir(self.trial, self.jkey) / f".{self.run_ctx.cfg.provider.api}" / "followup"
        path = work / f"requests.g{record.generation}.jsonl"
        ids = remote_ids(self.run_ctx, ref, record.generation, variant="resend")
        known = (record.model_extra or {}).get("followup")
        if known is not None and known.get("generation") == record.generation:
            follow = PartRecord.model_validate(known)
        else:
            wanted = set(failed)
            lines = [line for line in ref.path.read_bytes().splitlines(keepends=True)
                     if line.strip() and line_custom_id(json.loads(line)) in wanted]
            write_bytes(path, b"".join(lines))
            share = len(lines) / max(ref.lines, 1)
            follow = PartRecord(group=ref.group, index=ref.index, type=ref.type, input_path=self.layout.rel(path),
                                input_sha256=sha256_file(path), lines=len(lines), model=ref.model,
                                inference_parameters=ref.inference_parameters, generation=record.generation,
                                dataset_id=ids["dataset_id"], job_id=ids["job_id"],
                                output_dataset_id=ids["output_dataset_id"],
                                estimated_usd=None if record.estimated_usd is None else record.estimated_usd * share)
            decision("resend", f"part {self.jkey}", f"{len(lines)} of {ref.lines} requests have no answer "
                     f"(job {record.provider_state}); sending them again once, as follow-up batch {ids['job_id']}")
            record.followup = follow.model_dump(mode="json")  # type: ignore[attr-defined]
            self.save(record)
        spec = replace(part_spec(self, ref, record), requests_path=self.layout.run_dir / follow.input_path,
                       lines=follow.lines, request_sha256=follow.request_sha256, client_key=ids["job_id"],
                       input_name=ids["dataset_id"], output_name=ids["output_dataset_id"],
                       display_name=ids["job_display_name"], work_dir=work,
                       input_display_name=ids["dataset_display_name"])
        return follow, spec

    @property
    def scratch(self) -> Path:
        return self.layout.part_dir(self.trial, self.jkey) / f"{SCRATCH}.{writer_tag()}"

    def fetch(self, record: PartRecord, expected: list[str]) -> tuple[list[dict], list[str]]:
        """Download (fresh URLs each attempt), unpack safely and merge; retried while lines are bad or missing.
        The downloaded files are removed however it ends: the merged lines are what the caller keeps."""
        try:
            found, problems = self.fetch_attempts(record, expected)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        for problem in problems[:5]:
            log.warning("part %s: %s", self.jkey, problem)
        corrupt = [p for p in problems if "not valid JSON" in p]
        if corrupt:
            raise RuntimeError(f"part {self.jkey}: the output of dataset {record.output_dataset_id} was corrupt in "
                               f"each of {DOWNLOAD_ATTEMPTS} downloads ({corrupt[0]}). Nothing was written; re-run to "
                               "download it again")
        return found, problems

    def fetch_attempts(self, record: PartRecord, expected: list[str]) -> tuple[list[dict], list[str]]:
        found: list[dict] = []
        problems: list[str] = []
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            shutil.rmtree(self.scratch, ignore_errors=True)
            sources = self.download(record)
            found, problems = merge_results(sources, expected)
            if len(found) == len(expected) and not any("not valid JSON" in p for p in problems):
                break
            log.info("download of part %s attempt %d: %d of %d results, %d problem line(s)%s", self.jkey, attempt,
                     len(found), len(expected), len(problems), "; retrying" if attempt < DOWNLOAD_ATTEMPTS else "")
        return found, problems

    def limits(self) -> DownloadLimits:
        """What this part's download may write and how long it may take: derived from its requests."""
        ref = self.ref()
        cfg = self.run_ctx.cfg.provider
        params = ref.inference_parameters
        return DownloadLimits.for_part(ref.lines, max_tokens=int(params.get("maxTokens") or 0),
                                       n=int(params.get("n") or 1), cap=cfg.max_download_bytes,
                                       deadline_s=cfg.download_deadline_s)

    def download(self, record: PartRecord) -> list[Path]:
        """The result files of the part's output dataset: REST first, then the configured CLI fallback."""
        limits = self.limits()
        what = f"download of part {self.jkey} (output dataset {record.output_dataset_id})"
        try:
            ensure_free_space(self.scratch, limits.max_bytes, what)
            files = make_backend(self.run_ctx).download(part_spec(self, self.ref(), record), record, self.scratch / "rest",
                                                        max_bytes=limits.max_bytes,
                                                        deadline=Deadline(limits.deadline_s, what))
            crashpoint("after download")
        except NotFound:
            files = self.cli_download(record, None, limits)
        except (ProviderError, ValueError) as exc:
            files = self.cli_download(record, exc, limits)
        try:
            ensure_free_space(self.scratch, limits.max_bytes, f"unpacking the {what}")
            return unpack(files, self.scratch / "unpacked", limits.max_bytes)
        except ValueError as exc:
            raise self.refused(record, exc, limits) from exc

    def refused(self, record: PartRecord, exc: Exception, limits: DownloadLimits) -> RuntimeError:
        return RuntimeError(f"part {self.jkey}: refused the output of dataset {record.output_dataset_id}: {exc}. "
                            f"Nothing was written (limit for this part: {limits.describe()}, derived from its "
                            f"{self.ref().lines} requests); re-run to download it again, or set "
                            "provider.max_download_bytes / provider.download_deadline_s if the output is "
                            "legitimately that large or slow")

    def cli_download(self, record: PartRecord, error: Exception | None, limits: DownloadLimits) -> dict[str, Path]:
        command = self.run_ctx.cfg.provider.download_command
        if not command:
            if error is None:
                raise OutputGone(f"output dataset {record.output_dataset_id} not found")
            if isinstance(error, DownloadRefused):
                raise self.refused(record, error, limits) from error
            raise RuntimeError(f"part {self.jkey}: download of output dataset {record.output_dataset_id} failed: "
                               f"{error}. Nothing was written; re-run to try again, or set provider.download_command "
                               "to a CLI fallback") from error
        out_dir = self.scratch / "cli"
        out_dir.mkdir(parents=True, exist_ok=True)
        argv = [arg.format(dataset_id=record.output_dataset_id, output_dir=str(out_dir)) for arg in command]
        log.info("download part %s with fallback command %s (REST: %s)", self.jkey, argv[0], error or "not found")
        try:
            done = run_bounded(argv, out_dir, self.scratch / "cli-logs", limits, f"{argv[0]} for part {self.jkey}",
                               printed=not any("{output_dir}" in arg for arg in command))
        except DownloadRefused as exc:
            raise self.refused(record, exc, limits) from exc
        files = {p.name: p for p in sorted(out_dir.rglob("*")) if p.is_file() and not p.is_symlink()}
        if done.returncode != 0 or not files:
            if error is None:
                raise OutputGone(f"output dataset {record.output_dataset_id} not found by REST nor by {argv[0]} "
                                 f"(exit {done.returncode}: {done.stderr_tail})")
            raise RuntimeError(f"download of {record.output_dataset_id} failed: REST {error}; {argv[0]} exit "
                               f"{done.returncode}: {done.stderr_tail}") from error
        return files


def unpack(files: dict[str, Path], out_dir: Path, max_bytes: int) -> list[Path]:
    """Result sources in a fixed order: results files first, then error files; archives extracted with limits."""
    ordered = sorted(files.items(), key=lambda kv: (kv[0] == "error-data" or "error" in kv[0], kv[0]))
    sources: list[Path] = []
    for name, path in ordered:
        if path.stat().st_size == 0:
            continue
        for member in extract_jsonl_bundle(path, out_dir / name, max_total_bytes=max_bytes):
            if member.suffix in (".jsonl", ".json", "") or member.name in ("BIJOutputSet.jsonl", "error-data"):
                sources.append(member)
    return sources


def download_entry(manifest: TrialManifest | None, jkey: str) -> dict[str, Any] | None:
    """The part's record in the trial's `downloaded` stage (fingerprint of results.jsonl and the requests it answers)."""
    for entry in manifest.stage("downloaded").artifacts.get("parts", []) if manifest else []:
        if entry.get("job_key") == jkey:
            return entry
    return None


def record_download(task: PipelineTask, slug: str, entry: dict[str, Any]) -> None:
    """Record (or refresh) one part's results fingerprint in the trial's `downloaded` stage."""

    def change(manifest: TrialManifest) -> None:
        stage = manifest.stage("downloaded")
        parts = [p for p in stage.artifacts.get("parts", []) if p.get("job_key") != entry["job_key"]]
        parts.append(entry)
        parts.sort(key=lambda p: p["job_key"])
        status = stage.status if stage.status == "completed" else "in_progress"
        manifest.set_stage("downloaded", status, {**stage.artifacts, "parts": parts})

    task.update_manifest(slug, change)

