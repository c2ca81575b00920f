"""The trial manifest's lifecycle: a v1 manifest is upgraded on first touch, a corrupt one rebuilt from disk.

Contract:
- `read_raw` / `classify` sort a manifest into "v2" (validates as `TrialManifest`), "v1" (the original's legacy
  layout: no `schema_version` or 1, with `created_utc, run_id, trial, temps, samples_per_item`) or "corrupt"
  (empty, truncated, not UTF-8, not an object, or a dict with wrong types). A wrong-typed v2 is corrupt and is
  never "upgraded" (original weak spot 11: that lost fields).
- `upgrade_v1` keeps every key of the v1 dict; `rebuild_from_disk` records what the job breadcrumbs tell, in the
  original's keys and under `recovered_parts`, so the pipeline can re-attach to known jobs instead of
  resubmitting, and keeps every key (or dict entry) of a wrong-typed corrupt file that is valid on its own.
  Both infer `stage_status` from artifacts for information only: paths and row counts, never the checksums
  and input fingerprints that make a stage count as done, so tasks still verify everything. (A rebuild's
  `downloaded` entries per part are not inferred: they come back from the part mirrors the pipeline wrote.)
- Breadcrumbs are untrusted input: bounded size, regular files only, ids checked; a bad one is skipped with a
  logged reason and never stops the rebuild.
- Part mirrors: `<jkey><part_suffix>` holds everything the manifest knows about one part, its full `PartRecord`
  (`parts[jkey]`, every field, later ones included) and its entry in `stage_status.downloaded.artifacts.parts`.
  `mirror_parts` rewrites it atomically, under the manifest's lock, right after every manifest write that changed
  either (`store.update` and the writes here call it, so no writer has to remember it); a mirror missing on disk is
  written too. A rebuild takes each part's record and download entry back from it (see `_rebuild` for the rule
  between a part mirror and the job's own breadcrumbs), so nothing about a part is lost with the manifest.
- `open_trial_manifest` does it in memory and writes nothing (done predicates, the read-only `plan`).
  `persist_lifecycle` does it for real under the store's lock: the original bytes are copied aside first
  (`<name>.backup.<ts>.json` / `<name>.corrupt.<ts>`, never overwriting another copy), then the v2 manifest
  replaces the file atomically. Under the lock, a second process finds v2 and does nothing.
- Every change is appended to the manifest's `lifecycle_history` list.
- The pipeline's file names and id shapes are not this module's: part job keys, breadcrumb suffixes and parsers,
  provider ids and the artifacts stage inference looks for come in a `TrialNames` (the pipeline's is
  `pipeline.control.layout.TRIAL_FILES`), from the rebuild context's `"names"` key or a `names` argument. Without
  names: a v1 upgrade infers no stages, `read_breadcrumbs` finds nothing, no part mirror is written, and a corrupt
  manifest is not rebuilt (ManifestError, as without a context).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol, cast

from pydantic import ValidationError

from targets.atomic import dumps_json, write_text
from targets.crashpoints import crashpoint
from targets.locking import Context, ManifestError, lock_for
from targets.manifest import STAGES, PartRecord, StageRecord, TrialManifest, utcnow

log = logging.getLogger("pipeline")

Kind = Literal["v2", "v1", "corrupt"]
BREADCRUMB_MAX_BYTES = 1 << 20
HISTORY_KEY = "lifecycle_history"
V1_KEYS = ("created_utc", "run_id", "trial", "temps", "samples_per_item")
CONTEXT_KEYS = ("run_id", "trial", "temps", "samples_per_item", "prompts")
PART_MIRROR_SCHEMA = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Part states before the job exists: a job.json for the record's own job id proves the part got further.
_BEFORE_JOB = ("planned", "uploading", "uploaded", "submitting")


def _now() -> datetime:
    return datetime.now(UTC)


class TrialNames(Protocol):
    """The names of a trial's results dir that this module reads and writes, given by the pipeline.

    Parsers take a breadcrumb's bytes and raise ValueError (the message says why) for one that cannot be used.
    """

    @property
    def job_key(self) -> re.Pattern[str]:
        """A part's job key (`fullmatch`), with groups `group` and `index` (an integer, 1 for the first part)."""

    @property
    def job_suffix(self) -> str:
        """`<jkey><job_suffix>`: the job's own breadcrumb, read with `parse_job`."""

    @property
    def output_suffix(self) -> str:
        """`<jkey><output_suffix>`: the job's output dataset id, read with `parse_output`."""

    @property
    def part_suffix(self) -> str:
        """`<jkey><part_suffix>`: the part mirror this module writes (see `mirror_parts`)."""

    @property
    def part_results(self) -> str:
        """`<jkey>/<part_results>`: a part's downloaded results (JSON lines)."""

    @property
    def stage_files(self) -> dict[str, str]:
        """Paths relative to the results dir, by role: `combined`, `predictions`, `scores` (CSVs), `significance`,
        `costs` (JSON objects), `report` (may start with `../`)."""

    def parse_job(self, data: bytes) -> dict[str, Any]:
        """`{job_name, job_id, state, provider_state, output_dataset_id, input_dataset_id}` from a job breadcrumb."""

    def parse_output(self, data: bytes) -> str:
        """The bare output dataset id from an output dataset breadcrumb."""

    def valid_id(self, value: str) -> bool:
        """Whether `value` is a bare provider id (never a path), as records send requests to."""


