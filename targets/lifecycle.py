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
  and input fingerprints that make a stage count as done, so tasks still verify everything.
- Breadcrumbs are untrusted input: bounded size, regular files only, ids checked; a bad one is skipped with a
  logged reason and never stops the rebuild.
- `open_trial_manifest` does it in memory and writes nothing (done predicates, the read-only `plan`).
  `persist_lifecycle` does it for real under the store's lock: the original bytes are copied aside first
  (`<name>.backup.<ts>.json` / `<name>.corrupt.<ts>`, never overwriting another copy), then the v2 manifest
  replaces the file atomically. Under the lock, a second process finds v2 and does nothing.
- Every change is appended to the manifest's `lifecycle_history` list.
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
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import ValidationError

from targets.atomic import dumps_json, write_text
from targets.crashpoints import crashpoint
from targets.manifest import STAGES, StageRecord, TrialManifest, utcnow
from targets.store import Context, ManifestError, lock_for

log = logging.getLogger("pipeline")

Kind = Literal["v2", "v1", "corrupt"]
BREADCRUMB_MAX_BYTES = 1 << 20
HISTORY_KEY = "lifecycle_history"
V1_KEYS = ("created_utc", "run_id", "trial", "temps", "samples_per_item")
CONTEXT_KEYS = ("run_id", "trial", "temps", "samples_per_item", "prompts")
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_RESOURCE = re.compile(r"accounts/([^/]+)/([^/]+)/([^/]+)")
_STATE = re.compile(r"[A-Za-z_]{1,64}")
_JKEY = re.compile(r"(?P<group>t[0-9]+_(?:control|treatment))_p(?P<index>[0-9]{2,})")
_JOB_SUFFIX = "_job.json"
_OUTPUT_SUFFIX = "_OUTPUT_DATASET_ID.txt"


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------- classification

def _decode(data: bytes) -> tuple[object | None, str]:
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
    raw, why = _decode(data)
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
        value, why = _decode(path.read_bytes())
    except OSError:
        return None
    return value if not why and isinstance(value, dict) else None


def infer_stage_status(results_dir: Path) -> dict[str, StageRecord]:
    """Every stage's status as the original's `compute_stage_statuses` would see it, with paths and row counts only.

    downloaded: completed iff there are `t*_p*` part dirs and each has a non-empty results.jsonl (in progress
    when only some do); parsed / scored: the CSV exists; stats: significance.json has schema_version >= 2;
    costs: costs.json has the four token/usd keys; report: `../reports/report.md` exists; archived: pending.
    """
    results_dir = Path(results_dir).absolute()
    run_dir = results_dir.parent.parent

    def rel(path: Path) -> str:
        return path.relative_to(run_dir).as_posix()

    stages = {name: StageRecord() for name in STAGES}

    def done(name: str, artifacts: dict[str, Any]) -> None:
        stages[name] = StageRecord(status="completed", updated_at=utcnow(), artifacts=artifacts)

    entries = list(results_dir.iterdir()) if results_dir.is_dir() else []
    part_dirs = sorted(p for p in entries if _JKEY.fullmatch(p.name) and p.is_dir())
    parts = []
    for part_dir in part_dirs:
        results = part_dir / "results.jsonl"
        size = results.stat().st_size if results.is_file() else 0
        if size:
            parts.append({"job_key": part_dir.name, "path": rel(results), "size": size, "rows": _count_lines(results)})
    if part_dirs:
        artifacts: dict[str, Any] = {"parts": parts}
        combined = results_dir / "results_combined.jsonl"
        if combined.is_file():
            artifacts["combined_path"] = rel(combined)
        status = "completed" if len(parts) == len(part_dirs) else "in_progress"
        stages["downloaded"] = StageRecord(status=status, updated_at=utcnow(), artifacts=artifacts)
    for name, file_name, key in (("parsed", "predictions.csv", "predictions_csv"),
                                 ("scored", "per_item_scores.csv", "per_item_scores_csv")):
        path = results_dir / file_name
        if path.is_file():
            rows = _count_csv_rows(path)
            done(name, {key: rel(path), **({"row_count": rows} if rows is not None else {})})
    significance = _load_json_object(results_dir / "significance.json") or {}
    version = significance.get("schema_version")
    if type(version) is int and version >= 2:
        done("stats", {"significance_json": rel(results_dir / "significance.json")})
    costs = _load_json_object(results_dir / "costs.json") or {}
    if {"prompt_tokens", "completion_tokens", "total_tokens", "usd"} <= costs.keys():
        done("costs", {"costs_json": rel(results_dir / "costs.json")})
    report = results_dir.parent / "reports" / "report.md"
    if report.is_file():
        done("report", {"report_md": rel(report)})
    return stages


