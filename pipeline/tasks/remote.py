"""The remote life of one part: UploadPart → SubmitPart → PollJob (DownloadPart is in `download.py`).

Exactly once: ids are deterministic (`pipeline.plan.remote_ids`), the intent is written to the owner trial's
manifest before every create call, and a part already known remotely is re-attached by id (GET), never
created again. Task parameters are the owner trial and the part's job key, so a part shared by several
trials is one task.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import luigi

from pipeline import budget
from pipeline.control.layout import TRIAL_FILES
from pipeline.control.outcome import StopRequested, WaitingOnProvider, no_wait, record_failure
from pipeline.control.stop import stop_requested
from pipeline.plan import PartRef, all_parts, remote_ids, temp_for_label, wire_parameters
from pipeline.progress import Progress
from pipeline.provider import make_backend, poll_interval
from pipeline.providers import job_states
from pipeline.providers.backend import JobStatus, PartSpec
from pipeline.tasks.base import PipelineTask, decision, unchanged_after_upstream
from pipeline.tasks.build import BuildBatches
from targets import store
from targets.atomic import write_json, write_text
from targets.lifecycle import read_breadcrumbs
from targets.manifest import BuildManifest, PartRecord, utcnow

log = logging.getLogger("pipeline")
_JKEY = re.compile(r"^t(?P<label>[0-9]+)_(?P<cond>control|treatment)_p(?P<index>[0-9]{2,})$")
_parts_cache: dict[tuple[str, Any], dict[str, list[PartRef]]] = {}
POLL_BACKOFF = 1.5  # each quiet poll waits longer, up to POLL_BACKOFF_MAX times the configured interval
POLL_BACKOFF_MAX = 4.0
UPLOADED_OR_LATER = {"uploaded", "submitting", "submitted", "running", "completed", "failed", "expired", "cancelled"}
SUBMITTED_OR_LATER = {"submitted", "running", "completed", "failed", "expired", "cancelled"}
MAX_GENERATIONS = 2  # generation 0 and the one automatic resubmission


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

    @property
    def resources(self) -> dict[str, int]:  # type: ignore[override]
        """One unit of `<provider>_api` (`[resources]` in luigi.cfg caps how many part tasks use a provider at once)."""
        return {f"{self.run_ctx.cfg.provider.name}_api": 1}

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
        """A private copy of the part's record (callers change it, then `save` it)."""
        manifest = self.manifest(self.trial)
        record = manifest.parts.get(self.jkey) if manifest else None
        return record.model_copy(deep=True) if record else None

    def save(self, record: PartRecord) -> None:
        self.update_manifest(self.trial, lambda manifest: manifest.set_part(self.jkey, record))

    def current_record(self, states: set[str]) -> tuple[bool, str]:
        record = self.record()
        if record is None:
            return False, "not started"
        ref = self.ref()
        if record.request_sha256 != ref.request_sha256:
            return False, "its requests changed since it was sent (prompt, instructions, data, model or parameters)"
        if record.state not in states:
            return False, f"part is {record.state}"
        return True, f"part is {record.state} as {record.job_id}"

    def resubmit(self, ref: PartRef, record: PartRecord, reason: str) -> PartRecord:
        """Downgrade a part whose job failed or whose output is gone for good, and send it again under the next
        generation, once: a second loss stops with an error instead of paying again."""
        if record.resubmissions >= 1:
            raise RuntimeError(f"part {self.jkey}: {reason}, and it was already resubmitted once "
                               f"({record.history[-1] if record.history else ''}); not paying a third time automatically")
        check_stop(self)
        record.history.append(history_entry(record, reason))
        (record.model_extra or {}).pop("followup", None)  # it belonged to the generation left behind
        record.generation += 1
        record.resubmissions += 1
        ids = remote_ids(self.run_ctx, ref, record.generation)
        record.dataset_id, record.job_id, record.output_dataset_id = ids["dataset_id"], ids["job_id"], ids["output_dataset_id"]
        record.state = "uploading"
        self.save(record)
        decision("downgrade", f"part {self.jkey}", f"{reason}; resubmitting once as generation {record.generation}")
        upload(self, ref, record)
        submit(self, ref, record)
        try:
            wait(self, record)
        except JobEnded as again:
            raise RuntimeError(f"part {self.jkey}: {reason}; it was already resubmitted once (generation "
                               f"{record.generation}) and {again}. Not paying again automatically: fix the cause, "
                               "then delete the part's entry under `parts` in the trial manifest to send it again") from again
        return record

    def upstream_build(self) -> BuildBatches:
        temp, _, _ = self.parsed_key()
        return BuildBatches(prompt_set=self.run_ctx.trial(self.trial).prompt_set, temp=temp, **self.common())


