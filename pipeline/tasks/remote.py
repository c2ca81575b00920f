"""The remote life of one part: UploadPart → SubmitPart → PollJob → DownloadPart.

Exactly once: ids are deterministic (`pipeline.plan.remote_ids`), the intent is written to the owner trial's
manifest before every create call, and a part already known remotely is re-attached by id (GET), never
created again. Task parameters are the owner trial and the part's job key, so a part shared by several
trials is one task.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from typing import Any

import luigi

from pipeline.naming import temp_str
from pipeline.parsing import check_part_results, input_custom_ids, merge_results
from pipeline.plan import PartRef, all_parts, remote_ids, temp_for_label
from pipeline.provider import make_client, poll_interval
from pipeline.providers import job_states
from pipeline.tasks.base import PipelineTask, artifact_record, decision
from pipeline.tasks.build import BuildBatches
from targets import store
from targets.atomic import write_json, write_text
from targets.crashpoints import crashpoint
from targets.fingerprint import fingerprint
from targets.manifest import BuildManifest, PartRecord, TrialManifest

log = logging.getLogger("pipeline")
_JKEY = re.compile(r"^t(?P<label>[0-9]+)_(?P<cond>control|treatment)_p(?P<index>[0-9]{2,})$")
_parts_cache: dict[tuple[str, Any], dict[str, list[PartRef]]] = {}
UPLOADED_OR_LATER = {"uploaded", "submitting", "submitted", "running", "completed", "failed", "expired", "cancelled"}
SUBMITTED_OR_LATER = {"submitted", "running", "completed", "failed", "expired", "cancelled"}


def run_parts(task: PipelineTask) -> dict[str, list[PartRef]]:
    """All trials' parts, cached per build-manifest version (one parse per process on a no-op resume)."""
    path = task.layout.build_manifest
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError("batch inputs are not built yet") from None
    key = (str(path), (st.st_size, st.st_mtime_ns, id(task.run_ctx)))
    if key not in _parts_cache:
        build = store.read(path, BuildManifest)
        _parts_cache[key] = all_parts(task.run_ctx, build)
    return _parts_cache[key]


class PartTask(PipelineTask):
    """A task on one part, identified by its owner trial and job key (`t07_control_p02`)."""

    resources = {"provider_api": 1}

    trial: str = luigi.Parameter(description="Owner trial slug")
    jkey: str = luigi.Parameter(description="Part job key, t{T}_{cond}_p{NN}")

    def describe(self) -> str:
        return f"trial={self.trial} part={self.jkey}"

    def parsed_key(self) -> tuple[float, str, int]:
        m = _JKEY.match(self.jkey)
        if not m:
            raise ValueError(f"part key {self.jkey!r} is not of the form t<T>_<control|treatment>_p<NN>")
        return temp_for_label(self.run_ctx, m["label"]), m["cond"], int(m["index"])

    def ref(self) -> PartRef:
        for ref in run_parts(self).get(self.trial, []):
            if ref.jkey == self.jkey and ref.owner == self.trial:
                return ref
        raise KeyError(f"trial {self.trial} owns no part {self.jkey} in run {self.rid}")

    def record(self) -> PartRecord | None:
        manifest = self.manifest(self.trial)
        return manifest.parts.get(self.jkey) if manifest else None

    def save(self, record: PartRecord) -> None:
        run = self.run_ctx
        trial = run.trial(self.trial)

        def change(manifest: TrialManifest | None) -> TrialManifest:
            manifest = manifest or new_trial_manifest(self, trial.slug)
            manifest.set_part(self.jkey, record)
            return manifest

        store.update(self.layout.trial_manifest(self.trial), TrialManifest, change)

    def current_record(self, states: set[str]) -> tuple[bool, str]:
        record = self.record()
        if record is None:
            return False, "not started"
        ref = self.ref()
        if record.input_sha256 != ref.sha256:
            return False, "the part's input changed since it was sent"
        if record.state not in states:
            return False, f"part is {record.state}"
        return True, f"part is {record.state} as {record.job_id}"

    def upstream_build(self) -> BuildBatches:
        temp, _, _ = self.parsed_key()
        return BuildBatches(prompt_set=self.run_ctx.trial(self.trial).prompt_set, temp=temp, **self.common())


def new_trial_manifest(task: PipelineTask, slug: str) -> TrialManifest:
    run = task.run_ctx
    trial = run.trial(slug)
    prompts = {}
    for cond in ("control", "treatment"):
        path = run.prompt_path(trial.prompt_set, cond)
        text = path.read_text(encoding="utf-8")
        prompts[cond] = {"path": str(path), "sha256": fingerprint(path).sha256, "tokens": len(text.split())}
    return TrialManifest(run_id=run.rid, trial=trial.as_manifest(), temps=list(trial.temps),
                         samples_per_item={temp_str(t): run.cfg.samples_per_item[temp_str(t)] for t in trial.temps},
                         prompts=prompts)