def _event(event: str, **details: Any) -> dict[str, Any]:
    return {"event": event, "at": utcnow(), **details,
            "note": "stage_status inferred from artifacts on disk; tasks re-verify them before trusting a stage"}


def _history(raw: dict[str, Any]) -> list[Any]:
    previous = raw.get(HISTORY_KEY)
    return list(previous) if isinstance(previous, list) else []


def upgrade_v1(raw: dict[str, Any], *, results_dir: Path) -> TrialManifest:
    """The v2 manifest for a v1 dict: every key kept, `created_at` from `created_utc`, stage_status inferred.

    Raises pydantic's ValidationError (a ValueError) when `raw` is not a usable v1 manifest (`classify` says so).
    """
    data = _v1_fields(raw)
    inferred = {name: record.model_dump(mode="json") for name, record in infer_stage_status(results_dir).items()}
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
    """What the breadcrumbs of a results dir tell: `parts[jkey]`, files used, files skipped with the reason."""

    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
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


def _bare_id(value: object, kind: str, what: str) -> str:
    """`accounts/<acct>/<kind>/<id>` or a bare id -> the checked bare id."""
    if not isinstance(value, str):
        raise _Skip(f"{what} is {type(value).__name__}, not a string")
    ident = value
    resource = _RESOURCE.fullmatch(value)
    if resource:
        account, found_kind, ident = resource.groups()
        if found_kind != kind or not _ID.fullmatch(account):
            raise _Skip(f"{what} {value[:120]!r} is not accounts/<account>/{kind}/<id>")
    if not _ID.fullmatch(ident):
        raise _Skip(f"{what} {value[:120]!r} is not a valid id")
    return ident


def _from_job_json(data: bytes) -> dict[str, Any]:
    obj, why = _decode(data)
    if why:
        raise _Skip(why)
    if not isinstance(obj, dict):
        raise _Skip("not a JSON object")
    job_id = _bare_id(obj.get("name"), "batchInferenceJobs", "name")
    state = obj.get("state")
    if state is not None and not (isinstance(state, str) and _STATE.fullmatch(state)):
        raise _Skip(f"state {str(state)[:120]!r} is not a job state")
    optional = {key: _bare_id(obj[wire], "datasets", wire) if obj.get(wire) is not None else None
                for key, wire in (("output_dataset_id", "outputDatasetId"), ("input_dataset_id", "inputDatasetId"))}
    return {"job_name": obj["name"], "job_id": job_id,
            "state": state.upper().removeprefix("JOB_STATE_").lower() if state else None,
            **optional, "source": "job.json"}


def _from_output_txt(data: bytes) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _Skip("not UTF-8") from None
    if not text or "\n" in text:
        raise _Skip("not a single line")
    return _bare_id(text, "datasets", "output dataset id")