class JobEnded(RuntimeError):
    """The part's job ended without results (FAILED, CANCELLED): it is resubmitted once under the next generation."""


class OutputGone(RuntimeError):
    """The output dataset of a completed job no longer exists anywhere we can fetch it from."""


def check_stop(task: PartTask) -> None:
    if stop_requested(task.layout):
        raise StopRequested(f"stop requested for run {task.rid}: not sending part {task.jkey}; "
                            "state is saved, run the same command again to resume")


def part_spec(task: PartTask, ref: PartRef, record: PartRecord) -> PartSpec:
    """What the backend needs of the part's current generation."""
    ids = remote_ids(task.run_ctx, ref, record.generation)
    return PartSpec(jkey=task.jkey, requests_path=ref.path, lines=ref.lines, model=ref.model,
                    inference_parameters=wire_parameters(ref.inference_parameters),
                    request_sha256=ref.request_sha256, client_key=ids["job_id"], input_name=ids["dataset_id"],
                    output_name=ids["output_dataset_id"], display_name=ids["job_display_name"],
                    work_dir=task.layout.part_dir(task.trial, task.jkey) / f".{task.run_ctx.cfg.provider.api}",
                    input_display_name=ids["dataset_display_name"])


def upload(task: PartTask, ref: PartRef, record: PartRecord) -> None:
    """Make the part's requests available to the provider (or re-attach); the intent is already recorded."""
    make_backend(task.run_ctx).upload(part_spec(task, ref, record), record, task.save)
    record.state = "uploaded"
    task.save(record)


def submit(task: PartTask, ref: PartRef, record: PartRecord) -> None:
    """Create the part's batch exactly once: the backend reconciles first, and only then calls `reserve` (stop and
    budget checks, and the write-ahead `submitting` state) before its create."""

    def reserve() -> None:
        check_stop(task)
        # Write-ahead, after the budget check: if we die after the create, the resume re-attaches instead.
        budget.reserve(task.run_ctx, ref, record, task.save)

    job = make_backend(task.run_ctx).submit(part_spec(task, ref, record), record, task.save, reserve)
    record.job_id = job.job_id
    write_breadcrumb(task, job)
    record.state = "submitted"
    record.provider_state = job.state
    task.save(record)


def write_breadcrumb(task: PartTask, job: JobStatus) -> None:
    """The provider's view of the part's batch beside its results: the original system's `<jkey>_job.json` for
    Fireworks jobs (the recovery of a lost manifest reads it), `batch.json` in the part's backend directory else."""
    if job.snapshot is None:
        return
    if task.run_ctx.cfg.provider.api == "fireworks":
        write_json(task.layout.job_breadcrumb(task.trial, task.jkey), job.snapshot)
    else:
        write_json(task.layout.part_dir(task.trial, task.jkey) / f".{task.run_ctx.cfg.provider.api}" / "batch.json",
                   job.snapshot)