class UploadPart(PartTask):
    """Done when the part's input dataset is READY remotely for the current input content."""

    stage = "uploaded"
    priority = 40  # all uploads and submissions go out before any poll blocks a worker

    def requires(self) -> BuildBatches:
        return self.upstream_build()

    def done(self) -> tuple[bool, str]:
        return self.current_record(UPLOADED_OR_LATER)

    def run(self) -> None:
        ref = self.ref()
        prior = self.record()
        generation = prior.generation if prior and prior.input_sha256 == ref.sha256 else 0
        ids = remote_ids(self.run_ctx, ref, generation)
        record = PartRecord(group=ref.group, index=ref.index, type=ref.type, input_path=self.layout.rel(ref.path),
                            input_sha256=ref.sha256, lines=ref.lines, model=ref.model,
                            inference_parameters=ref.inference_parameters, generation=generation,
                            dataset_id=ids["dataset_id"], job_id=ids["job_id"],
                            output_dataset_id=ids["output_dataset_id"], state="uploading")
        self.save(record)  # intent first: a crash from here on re-attaches to these ids
        client = make_client(self.run_ctx)
        crashpoint("before dataset create")
        dataset = client.get_dataset(record.dataset_id)
        if dataset is None:
            dataset, created = client.create_dataset(record.dataset_id, display_name=ids["dataset_display_name"],
                                                     example_count=ref.lines)
            decision("create" if created else "re-attach", f"dataset {record.dataset_id}",
                     f"part {self.jkey}, {ref.lines} lines" if created else "already exists remotely")
        else:
            decision("re-attach", f"dataset {record.dataset_id}", f"known remotely, state {dataset.get('state')}")
        declared = int(dataset.get("exampleCount") or ref.lines)
        if declared != ref.lines:
            raise RuntimeError(f"remote dataset {record.dataset_id} declares {declared} examples but part {self.jkey} "
                               f"has {ref.lines}; it is not this part's content. Delete the remote dataset or start "
                               "a new run id.")
        crashpoint("after dataset create")
        if dataset.get("state") != "READY":
            client.upload_dataset_file(record.dataset_id, ref.path)
            crashpoint("after upload")
            client.wait_dataset_ready(record.dataset_id, poll_s=poll_interval(self.run_ctx))
        record.state = "uploaded"
        self.save(record)


class SubmitPart(PartTask):
    """Done when the part's batch job exists remotely (created once, re-attached on resume)."""

    stage = "submitted"
    priority = 30

    def requires(self) -> UploadPart:
        return UploadPart(trial=self.trial, jkey=self.jkey, **self.common())

    def done(self) -> tuple[bool, str]:
        return self.current_record(SUBMITTED_OR_LATER)

    def run(self) -> None:
        record = self.record()
        assert record is not None, "UploadPart records the part before SubmitPart runs"
        ref = self.ref()
        record.state = "submitting"
        self.save(record)  # write-ahead: if we die after the POST, the resume GETs this id instead of posting again
        client = make_client(self.run_ctx)
        crashpoint("before job create")
        job = client.get_job(record.job_id)
        if job is not None:
            decision("re-attach", f"job {record.job_id}", f"part {self.jkey} already submitted, state {job.get('state')}")
        else:
            job, created = client.create_job(
                record.job_id, model=ref.model, input_dataset_id=record.dataset_id,
                output_dataset_id=record.output_dataset_id,
                display_name=remote_ids(self.run_ctx, ref, record.generation)["job_display_name"],
                inference_parameters=ref.inference_parameters)
            decision("submit" if created else "re-attach", f"job {record.job_id}",
                     f"part {self.jkey} of trial {self.trial}" if created else "create answered 409 already exists")
        crashpoint("after job create")
        write_json(self.layout.job_breadcrumb(self.trial, self.jkey), job)
        record.state = "submitted"
        record.provider_state = str(job.get("state") or "")
        self.save(record)