def read_breadcrumbs(results_dir: Path) -> Recovered:
    """Parts known from `<jkey>_job.json` and `<jkey>_OUTPUT_DATASET_ID.txt`; bad files are skipped and logged."""
    found = Recovered()
    if not Path(results_dir).is_dir():
        return found
    names = sorted(p.name for p in Path(results_dir).iterdir())
    outputs: dict[str, str] = {}
    for suffix in (_JOB_SUFFIX, _OUTPUT_SUFFIX):
        for name in (n for n in names if n.endswith(suffix)):
            jkey = name[: -len(suffix)]
            try:
                match = _JKEY.fullmatch(jkey)
                if not match or int(match["index"]) < 1:
                    raise _Skip(f"{jkey!r} is not a part job key t<T>_<control|treatment>_p<NN>")
                data = _read_bounded(Path(results_dir) / name)
                if suffix == _JOB_SUFFIX:
                    found.parts[jkey] = _from_job_json(data)
                else:
                    outputs[jkey] = _from_output_txt(data)
            except (_Skip, OSError) as exc:
                log.warning("skip breadcrumb %s: %s", name, exc)
                found.skipped.append({"file": name, "reason": str(exc)})
            else:
                found.used += 1
    for jkey, output in outputs.items():
        part = found.parts.get(jkey)
        if part is None:
            found.parts[jkey] = {"job_name": None, "job_id": None, "output_dataset_id": output, "state": None,
                                 "input_dataset_id": None, "source": "OUTPUT_DATASET_ID.txt"}
        elif part["output_dataset_id"] is None:
            part["output_dataset_id"] = output
        elif part["output_dataset_id"] != output:
            # job.json is rewritten at every state change of the part's current job; the text file may be left
            # over from an earlier generation, so the job's own record wins.
            log.warning("breadcrumbs of %s disagree on the output dataset (%s in job.json, %s in %s%s); using job.json",
                        jkey, part["output_dataset_id"], output, jkey, _OUTPUT_SUFFIX)
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


def _rebuild(results_dir: Path, identity: dict[str, Any], salvage: object, reason: str
             ) -> tuple[TrialManifest, Recovered]:
    base = {key: identity[key] for key in CONTEXT_KEYS}
    kept, dropped = _salvage(salvage, base) if isinstance(salvage, dict) else ({}, [])
    inferred = {name: record.model_dump(mode="json") for name, record in infer_stage_status(results_dir).items()}
    data: dict[str, Any] = {**kept, **base, "schema_version": 2,
                            "stage_status": {**inferred, **kept.get("stage_status", {})}}
    recovered = read_breadcrumbs(results_dir)
    jobs = {k: list(v) for k, v in data.get("jobs", {}).items()}
    datasets = {k: list(v) for k, v in data.get("datasets", {}).items()}
    job_status = dict(data.get("job_status", {}))
    for jkey, part in sorted(recovered.parts.items()):
        match = _JKEY.fullmatch(jkey)
        assert match is not None  # read_breadcrumbs only accepts part job keys
        group, index = match["group"], int(match["index"])
        if part["job_name"]:
            _place(jobs, group, index, part["job_name"])
        if part["input_dataset_id"]:
            _place(datasets, group, index, part["input_dataset_id"])
        if part["state"]:
            job_status[jkey] = part["state"]
    previous = kept.get("recovered_parts") if isinstance(kept.get("recovered_parts"), dict) else {}
    data.update(jobs=jobs, datasets=datasets, job_status=job_status,
                recovered_parts={**previous, **recovered.parts})
    data[HISTORY_KEY] = [*_history(kept), _event(
        "rebuilt", source="corrupt", reason=reason, breadcrumbs_used=recovered.used,
        breadcrumbs_skipped=recovered.skipped, dropped_keys=dropped)]
    return TrialManifest.model_validate(data), recovered


def rebuild_from_disk(results_dir: Path, *, run_id: str, trial: dict[str, Any], temps: list[float],
                      samples_per_item: dict[str, int], prompts: dict[str, Any], salvage: object = None,
                      reason: str = "corrupt manifest") -> TrialManifest:
    """A v2 manifest from the context, artifacts and breadcrumbs of `results_dir`.

    `jobs[group][i]` / `datasets[group][i]` / `job_status[jkey]` get what each part's breadcrumbs tell, and
    `recovered_parts[jkey]` = `{job_name, job_id, output_dataset_id, state, input_dataset_id, source}` lets the
    pipeline re-attach to known jobs. `salvage` (the corrupt file's parsed value, if any) contributes every key
    or dict entry that is valid on its own; breadcrumbs override it for the parts they cover.
    """
    identity = {"run_id": run_id, "trial": trial, "temps": temps, "samples_per_item": samples_per_item,
                "prompts": prompts}
    return _rebuild(Path(results_dir), identity, salvage, reason)[0]


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