def wait(task: PartTask, record: PartRecord, status: Callable[[JobStatus], None] | None = None, *,
         spec: PartSpec | None = None, save: Callable[[PartRecord], None] | None = None) -> None:
    """Poll the part's batch until it ends; map every provider state to a decision. `spec` and `save` default to the
    part's own; a follow-up batch passes its own (and leaves the part's breadcrumbs alone)."""
    run = task.run_ctx
    backend = make_backend(run)
    own = spec is None
    spec = spec or part_spec(task, task.ref(), record)
    save = save or task.save
    interval, deadline = poll_interval(run), time.monotonic() + run.cfg.provider.poll_timeout_s
    last_state = None
    while True:
        job = backend.status(spec, record)
        if job is None:
            raise RuntimeError(f"batch {record.job_id} of part {task.jkey} is not known to the provider although it "
                               "was submitted; check the account, then delete the part's entry in the trial manifest "
                               "to resubmit")
        if job.state != last_state and own:
            write_breadcrumb(task, job)
        last_state = job.state
        if status:
            status(job)
        if job.decided in (job_states.COMPLETED, job_states.EXPIRED):
            # EXPIRED / EARLY_STOPPED keep the rows done so far; the download accounts for the others.
            output = job.output or record.output_dataset_id
            if own:
                write_text(task.layout.output_dataset_breadcrumb(task.trial, task.jkey), output + "\n")
            record.output_dataset_id = output
            record.state, record.provider_state = "completed", job.state
            save(record)
            if job.decided == job_states.EXPIRED:
                decision("accept partial", f"job {record.job_id}",
                         f"{job.state}: rows without a result are recorded as errors")
            return
        if job.decided in job_states.TERMINAL:
            record.state, record.provider_state = job.decided, job.state  # type: ignore[assignment]
            save(record)
            raise JobEnded(f"job {record.job_id} ended {job.state}: {job.message or 'no message'}")
        progress = job.progress
        if (record.state != "running" or record.provider_state != job.state
                or (no_wait() and progress != record.progress)):
            record.state, record.provider_state, record.progress = "running", job.state, progress
            save(record)
        if no_wait():
            raise WaitingOnProvider(f"job {record.job_id} of part {task.jkey} is {job.state}{_percent(progress)}; "
                                    "checked once (--no-wait), the next run continues")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {record.job_id} still {job.state} after {run.cfg.provider.poll_timeout_s:.0f}s; "
                               "re-run later to keep waiting (nothing is resubmitted)")
        if stop_requested(task.layout):
            raise StopRequested(f"stop requested while job {record.job_id} is {job.state}; it keeps running remotely "
                                "and is re-attached on the next run")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * POLL_BACKOFF, poll_interval(run) * POLL_BACKOFF_MAX)


def _percent(progress: dict[str, Any] | None) -> str:
    percent = (progress or {}).get("percent")
    return f" ({percent:g}% done)" if isinstance(percent, int | float) else ""


class UploadPart(PartTask):
    """Done when the part's input dataset is READY remotely for the current input content."""

    stage = "uploaded"
    priority = 40  # all uploads and submissions go out before any poll blocks a worker

    def requires(self) -> BuildBatches:
        return self.upstream_build()

    def done(self) -> tuple[bool, str]:
        return self.current_record(UPLOADED_OR_LATER)

    def run(self) -> None:
        if unchanged_after_upstream(self):  # its build ran again and wrote this part's requests as they were
            return
        ref = self.ref()
        prior = self.record()
        if prior is not None and prior.request_sha256 == ref.request_sha256:
            record = prior
        elif prior is None and (known := self.known_remote(ref)) is not None:
            self.save(known)
            decision("re-attach", f"job {known.job_id}", f"part {self.jkey} was submitted by an earlier run "
                     "(breadcrumb); not uploading or submitting it again")
            return
        else:
            record = self.new_record(ref, prior)
            if prior is not None:
                decision("new generation", f"part {self.jkey}", f"its requests changed (request checksum "
                         f"{prior.request_sha256[:12]} -> {ref.request_sha256[:12]}); sending the new requests under "
                         f"job {record.job_id}")
        check_stop(self)
        record.state = "uploading"
        self.save(record)  # intent first: a crash from here on re-attaches to these ids
        upload(self, ref, record)


    def new_record(self, ref: PartRef, prior: PartRecord | None) -> PartRecord:
        """A record for the part's current requests, with content-derived ids; a record for other requests is kept
        in its history (what it sent stays counted)."""
        ids = remote_ids(self.run_ctx, ref, 0)
        history = [*prior.history, history_entry(prior, "requests changed")] if prior is not None else []
        return PartRecord(group=ref.group, index=ref.index, type=ref.type, input_path=self.layout.rel(ref.path),
                          input_sha256=ref.sha256, lines=ref.lines, model=ref.model,
                          inference_parameters=ref.inference_parameters, dataset_id=ids["dataset_id"],
                          job_id=ids["job_id"], output_dataset_id=ids["output_dataset_id"], history=history)

    def known_remote(self, ref: PartRef) -> PartRecord | None:
        """A job this part's current requests already have remotely, per the breadcrumbs of an earlier run (or of a
        lost manifest). A job is this part's only when its id is the content address of these requests (ids derive
        from the request checksum), or, in a run adopted from the original system, when it is the original's job."""
        crumb = read_breadcrumbs(self.layout.results_dir(self.trial), TRIAL_FILES).parts.get(self.jkey)
        if not crumb or not crumb.get("job_id"):
            return None
        generation = next((g for g in range(MAX_GENERATIONS)
                           if remote_ids(self.run_ctx, ref, g)["job_id"] == crumb["job_id"]), None)
        if generation is None and not self.run_ctx.adopted:
            decision("ignore", f"breadcrumb {self.jkey}_job.json", f"job {crumb['job_id']} was not sent for the "
                     "part's current requests")
            return None
        ids = remote_ids(self.run_ctx, ref, generation or 0)
        state = job_states.classify(crumb.get("state") or "")
        return PartRecord(group=ref.group, index=ref.index, type=ref.type, input_path=self.layout.rel(ref.path),
                          input_sha256=ref.sha256, lines=ref.lines, model=ref.model,
                          inference_parameters=ref.inference_parameters, generation=generation or 0,
                          dataset_id=crumb.get("input_dataset_id") or ids["dataset_id"], job_id=crumb["job_id"],
                          output_dataset_id=crumb.get("output_dataset_id") or ids["output_dataset_id"],
                          state="submitted" if state == job_states.IN_PROGRESS else "running",
                          provider_state=crumb.get("state"))