class PollJob(PartTask):
    """Done when the part's job completed and its output dataset id is recorded."""

    stage = "polled"
    priority = 10

    def requires(self) -> SubmitPart:
        return SubmitPart(trial=self.trial, jkey=self.jkey, **self.common())

    def done(self) -> tuple[bool, str]:
        return self.current_record({"completed"})

    def run(self) -> None:
        record = self.record()
        assert record is not None
        run = self.run_ctx
        client = make_client(run)
        interval, deadline = poll_interval(run), time.monotonic() + run.cfg.provider.poll_timeout_s
        last_state = None
        while True:
            job = client.get_job(record.job_id)
            if job is None:
                raise RuntimeError(f"job {record.job_id} of part {self.jkey} is gone at the provider; "
                                   "resubmission is not automatic yet: delete the part's record to resubmit")
            state = str(job.get("state") or "")
            if state != last_state:
                write_json(self.layout.job_breadcrumb(self.trial, self.jkey), job)
                last_state = state
                self._status(job)
            decided = job_states.classify(state)
            if decided == job_states.COMPLETED:
                output = job.get("outputDatasetId") or record.output_dataset_id
                write_text(self.layout.output_dataset_breadcrumb(self.trial, self.jkey), output.split("/")[-1] + "\n")
                record.output_dataset_id = output.split("/")[-1]
                record.state, record.provider_state = "completed", state
                self.save(record)
                return
            if decided in job_states.TERMINAL:
                record.state, record.provider_state = decided, state  # type: ignore[assignment]
                self.save(record)
                message = (job.get("status") or {}).get("message", "")
                raise RuntimeError(f"job {record.job_id} of part {self.jkey} ended {state}: {message}")
            if record.state != "running":
                record.state, record.provider_state = "running", state
                self.save(record)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {record.job_id} still {state} after {run.cfg.provider.poll_timeout_s:.0f}s; "
                                   "re-run later to keep waiting (nothing is resubmitted)")
            time.sleep(interval)

    def _status(self, job: dict[str, Any]) -> None:
        progress = job.get("jobProgress") or {}
        if self.set_status_message:
            self.set_status_message(f"{self.jkey}: {job.get('state')}")
        if self.set_progress_percentage and isinstance(progress.get("percent"), int | float):
            self.set_progress_percentage(int(progress["percent"]))


class DownloadPart(PartTask):
    """Done when `results.jsonl` parses, holds only this part's custom_ids, and accounts for all of them."""

    stage = "downloaded"
    priority = 20

    def requires(self) -> PollJob:
        return PollJob(trial=self.trial, jkey=self.jkey, **self.common())

    def status(self) -> tuple[str, str]:
        # Valid results are enough: the remote chain above is history once the part is downloaded.
        target = self.output()
        return ("skip" if target.exists() else "run"), target.reason

    def done(self) -> tuple[bool, str]:
        results = self.layout.part_results(self.trial, self.jkey)
        manifest = self.manifest(self.trial)
        known = None
        if manifest:
            for entry in manifest.stage("downloaded").artifacts.get("parts", []):
                if entry.get("job_key") == self.jkey:
                    known = entry
        fp = fingerprint(results, known)
        if fp is None:
            return False, "results.jsonl missing"
        if known and known.get("sha256") == fp.sha256 and known.get("input_sha256") == self.ref().sha256:
            return True, f"results.jsonl {known.get('rows')} rows, unchanged"
        check = check_part_results(results, input_custom_ids(self.ref().path))
        if not check.valid:
            detail = check.problems[0] if check.problems else f"{len(check.missing)} input ids have no result"
            return False, f"results.jsonl invalid: {detail}"
        return True, f"results.jsonl {check.rows} rows, all input ids accounted for"

    def run(self) -> None:
        record = self.record()
        assert record is not None
        ref = self.ref()
        expected = input_custom_ids(ref.path)
        scratch = self.layout.part_dir(self.trial, self.jkey) / ".download"
        shutil.rmtree(scratch, ignore_errors=True)
        files = make_client(self.run_ctx).download_dataset(record.output_dataset_id, scratch)
        crashpoint("after download")
        sources = [files[n] for n in sorted(files) if n == "BIJOutputSet.jsonl" or n.endswith(".jsonl")]
        sources += [files[n] for n in sorted(files) if n == "error-data"]
        found, problems = merge_results(sources, expected)
        for problem in problems[:5]:
            log.warning("dropped result line: %s", problem)
        missing = len(expected) - len(found)
        if missing:
            raise RuntimeError(f"part {self.jkey}: the output dataset {record.output_dataset_id} has results for "
                               f"{len(found)} of {len(expected)} requests; re-run to download again")
        results = self.layout.part_results(self.trial, self.jkey)
        write_text(results, "".join(json.dumps(o, ensure_ascii=False, sort_keys=True) + "\n" for o in found))
        shutil.rmtree(scratch, ignore_errors=True)
        entry = artifact_record(self.layout, results, job_key=self.jkey, rows=len(found), input_sha256=ref.sha256)
        record_download(self, self.trial, entry)
        decision("done", f"{self.stage} {self.describe()}", f"{len(found)} results")


def record_download(task: PipelineTask, slug: str, entry: dict[str, Any]) -> None:
    """Record (or refresh) one part's results fingerprint in the trial's `downloaded` stage."""

    def change(manifest: TrialManifest | None) -> TrialManifest:
        manifest = manifest or new_trial_manifest(task, slug)
        stage = manifest.stage("downloaded")
        parts = [p for p in stage.artifacts.get("parts", []) if p.get("job_key") != entry["job_key"]]
        parts.append(entry)
        parts.sort(key=lambda p: p["job_key"])
        status = stage.status if stage.status == "completed" else "in_progress"
        manifest.set_stage("downloaded", status, {**stage.artifacts, "parts": parts})
        return manifest

    store.update(task.layout.trial_manifest(slug), TrialManifest, change)