def _identity(path: Path, context: Context | None, why: str) -> tuple[Path, dict[str, Any]]:
    if context is None:
        raise ManifestError(f"{path}: corrupt trial manifest ({why}); it is rebuilt from the breadcrumbs on disk "
                            "when opened with the trial's context")
    ctx = context()
    missing = [k for k in CONTEXT_KEYS if k not in ctx]
    if missing:
        raise ManifestError(f"{path}: the rebuild context lacks {', '.join(missing)}")
    return Path(ctx.get("results_dir") or path.parent), ctx


def _refuse_newer(path: Path, raw: object) -> None:
    """A manifest from a newer schema is not ours to rebuild: the operator must upgrade the pipeline instead."""
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if type(version) is int and version > 2:
        raise ManifestError(f"{path}: schema_version {version} was written by a newer version of the pipeline; "
                            "refusing to rebuild it")


def open_trial_manifest(path: Path, *, context: Context | None = None) -> tuple[TrialManifest | None, str]:
    """Read-only: the manifest as v2 (upgraded or rebuilt in memory when needed) and a one-line reason.

    Writes nothing. None when the file does not exist. Raises ManifestError for a corrupt manifest when no
    `context` is given, and for one written by a newer schema.
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
        return upgrade_v1(cast("dict[str, Any]", raw), results_dir=path.parent), "v1 manifest, upgraded in memory"
    _refuse_newer(path, raw)
    results_dir, ctx = _identity(path, context, why)
    rebuilt, recovered = _rebuild(results_dir, ctx, raw, why)
    return rebuilt, f"corrupt manifest ({why}), rebuilt in memory from {recovered.used} breadcrumbs"


def _write(path: Path, model: TrialManifest, copy: Path) -> TrialManifest:
    model.model_extra[HISTORY_KEY][-1]["copy"] = copy.name  # type: ignore[index]
    model.timestamps.updated_at = utcnow()
    validated = TrialManifest.model_validate(model.model_dump(mode="json"))
    write_text(path, dumps_json(validated.model_dump(mode="json")))
    return validated


def persist_lifecycle_locked(path: Path, *, context: Context | None = None) -> TrialManifest | None:
    """`persist_lifecycle` for a caller that already holds `store.lock_for(path)` (i.e. `store.update`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    kind, raw, why, model = _inspect(data)
    if kind == "v2":
        return model
    if kind == "v1":
        upgraded = upgrade_v1(cast("dict[str, Any]", raw), results_dir=path.parent)
        copy = _copy_aside(path, data, "backup")
        written = _write(path, upgraded, copy)
        log.info("upgrade manifest %s: v1 → v2 (backup %s)", path, copy.name)
        return written
    _refuse_newer(path, raw)
    results_dir, ctx = _identity(path, context, why)
    rebuilt, recovered = _rebuild(results_dir, ctx, raw, why)
    copy = _copy_aside(path, data, "corrupt")
    written = _write(path, rebuilt, copy)
    log.info("repair manifest %s: corrupt (%s), rebuilt from %d breadcrumbs (copy at %s)",
             path, why, recovered.used, copy.name)
    return written


def persist_lifecycle(path: Path, *, context: Context | None = None) -> TrialManifest | None:
    """Upgrade (v1) or repair (corrupt) the manifest on disk, under its lock; the v2 manifest, None if absent.

    The original bytes are copied aside before the file is replaced. A v2 manifest is returned untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return None
    with lock_for(path):
        return persist_lifecycle_locked(path, context=context)