def history_entry(record: PartRecord, reason: str) -> dict[str, Any]:
    """What a part's history keeps of a generation it leaves behind: its ids, requests, estimate and whether it was sent."""
    follow = budget.followup_usd(record)
    estimate = record.estimated_usd if follow is None or record.estimated_usd is None else record.estimated_usd + follow
    return {"generation": record.generation, "dataset_id": record.dataset_id, "job_id": record.job_id,
            "output_dataset_id": record.output_dataset_id, "request_sha256": record.request_sha256,
            "estimated_usd": estimate, "sent": record.state in budget.SENT, "reason": reason, "at": utcnow(),
            **({"followup": record.model_extra["followup"]} if "followup" in (record.model_extra or {}) else {})}


class SubmitPart(PartTask):
    """Done when the part's batch job exists remotely (created once, re-attached on resume)."""

    stage = "submitted"
    priority = 30

    def requires(self) -> UploadPart:
        return UploadPart(trial=self.trial, jkey=self.jkey, **self.common())

    def done(self) -> tuple[bool, str]:
        return self.current_record(SUBMITTED_OR_LATER)

    def run(self) -> None:
        if unchanged_after_upstream(self):
            return
        record = self.record()
        assert record is not None, "UploadPart records the part before SubmitPart runs"
        submit(self, self.ref(), record)


class PollJob(PartTask):
    """Done when the part's job completed and its output dataset id is recorded."""

    stage = "polled"
    priority = 10
    _progress: Progress | None = None

    def requires(self) -> SubmitPart:
        return SubmitPart(trial=self.trial, jkey=self.jkey, **self.common())

    def done(self) -> tuple[bool, str]:
        return self.current_record({"completed"})

    def run(self) -> Iterator[JobRunning]:
        if unchanged_after_upstream(self):
            return
        record = self.record()
        assert record is not None
        try:
            wait(self, record, self._status)
        except JobEnded as ended:
            self.resubmit(self.ref(), record, str(ended))
        except WaitingOnProvider as waiting:
            # Checked once (--no-wait): the part stays pending on the remote job, not failed.
            record_failure(self.layout, waiting)
            yield JobRunning(trial=self.trial, jkey=self.jkey, **self.common())

    def _status(self, job: JobStatus) -> None:
        if self._progress is None:
            self._progress = Progress(self, f"job {job.job_id}", 100, unit="%", terminal=False)
        percent = (job.progress or {}).get("percent")
        self._progress.update(int(percent) if isinstance(percent, int | float) else 0, job.state)


class JobRunning(luigi.ExternalTask):
    """A part's remote job, still running when a `--no-wait` invocation checked it: the external dependency its
    PollJob waits on. Complete once the job is recorded as completed (the next invocation's poll records it)."""

    rid: str = luigi.Parameter()
    root: str = luigi.Parameter(default="")
    config: str = luigi.Parameter(default="", significant=False)
    trial: str = luigi.Parameter()
    jkey: str = luigi.Parameter()

    def complete(self) -> bool:
        return PollJob(rid=self.rid, root=self.root, config=self.config, trial=self.trial, jkey=self.jkey).complete()