# ---------------------------------------------------------------------------------------------- classification

def decode_json(data: bytes) -> tuple[object | None, str]:
    """The parsed JSON value and "", or None and why the bytes are not JSON."""
    if not data.strip():
        return None, "empty file"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte {exc.start})"
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except (ValueError, RecursionError) as exc:  # over-long integers, nesting deeper than the parser's stack
        return None, f"not valid JSON ({type(exc).__name__})"


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "top level"
    return f"{exc.error_count()} invalid field(s), first {where}: {first['msg']}"


def _v1_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The v1 dict with every key kept, plus what v2 requires; `jobs[k]` / `datasets[k]` scalars become lists."""
    data = dict(raw)
    data["schema_version"] = 2
    if "timestamps" not in raw:
        created = raw.get("created_utc")
        data["timestamps"] = {"created_at": created if isinstance(created, str) and created else utcnow(),
                              "updated_at": utcnow()}
    for key in ("jobs", "datasets"):
        table = raw.get(key)
        if isinstance(table, dict):
            # 890c944: a group with one part stored its job name as a plain string; it is part 1.
            data[key] = {k: v if isinstance(v, list) else [v] for k, v in table.items()}
    return data


def _classify(raw: object) -> tuple[Kind, str, TrialManifest | None]:
    """(kind, reason, the validated v2 model or the v1 fields validated as v2) for a parsed JSON value."""
    if not isinstance(raw, dict):
        return "corrupt", f"top level is {type(raw).__name__}, not an object", None
    version = raw.get("schema_version")
    if "schema_version" in raw and not (type(version) is int and version in (1, 2)):
        return "corrupt", f"unsupported schema_version {version!r}", None
    if version == 2:
        try:
            return "v2", "v2 manifest", TrialManifest.model_validate(raw)
        except ValidationError as exc:
            return "corrupt", _first_error(exc), None
    missing = [k for k in V1_KEYS if k not in raw]
    if missing:
        return "corrupt", f"no schema_version and no {', '.join(missing)}", None
    try:
        return "v1", "v1 manifest", TrialManifest.model_validate(_v1_fields(raw))
    except ValidationError as exc:
        return "corrupt", f"v1 manifest with {_first_error(exc)}", None


def classify(raw: object) -> Kind:
    """"v2", "v1" or "corrupt" for a parsed JSON value (a v2 dict that fails validation is corrupt)."""
    return _classify(raw)[0]


def _inspect(data: bytes) -> tuple[Kind, object | None, str, TrialManifest | None]:
    raw, why = decode_json(data)
    if why:
        return "corrupt", None, why, None
    kind, why, model = _classify(raw)
    return kind, raw, why, model


def read_raw(path: Path) -> tuple[Kind, object | None]:
    """The kind of the manifest file and its parsed JSON value (None when it does not parse)."""
    kind, raw, _, _ = _inspect(Path(path).read_bytes())
    return kind, raw


# ------------------------------------------------------------------------------------------ stage inference

def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _count_csv_rows(path: Path) -> int | None:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return max(sum(1 for _ in csv.reader(fh)) - 1, 0)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _load_json_object(path: Path) -> dict[str, Any] | None:
    try:
        value, why = decode_json(path.read_bytes())
    except OSError:
        return None
    return value if not why and isinstance(value, dict) else None


def infer_stage_status(results_dir: Path, names: TrialNames | None = None) -> dict[str, StageRecord]:
    """Every stage's status as the original's `compute_stage_statuses` would see it, with paths and row counts only.

    With the pipeline's `names`: downloaded: completed iff there are part dirs (named as job keys) and each has a
    non-empty results file (in progress when only some do); parsed / scored: the CSV exists; stats: the significance
    JSON has schema_version >= 2; costs: the costs JSON has the four token/usd keys; report: the report exists;
    archived: pending. Without `names`, every stage is pending (nothing is inferred).
    """
    results_dir = Path(results_dir).absolute()
    run_dir = results_dir.parent.parent

    def rel(path: Path) -> str:
        return path.relative_to(run_dir).as_posix()

    stages = {name: StageRecord() for name in STAGES}
    if names is None:
        return stages
    files = {role: Path(os.path.normpath(results_dir / name)) for role, name in names.stage_files.items()}

    def done(name: str, artifacts: dict[str, Any]) -> None:
        stages[name] = StageRecord(status="completed", updated_at=utcnow(), artifacts=artifacts)

    entries = list(results_dir.iterdir()) if results_dir.is_dir() else []
    part_dirs = sorted(p for p in entries if names.job_key.fullmatch(p.name) and p.is_dir())
    parts = []
    for part_dir in part_dirs:
        results = part_dir / names.part_results
        size = results.stat().st_size if results.is_file() else 0
        if size:
            parts.append({"job_key": part_dir.name, "path": rel(results), "size": size, "rows": _count_lines(results)})
    if part_dirs:
        artifacts: dict[str, Any] = {"parts": parts}
        combined = files["combined"]
        if combined.is_file():
            artifacts["combined_path"] = rel(combined)
        status = "completed" if len(parts) == len(part_dirs) else "in_progress"
        stages["downloaded"] = StageRecord(status=status, updated_at=utcnow(), artifacts=artifacts)
    for name, role, key in (("parsed", "predictions", "predictions_csv"), ("scored", "scores", "per_item_scores_csv")):
        path = files[role]
        if path.is_file():
            rows = _count_csv_rows(path)
            done(name, {key: rel(path), **({"row_count": rows} if rows is not None else {})})
    significance = _load_json_object(files["significance"]) or {}
    version = significance.get("schema_version")
    if type(version) is int and version >= 2:
        done("stats", {"significance_json": rel(files["significance"])})
    costs = _load_json_object(files["costs"]) or {}
    if {"prompt_tokens", "completion_tokens", "total_tokens", "usd"} <= costs.keys():
        done("costs", {"costs_json": rel(files["costs"])})
    report = files["report"]
    if report.is_file():
        done("report", {"report_md": rel(report)})
    return stages


def _event(event: str, **details: Any) -> dict[str, Any]:
    return {"event": event, "at": utcnow(), **details,
            "note": "stage_status inferred from artifacts on disk; tasks re-verify them before trusting a stage"}


def _history(raw: dict[str, Any]) -> list[Any]:
    previous = raw.get(HISTORY_KEY)
    return list(previous) if isinstance(previous, list) else []


def upgrade_v1(raw: dict[str, Any], *, results_dir: Path, names: TrialNames | None = None) -> TrialManifest:
    """The v2 manifest for a v1 dict: every key kept, `created_at` from `created_utc`, stage_status inferred (given
    the pipeline's `names`; without them every stage the v1 dict does not state is pending).

    Raises pydantic's ValidationError (a ValueError) when `raw` is not a usable v1 manifest (`classify` says so).
    """
    data = _v1_fields(raw)
    inferred = {name: record.model_dump(mode="json") for name, record in infer_stage_status(results_dir, names).items()}
    explicit = raw.get("stage_status") if isinstance(raw.get("stage_status"), dict) else {}
    data["stage_status"] = {**inferred, **explicit}
    variant = "890c944 (string jobs)" if any(isinstance(v, str) for v in (raw.get("jobs") or {}).values()) else "v1"
    data[HISTORY_KEY] = [*_history(raw), _event("upgraded", source="v1", variant=variant)]
    return TrialManifest.model_validate(data)


# ------------------------------------------------------------------------------------------------ breadcrumbs

class _Skip(ValueError):
    """A breadcrumb that cannot be used; the message says why."""


@dataclass
class Recovered:
    """What the breadcrumbs of a results dir tell, files used, files skipped with the reason.

    `parts[jkey]`: the job's own breadcrumbs (job and output dataset); `records[jkey]` (a `PartRecord` as JSON) and
    `downloads[jkey]` (its `downloaded` stage entry): the part mirrors.
    """

    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    downloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    used: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)


def _read_bounded(path: Path) -> bytes:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _Skip("not a regular file")
    if st.st_size > BREADCRUMB_MAX_BYTES:
        raise _Skip(f"{st.st_size} bytes, over the {BREADCRUMB_MAX_BYTES}-byte limit")
    # O_NOFOLLOW / O_NONBLOCK: a file swapped for a symlink or a FIFO since the lstat must not be followed or block.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(BREADCRUMB_MAX_BYTES + 1)
    if len(data) > BREADCRUMB_MAX_BYTES:
        raise _Skip(f"over the {BREADCRUMB_MAX_BYTES}-byte limit")
    return data


def _check_ids(record: PartRecord, names: TrialNames) -> None:
    """The remote ids a record would send requests to are bare provider ids, never paths."""
    for what in ("dataset_id", "job_id", "output_dataset_id"):
        value = getattr(record, what)
        if not names.valid_id(value):
            raise _Skip(f"record {what} {value[:120]!r} is not a valid id")


def _check_download(jkey: str, entry: object, results_name: str) -> dict[str, Any]:
    """A `downloaded` stage entry of part `jkey`: its results file's path and, when recorded, its fingerprint."""
    if not isinstance(entry, dict):
        raise _Skip(f"download entry is {type(entry).__name__}, not an object")
    if entry.get("job_key") != jkey:
        raise _Skip(f"download entry is for {str(entry.get('job_key'))[:120]!r}, not {jkey}")
    path = entry.get("path")
    where = PurePosixPath(path) if isinstance(path, str) else None
    if where is None or where.is_absolute() or ".." in where.parts or where.parts[-2:] != (jkey, results_name):
        raise _Skip(f"download entry path {str(path)[:120]!r} is not <trial>/results/{jkey}/{results_name}")
    sha = entry.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise _Skip(f"download entry sha256 {str(sha)[:120]!r} is not a checksum")
    for key in ("size", "mtime_ns", "rows"):
        if key in entry and not (type(entry[key]) is int and entry[key] >= 0):
            raise _Skip(f"download entry {key} {str(entry[key])[:40]!r} is not a count")
    return entry


def _from_part_json(jkey: str, group: str, index: int, data: bytes, names: TrialNames
                    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the part's record as validated JSON, its download entry) from a part mirror; either may be None."""
    obj, why = decode_json(data)
    if why:
        raise _Skip(why)
    if not isinstance(obj, dict):
        raise _Skip("not a JSON object")
    if obj.get("schema_version") != PART_MIRROR_SCHEMA:
        raise _Skip(f"unsupported schema_version {str(obj.get('schema_version'))[:40]!r}")
    if obj.get("job_key") != jkey:
        raise _Skip(f"job_key {str(obj.get('job_key'))[:120]!r} does not match the file name")
    record, download = obj.get("record"), obj.get("download")
    if record is None and download is None:
        raise _Skip("holds neither a record nor a download entry")
    if record is not None:
        try:
            model = PartRecord.model_validate(record)
        except ValidationError as exc:
            raise _Skip(f"record with {_first_error(exc)}") from None
        if (model.group, model.index) != (group, index):
            raise _Skip(f"record is for part {model.group} #{model.index}, not {jkey}")
        _check_ids(model, names)
        record = model.model_dump(mode="json")
    return record, None if download is None else _check_download(jkey, download, names.part_results)


def read_breadcrumbs(results_dir: Path, names: TrialNames | None = None) -> Recovered:
    """Parts known from their job breadcrumb, output dataset breadcrumb and part mirror (file names and parsers from
    `names`); bad files are skipped and logged. Nothing without `names`."""
    found = Recovered()
    if names is None or not Path(results_dir).is_dir():
        return found
    files = sorted(p.name for p in Path(results_dir).iterdir())
    outputs: dict[str, str] = {}
    for suffix in (names.job_suffix, names.output_suffix, names.part_suffix):
        for name in (n for n in files if n.endswith(suffix)):
            jkey = name[: -len(suffix)]
            try:
                match = names.job_key.fullmatch(jkey)
                if not match or int(match["index"]) < 1:
                    raise _Skip(f"{jkey!r} is not a part job key ({names.job_key.pattern})")
                data = _read_bounded(Path(results_dir) / name)
                if suffix == names.job_suffix:
                    found.parts[jkey] = {**names.parse_job(data), "source": names.job_suffix.lstrip("_")}
                elif suffix == names.output_suffix:
                    outputs[jkey] = names.parse_output(data)
                else:
                    record, download = _from_part_json(jkey, match["group"], int(match["index"]), data, names)
                    if record is not None:
                        found.records[jkey] = record
                    if download is not None:
                        found.downloads[jkey] = download
            except (ValueError, OSError) as exc:  # _Skip, and the parsers' ValueError
                log.warning("skip breadcrumb %s: %s", name, exc)
                found.skipped.append({"file": name, "reason": str(exc)})
            else:
                found.used += 1
    for jkey, output in outputs.items():
        part = found.parts.get(jkey)
        if part is None:
            found.parts[jkey] = {"job_name": None, "job_id": None, "output_dataset_id": output, "state": None,
                                 "provider_state": None, "input_dataset_id": None,
                                 "source": names.output_suffix.lstrip("_")}
        elif part["output_dataset_id"] is None:
            part["output_dataset_id"] = output
        elif part["output_dataset_id"] != output:
            # job.json is rewritten at every state change of the part's current job; the text file may be left
            # over from an earlier generation, so the job's own record wins.
            log.warning("breadcrumbs of %s disagree on the output dataset (%s in job.json, %s in %s%s); using job.json",
                        jkey, part["output_dataset_id"], output, jkey, names.output_suffix)
    return found


# --------------------------------------------------------------------------------------------------- rebuild

def _valid(data: dict[str, Any]) -> bool:
    try:
        TrialManifest.model_validate(data)
    except ValidationError:
        return False
    return True


def _salvage(raw: dict[str, Any], base: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The keys (or, for dicts, the entries) of a corrupt manifest that are valid on their own, and what was dropped.

    The identity keys come from the context (the run's frozen config), never from the corrupt file.
    """
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in raw.items():
        if key in (*CONTEXT_KEYS, "schema_version"):
            continue
        if _valid({**base, key: value}):
            kept[key] = value
        elif isinstance(value, dict):
            good = {k: v for k, v in value.items() if _valid({**base, key: {k: v}})}
            if good:
                kept[key] = good
            dropped.extend(f"{key}.{k}" for k in value if k not in good)
        else:
            dropped.append(key)
    return kept, dropped


def _place(table: dict[str, list[Any]], group: str, index: int, value: str) -> None:
    column = list(table.get(group, []))
    column.extend([None] * (index - len(column)))
    column[index - 1] = value
    table[group] = column


def _with_job(record: dict[str, Any], crumb: dict[str, Any] | None) -> dict[str, Any]:
    """A part's record, moved on by its job.json where that is newer (see `_rebuild`)."""
    if crumb is None or crumb["job_id"] != record["job_id"] or record["state"] not in _BEFORE_JOB:
        return record
    return {**record, "state": "submitted", "provider_state": crumb["provider_state"]}


def _downloaded(stage: dict[str, Any], salvaged: bool, mirrored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The `downloaded` stage with each part's entry taken from its mirror, unless the corrupt file's own stage
    survived (it is the newest record of them)."""
    if salvaged or not mirrored:
        return stage
    artifacts = dict(stage.get("artifacts") or {})
    entries = {e["job_key"]: e for e in artifacts.get("parts", []) if isinstance(e, dict) and "job_key" in e}
    entries.update(mirrored)
    artifacts["parts"] = [entries[jkey] for jkey in sorted(entries)]
    status = stage.get("status") if stage.get("status") != "pending" else "in_progress"
    return {**stage, "status": status, "updated_at": stage.get("updated_at") or utcnow(), "artifacts": artifacts}


def _rebuild(results_dir: Path, identity: dict[str, Any], salvage: object, reason: str, names: TrialNames
             ) -> tuple[TrialManifest, Recovered]:
    """The manifest rebuilt from the context, the corrupt file's valid keys, the artifacts and the breadcrumbs.

    Each part's record and `downloaded` entry come back from its part mirror, unless the corrupt file still holds a
    valid one (the mirror is written after the manifest, so it is never newer than the manifest itself). The record
    then wins over the job's own breadcrumbs: it is rewritten after every change, job.json only when the job is
    created and at each provider state change, just *before* the record that follows is saved, so job.json can be
    ahead only by one crash window, and only by what the next poll (a GET, never a create) learns again. The one
    fact job.json adds without interpreting provider states is that the job exists: a record still `planned` ..
    `submitting` whose job id is the job.json's becomes `submitted` with that provider state, so it is re-attached
    and counted as sent. A job.json of another job id (an earlier generation, or a job the provider renamed before
    the record caught up) never changes a record. Parts without any record are kept under `recovered_parts`.
    """
    base = {key: identity[key] for key in CONTEXT_KEYS}
    kept, dropped = _salvage(salvage, base) if isinstance(salvage, dict) else ({}, [])
    inferred = {name: record.model_dump(mode="json") for name, record in infer_stage_status(results_dir, names).items()}
    salvaged_stages = kept.get("stage_status", {})
    recovered = read_breadcrumbs(results_dir, names)
    stages = {**inferred, **salvaged_stages}
    stages["downloaded"] = _downloaded(stages["downloaded"], "downloaded" in salvaged_stages, recovered.downloads)
    data: dict[str, Any] = {**kept, **base, "schema_version": 2, "stage_status": stages}
    salvaged = {jkey: PartRecord.model_validate(part).model_dump(mode="json")
                for jkey, part in kept.get("parts", {}).items()}
    records = {**recovered.records, **salvaged}
    parts = {jkey: _with_job(record, recovered.parts.get(jkey)) for jkey, record in sorted(records.items())}
    jobs = {k: list(v) for k, v in data.get("jobs", {}).items()}
    datasets = {k: list(v) for k, v in data.get("datasets", {}).items()}
    job_status = dict(data.get("job_status", {}))
    for jkey, part in sorted(recovered.parts.items()):
        match = names.job_key.fullmatch(jkey)
        assert match is not None  # read_breadcrumbs only accepts part job keys
        group, index = match["group"], int(match["index"])
        if part["job_name"]:
            _place(jobs, group, index, part["job_name"])
        if part["input_dataset_id"]:
            _place(datasets, group, index, part["input_dataset_id"])
        if part["state"]:
            job_status[jkey] = part["state"]
    for jkey, record in parts.items():  # as `TrialManifest.set_part` mirrors them
        _place(jobs, record["group"], record["index"], record["job_id"])
        _place(datasets, record["group"], record["index"], record["dataset_id"])
        job_status[jkey] = record["state"]
    previous = kept.get("recovered_parts") if isinstance(kept.get("recovered_parts"), dict) else {}
    data.update(parts=parts, jobs=jobs, datasets=datasets, job_status=job_status,
                recovered_parts={**previous, **recovered.parts})
    data[HISTORY_KEY] = [*_history(kept), _event(
        "rebuilt", source="corrupt", reason=reason, breadcrumbs_used=recovered.used,
        breadcrumbs_skipped=recovered.skipped, dropped_keys=dropped,
        part_records_recovered=sorted(set(recovered.records) - set(salvaged)),
        downloads_recovered=sorted(recovered.downloads) if "downloaded" not in salvaged_stages else [])]
    return TrialManifest.model_validate(data), recovered


def rebuild_from_disk(results_dir: Path, *, run_id: str, trial: dict[str, Any], temps: list[float],
                      samples_per_item: dict[str, int], prompts: dict[str, Any], names: TrialNames,
                      salvage: object = None, reason: str = "corrupt manifest") -> TrialManifest:
    """A v2 manifest from the context, artifacts and breadcrumbs (named by `names`) of `results_dir`.

    `parts[jkey]` and the part's `downloaded` entry come back from its part mirror; `jobs[group][i]` /
    `datasets[group][i]` / `job_status[jkey]` get what each part's record (else its breadcrumbs) tells, and
    `recovered_parts[jkey]` = `{job_name, job_id, output_dataset_id, state, provider_state, input_dataset_id,
    source}` lets the pipeline re-attach to known jobs. `salvage` (the corrupt file's parsed value, if any)
    contributes every key or dict entry that is valid on its own; breadcrumbs override its tables for the parts they
    cover, its own part records and `downloaded` stage win over the mirrors (see `_rebuild` for the whole rule).
    """
    identity = {"run_id": run_id, "trial": trial, "temps": temps, "samples_per_item": samples_per_item,
                "prompts": prompts}
    return _rebuild(Path(results_dir), identity, salvage, reason, names)[0]


# ------------------------------------------------------------------------------------------------ part mirrors

def mirror_basis(manifest: TrialManifest | None) -> dict[str, Any] | None:
    """The part of a manifest its part mirrors are made of (JSON): take it before a change, for `mirror_parts`."""
    if manifest is None:
        return None
    return manifest.model_dump(mode="json", include={"parts": True, "stage_status": {"downloaded"}})


def part_mirrors(manifest: dict[str, Any] | None, names: TrialNames) -> dict[str, dict[str, Any]]:
    """`{jkey: what <jkey>_part.json holds}` for a manifest's JSON form (or its `mirror_basis`): every part with a
    record or a `downloaded` entry, as `{schema_version, job_key, record, download}` (either may be None)."""
    if not manifest:
        return {}
    records = manifest.get("parts") or {}
    stage = (manifest.get("stage_status") or {}).get("downloaded") or {}
    entries = (stage.get("artifacts") or {}).get("parts") or []
    downloads = {e["job_key"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("job_key"), str)}
    # Only part job keys name files: a key read from a manifest never becomes a path outside the results dir.
    return {jkey: {"schema_version": PART_MIRROR_SCHEMA, "job_key": jkey, "record": records.get(jkey),
                   "download": downloads.get(jkey)}
            for jkey in sorted(set(records) | set(downloads)) if names.job_key.fullmatch(jkey)}


def mirror_parts(path: Path, before: dict[str, Any] | None, after: dict[str, Any], names: TrialNames | None
                 ) -> list[str]:
    """Write `<jkey>_part.json` next to the manifest at `path` for every part whose mirror changed from `before`
    (`mirror_basis` of the manifest as it was; None: a new, upgraded or rebuilt file) to `after` (the manifest as
    just written, as JSON), and for every part whose mirror is missing on disk. The job keys written, sorted.

    The caller holds the manifest's lock and has just replaced the manifest: the mirrors follow it, so a crash in
    between leaves a mirror one change behind at most (`_rebuild` says how that is read). Unchanged parts cost a
    dict comparison; one directory listing per call finds the missing ones. Mirrors of parts the manifest no longer
    has are left as they are: what they tell is still true of the remote side. Without `names` nothing is written
    (the next write with names writes every missing mirror).
    """
    if names is None:
        return []
    new = part_mirrors(after, names)
    if not new:
        return []
    old = part_mirrors(before, names)
    results_dir = Path(path).parent
    try:
        present = {e.name for e in os.scandir(results_dir) if e.name.endswith(names.part_suffix)}
    except OSError:
        present = set()
    written = []
    for jkey, mirror in new.items():
        if old.get(jkey) == mirror and jkey + names.part_suffix in present:
            continue
        write_text(results_dir / f"{jkey}{names.part_suffix}", dumps_json(mirror))
        written.append(jkey)
    return written


# ------------------------------------------------------------------------------------------ backups and hook

def _stamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _candidates(path: Path, kind: Literal["backup", "corrupt"], stamp: str) -> Iterator[Path]:
    suffix = ".json" if kind == "backup" else ""
    base = f"{path.name}.{kind}.{stamp}"
    yield path.with_name(base + suffix)
    for n in itertools.count(1):
        yield path.with_name(f"{base}.{n}{suffix}")


def backup_path(path: Path, kind: Literal["backup", "corrupt"], *, now: datetime | None = None) -> Path:
    """`<name>.backup.<YYYYmmddTHHMMSSffffffZ>.json` or `<name>.corrupt.<stamp>`, with `.1`, `.2` … if taken."""
    path = Path(path)
    return next(c for c in _candidates(path, kind, _stamp(now or _now())) if not os.path.lexists(c))


def _copy_aside(path: Path, data: bytes, kind: Literal["backup", "corrupt"]) -> Path:
    """Write the original bytes to a fresh backup name; O_EXCL makes "never overwrite" hold even without the lock."""
    candidates = _candidates(path, kind, _stamp(_now()))
    while True:
        candidate = next(candidates)
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            continue
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    crashpoint(f"after manifest {kind} copy")
    return candidate


def _identity(path: Path, context: Context | None, why: str, names: TrialNames | None
              ) -> tuple[Path, dict[str, Any], TrialNames]:
    """The results dir, the context and the names a corrupt manifest is rebuilt with (the context's `"names"`, else
    `names`); ManifestError when any is missing."""
    if context is None:
        raise ManifestError(f"{path}: corrupt trial manifest ({why}); it is rebuilt from the breadcrumbs on disk "
                            "when opened with the trial's context")
    ctx = context()
    names = ctx.get("names") or names
    missing = [k for k in CONTEXT_KEYS if k not in ctx] + ([] if names is not None else ["names"])
    if missing:
        raise ManifestError(f"{path}: the rebuild context lacks {', '.join(missing)}")
    assert names is not None
    return Path(ctx.get("results_dir") or path.parent), ctx, names


def _refuse_newer(path: Path, raw: object) -> None:
    """A manifest from a newer schema is not ours to rebuild: the operator must upgrade the pipeline instead."""
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if type(version) is int and version > 2:
        raise ManifestError(f"{path}: schema_version {version} was written by a newer version of the pipeline; "
                            "refusing to rebuild it")


def open_trial_manifest(path: Path, *, context: Context | None = None, names: TrialNames | None = None
                        ) -> tuple[TrialManifest | None, str]:
    """Read-only: the manifest as v2 (upgraded or rebuilt in memory when needed) and a one-line reason.

    Writes nothing. None when the file does not exist. Raises ManifestError for a corrupt manifest when no
    `context` is given (or neither it nor `names` gives the names), and for one written by a newer schema. A v1
    manifest's stages are inferred only with `names`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "no manifest"
    kind, raw, why, model = _inspect(data)
    if kind == "v2":
        return model, "v2 manifest"
    if kind == "v1":
        upgraded = upgrade_v1(cast("dict[str, Any]", raw), results_dir=path.parent, names=names)
        return upgraded, "v1 manifest, upgraded in memory"
    _refuse_newer(path, raw)
    results_dir, ctx, names = _identity(path, context, why, names)
    rebuilt, recovered = _rebuild(results_dir, ctx, raw, why, names)
    return rebuilt, f"corrupt manifest ({why}), rebuilt in memory from {recovered.used} breadcrumbs"


def _write(path: Path, model: TrialManifest, copy: Path, names: TrialNames | None) -> TrialManifest:
    """Replace the manifest with an upgraded / rebuilt one, then (re)write every part mirror from it."""
    model.model_extra[HISTORY_KEY][-1]["copy"] = copy.name  # type: ignore[index]
    model.timestamps.updated_at = utcnow()
    validated = TrialManifest.model_validate(model.model_dump(mode="json"))
    data = validated.model_dump(mode="json")
    write_text(path, dumps_json(data))
    mirror_parts(path, None, data, names)
    return validated


def persist_lifecycle_locked(path: Path, *, context: Context | None = None, names: TrialNames | None = None
                             ) -> TrialManifest | None:
    """`persist_lifecycle` for a caller that already holds `lock_for(path)` (i.e. `store.update`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    kind, raw, why, model = _inspect(data)
    if kind == "v2":
        return model
    if kind == "v1":
        upgraded = upgrade_v1(cast("dict[str, Any]", raw), results_dir=path.parent, names=names)
        copy = _copy_aside(path, data, "backup")
        written = _write(path, upgraded, copy, names)
        log.info("upgrade manifest %s: v1 → v2 (backup %s)", path, copy.name)
        return written
    _refuse_newer(path, raw)
    results_dir, ctx, names = _identity(path, context, why, names)
    rebuilt, recovered = _rebuild(results_dir, ctx, raw, why, names)
    copy = _copy_aside(path, data, "corrupt")
    written = _write(path, rebuilt, copy, names)
    log.info("repair manifest %s: corrupt (%s), rebuilt from %d breadcrumbs (copy at %s)",
             path, why, recovered.used, copy.name)
    return written


def persist_lifecycle(path: Path, *, context: Context | None = None, names: TrialNames | None = None
                      ) -> TrialManifest | None:
    """Upgrade (v1) or repair (corrupt) the manifest on disk, under its lock; the v2 manifest, None if absent.

    The original bytes are copied aside before the file is replaced. A v2 manifest is returned untouched. `names`
    as for `open_trial_manifest`; the part mirrors of an upgraded / rebuilt file are written only with names.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return None
    with lock_for(path):
        return persist_lifecycle_locked(path, context=context, names=names)
