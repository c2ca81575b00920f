"""Read-only views of runs: `status` (one run, trial by trial) and `list` (every run under a root).

Contract:
- `run_status(rid, root)` and `list_runs(root)` return plain dicts / lists (JSON-serialisable) built only from what is
  on disk: trial manifests (`targets.store.read`, which never writes; a corrupt one is rebuilt in memory from its
  breadcrumbs and part mirrors when the run's frozen config knows the trial, else shown as "manifest unreadable:
  <reason>"), `run_state.json`, `STOP_REQUESTED` and the aggregate report. Nothing is written, locked or created,
  so they are safe next to a running pipeline.
- A run's trials are those of its frozen config plus any trial directory holding a manifest, sorted by slug.
- Parts are counted under the trial whose manifest owns them: a control part another trial reuses (its
  `control_registry` names the producer) is never counted twice.
- Money is counted once too. A trial's `usd` is what its predictions consumed (shared parts included), split into
  `owned_usd` (the parts it pays for) and `shared_usd` (parts another trial owns and pays for), as its costs stage
  recorded them. The run's `total_usd` (and `list`'s) is `pipeline.costs.run_spent_usd`: the sum of owned_usd,
  i.e. over distinct parts, the figure `budget.spent_usd` and the aggregate report show.
- A run is "done" when its aggregate report is recorded current in `run_state.json` and every trial is done;
  otherwise "stopped" (`STOP_REQUESTED` exists), "not started" (no frozen config, no trial manifest) or "in progress".
- `render_status` / `render_list` turn those into aligned text tables, one line per trial / run.
- `status_command(argv)` / `list_command(argv)` are the CLI entry points (`--json` prints the data instead);
  an unknown or invalid rid exits with `exit_codes.CONFIG_INVALID` and names the root searched.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO, get_args

from pipeline import budget
from pipeline.control import exit_codes
from pipeline.control.layout import TRIAL_FILES, RunLayout, check_rid
from pipeline.control.run import open_run
from pipeline.costs import read_costs, run_spent_usd
from pipeline.tasks.base import trial_context
from pipeline.views.archive import archive_current
from targets import store
from targets.fingerprint import fingerprint
from targets.lifecycle import open_trial_manifest
from targets.manifest import PartState, RunState, TrialManifest

VIEW_STAGES = ("downloaded", "parsed", "scored", "stats", "costs", "optional", "report")
PART_STATES: tuple[str, ...] = get_args(PartState)
_NOT_SUBMITTED = ("planned", "uploading", "uploaded", "submitting")
_AT_PROVIDER = ("submitted", "running")
_LOST = ("failed", "expired", "cancelled")
_STAGE_SHOWN = {"completed": "done", "in_progress": "running", "pending": "-", "failed": "FAILED", "stale": "stale"}
_STOP_READ_LIMIT = 4096


class UnknownRunError(LookupError):
    """No run directory for the rid under the root; the message names the root searched."""


def _root(root: str | Path | None) -> Path:
    from pipeline.control.run import resolve_root

    return resolve_root(root)


def _file_current(layout: RunLayout, record: dict[str, Any] | None) -> bool:
    """Is a recorded artifact (`{"path", "sha256", ...}`) still on disk unchanged? (stat short-cut, checksum decides)"""
    if not record or "path" not in record:
        return False
    fp = fingerprint(layout.run_dir / record["path"], record)
    return fp is not None and fp.sha256 == record.get("sha256")


def _config_trials(layout: RunLayout) -> tuple[list[str], dict[str, Any]]:
    """Trial slugs of the frozen config and a description of the config source (never the default config)."""
    if not layout.effective_config.exists():
        return [], {"frozen": False, "source": None, "error": None}
    from pipeline.control.config import ConfigError
    from pipeline.control.run import open_run

    try:
        run = open_run(layout.rid, layout.root)
    except (ConfigError, ValueError, OSError) as exc:
        return [], {"frozen": True, "source": str(layout.effective_config), "error": str(exc)}
    return [t.slug for t in run.trials], {"frozen": True, "source": str(run.source), "error": None}


def _borrowed_groups(manifest: TrialManifest, slug: str) -> set[str]:
    """Part groups (`t07_control`) this trial reuses from another trial: counted under their producer only."""
    groups = set()
    for key, entry in manifest.control_registry.items():
        if isinstance(entry, dict) and entry.get("mode") == "reuse" and entry.get("producer_trial") not in (None, slug):
            groups.add(f"{key}_{entry.get('condition', 'control')}")
    return groups


def _part_counts(manifest: TrialManifest, slug: str) -> dict[str, int]:
    borrowed = _borrowed_groups(manifest, slug)
    counts = {state: 0 for state in PART_STATES}
    for record in manifest.parts.values():
        if record.group not in borrowed:
            counts[record.state] += 1
    return {state: n for state, n in counts.items() if n}


def _usd(costs: Any, key: str) -> float | None:
    """A money figure (`usd`, `owned_usd`, `shared_usd`) of the trial's costs.json (the file `spent` is summed from,
    so every figure agrees, whatever state the manifest is in); None when it has none."""
    value = costs.get(key) if isinstance(costs, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _blocking(layout: RunLayout, slug: str, manifest: TrialManifest, parts: dict[str, int],
              stages: dict[str, str]) -> list[str]:
    reasons = []
    for label, states in (("not yet submitted", _NOT_SUBMITTED), ("running at the provider", _AT_PROVIDER)):
        n = sum(parts.get(s, 0) for s in states)
        if n:
            reasons.append(f"{n} part{'s' if n > 1 else ''} {label}")
    reasons += [f"{parts[s]} part{'s' if parts[s] > 1 else ''} {s}" for s in _LOST if parts.get(s)]
    reasons += [f"stage {stage} {status}" for stage, status in stages.items() if status in ("failed", "stale")]
    report = manifest.stage("report")
    if report.status != "completed":
        reasons.append("report missing")
    elif not _file_current(layout, report.artifacts.get("file")):
        why = "missing" if not layout.report_md(slug).exists() else "changed since it was written"
        reasons.append(f"report {why}")
    return reasons


def trial_status(layout: RunLayout, slug: str) -> dict[str, Any]:
    """One trial's view: state, stage statuses, part counts, usd (consumed / owned / shared) and what blocks it
    (never raises for bad data)."""
    view: dict[str, Any] = {"trial": slug, "state": "not started", "manifest": "missing", "stages": {}, "parts": {},
                            "usd": None, "owned_usd": None, "shared_usd": None, "blocking": []}
    try:
        manifest, how = open_trial_manifest(layout.trial_manifest(slug),
                                            context=lambda: trial_context(open_run(layout.rid, layout.root), slug),
                                            names=TRIAL_FILES)
    except (ValueError, OSError) as exc:  # ManifestError is a ValueError; permissions and the like are OSErrors
        reason = f"manifest unreadable: {exc}"
        return {**view, "state": "unreadable", "manifest": reason, "blocking": [reason]}
    if manifest is None:
        return {**view, "blocking": ["no trial manifest yet"]}
    stages = {stage: manifest.stage_status[stage].status if stage in manifest.stage_status else "pending"
              for stage in VIEW_STAGES}
    parts = _part_counts(manifest, slug)
    blocking = _blocking(layout, slug, manifest, parts, stages)
    costs = read_costs(layout.costs(slug))
    shown = "ok" if how == "v2 manifest" else how  # an old or corrupt file is read as upgraded / rebuilt in memory
    return {**view, "state": "in progress" if blocking else "done", "manifest": shown, "stages": stages, "parts": parts,
            "usd": _usd(costs, "usd"), "owned_usd": _usd(costs, "owned_usd"),
            "shared_usd": _usd(costs, "shared_usd"), "blocking": blocking}


def _confirm_done(layout: RunLayout, trial: dict[str, Any]) -> None:
    """A trial its manifest calls done is done only if the pipeline's own predicates agree (the ones `plan` and a
    run use: every stage current, every part's results unchanged); otherwise it is in progress, with their reason."""
    from pipeline.tasks.report import TrialReport
    from pipeline.views.plan import first_cause

    quiet = logging.getLogger("pipeline")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the predicates log their decisions; a view only reports them
    try:
        task = TrialReport(rid=layout.rid, root=str(layout.root), trial=trial["trial"])
        cause = None if task.complete() else first_cause(task)
    finally:
        quiet.setLevel(level)
    if cause:
        trial["state"] = "in progress"
        trial["blocking"].append(cause)


def _run_state(layout: RunLayout) -> tuple[RunState | None, str | None]:
    try:
        return store.read(layout.run_state, RunState), None
    except (ValueError, OSError) as exc:
        return None, str(exc)


def _stop_reason(layout: RunLayout) -> str | None:
    try:
        with open(layout.stop_file, encoding="utf-8", errors="replace") as fh:
            return fh.read(_STOP_READ_LIMIT).strip() or "requested"
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"requested (unreadable sentinel: {exc})"


def run_status(rid: str, root: str | Path | None) -> dict[str, Any]:
    """The run's status, trial by trial. Raises UnknownRunError when there is no such run, ValueError for a bad rid."""
    layout = RunLayout(_root(root), check_rid(rid))
    if not layout.run_dir.is_dir():
        raise UnknownRunError(f"no run {rid!r} under {layout.root} (looked for {layout.run_dir})")
    slugs, config = _config_trials(layout)
    on_disk = [p.parent.parent.name for p in layout.run_dir.glob("*/results/trial_manifest.json")]
    trials = [trial_status(layout, slug) for slug in sorted(set(slugs) | set(on_disk))]
    if config["frozen"] and not config["error"]:
        for trial in trials:
            if trial["state"] == "done" and trial["trial"] in slugs:
                _confirm_done(layout, trial)
    stop = _stop_reason(layout)
    if stop is not None:
        for trial in trials:
            if trial["state"] != "done":
                trial["blocking"].append("stop requested")
    state, state_error = _run_state(layout)
    aggregate = {"present": layout.aggregate_report.exists(),
                 "current": bool(state) and _file_current(layout, state.aggregate_report.get("file"))}
    if aggregate["current"] and all(t["state"] == "done" for t in trials):
        status = "done"
    elif stop is not None:
        status = "stopped"
    elif not config["frozen"] and not on_disk:
        status = "not started"
    else:
        status = "in progress"
    return {"rid": rid, "run_dir": str(layout.run_dir), "status": status, "config": config,
            "stop_requested": stop is not None, "stop_reason": stop, "run_state_error": state_error,
            "aggregate_report": aggregate, "total_usd": run_spent_usd(trials),
            "budget": _budget(rid, root, config), "archive": _archive(layout, slugs), "trials": trials}


def _budget(rid: str, root: str | Path | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """The budget, the money committed by sent parts and the money spent per the priced results (frozen runs only)."""
    if not config["frozen"] or config["error"]:
        return None
    try:
        return budget.summary(open_run(rid, root))
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}


def _archive(layout: RunLayout, slugs: list[str]) -> dict[str, Any] | None:
    """The archive recorded by the trials (the `archived` stage), and whether it still holds the run as it is."""
    try:
        manifest = store.read(layout.trial_manifest(slugs[0]), TrialManifest, names=TRIAL_FILES) if slugs else None
    except (OSError, ValueError):
        return None
    record = manifest.stage("archived").artifacts if manifest else {}
    if not record.get("archive_path"):
        return None
    current, reason = archive_current(layout, record)
    return {"path": record["archive_path"], "current": current, "reason": reason}


def list_runs(root: str | Path | None, *, now: float | None = None) -> list[dict[str, Any]]:
    """Every `run_*` directory under the root, sorted by rid: age (of effective_config.yaml), trials, status, total_usd
    (the run's `total_usd`: distinct parts, shared parts counted once)."""
    base = _root(root)
    now = time.time() if now is None else now
    runs = []
    for run_dir in sorted(base.glob("run_*")) if base.is_dir() else []:
        rid = run_dir.name.removeprefix("run_")
        try:
            check_rid(rid)
        except ValueError:
            continue  # not a directory the pipeline could have written
        if not run_dir.is_dir():
            continue
        status = run_status(rid, base)
        try:
            age: float | None = max(0.0, now - RunLayout(base, rid).effective_config.stat().st_mtime)
        except OSError:
            age = None
        runs.append({"rid": rid, "age_s": age, "trials": len(status["trials"]), "status": status["status"],
                     "total_usd": status["total_usd"]})
    return runs


# ---------------------------------------------------------------------------------------------- text rendering

def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]


def _money(usd: float | None) -> str:
    return "-" if usd is None else f"${usd:.6f}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def render_status(view: dict[str, Any]) -> str:
    config = view["config"]
    if config["error"]:
        source = f"frozen, unreadable ({config['error']})"
    else:
        source = f"frozen ({config['source']})" if config["frozen"] else "not frozen yet"
    aggregate = view["aggregate_report"]
    report = "current" if aggregate["current"] else "present, not recorded current" if aggregate["present"] else "missing"
    lines = [f"run {view['rid']} at {view['run_dir']}: {view['status']}",
             f"config: {source}",
             f"stop requested: {'yes (' + view['stop_reason'] + ')' if view['stop_requested'] else 'no'}; "
             f"aggregate report: {report}; total usd (distinct parts, shared parts counted once): "
             f"{_money(view['total_usd'])}"]
    if view["run_state_error"]:
        lines.append(f"run_state.json unreadable: {view['run_state_error']}")
    money = view.get("budget")
    if money and "error" not in money:
        limit = "none set" if money["max_usd"] is None else _money(money["max_usd"])
        lines.append(f"budget: {limit}; committed (estimate of every part sent): {_money(money['committed_usd'])}; "
                     f"spent (priced results, each part once): {_money(money['spent_usd'])}")
    if view.get("archive"):
        archive = view["archive"]
        lines.append(f"archive: {archive['path']} ({'current' if archive['current'] else archive['reason']})")
    rows = []
    for trial in view["trials"]:
        stages = [_STAGE_SHOWN.get(trial["stages"].get(s, ""), "-") for s in VIEW_STAGES]
        parts = ", ".join(f"{n} {state}" for state, n in trial["parts"].items()) or "-"
        rows.append([trial["trial"], trial["state"], *stages, parts, _money(trial["owned_usd"]),
                     _money(trial["shared_usd"]), "; ".join(trial["blocking"]) or "-"])
    # A trial's consumption is split into what it pays for and what it reads from parts other trials own, so the
    # owned column adds up to the run's total and no shared part is counted twice.
    headers = ["trial", "state", *VIEW_STAGES, "parts", "usd owned", "usd shared (paid by owner)", "blocking"]
    lines += _table(headers, rows) if rows else ["no trials"]
    lines += [f"{trial['trial']}: {trial['manifest']}" for trial in view["trials"]
              if trial["manifest"] not in ("ok", "missing") and trial["state"] != "unreadable"]
    return "\n".join(lines) + "\n"


def render_list(runs: list[dict[str, Any]], root: Path) -> str:
    if not runs:
        return f"no runs under {root}\n"
    rows = [[r["rid"], _age(r["age_s"]), str(r["trials"]), r["status"], _money(r["total_usd"])] for r in runs]
    return "\n".join(_table(["rid", "age", "trials", "status", "usd (distinct parts)"], rows)) + "\n"


# ---------------------------------------------------------------------------------------------- CLI

def _emit(data: Any, text: str, as_json: bool, stream: TextIO) -> None:
    stream.write(json.dumps(data, indent=2) + "\n" if as_json else text)


def status_command(argv: list[str], stream: TextIO | None = None) -> int:
    """`status --rid X [--root DIR] [--json]`."""
    parser = argparse.ArgumentParser(prog="python -m pipeline status", description="read-only: where a run stands")
    parser.add_argument("--rid", required=True)
    parser.add_argument("--root", default="", help="experiments root (default ./experiments)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)
    out = stream or sys.stdout
    try:
        view = run_status(args.rid, args.root or None)
    except (UnknownRunError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_INVALID
    _emit(view, render_status(view), args.json, out)
    return exit_codes.OK


def list_command(argv: list[str], stream: TextIO | None = None) -> int:
    """`list [--root DIR] [--json]`."""
    parser = argparse.ArgumentParser(prog="python -m pipeline list", description="read-only: every run under a root")
    parser.add_argument("--root", default="", help="experiments root (default ./experiments)")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON")
    args = parser.parse_args(argv)
    root = _root(args.root or None)
    runs = list_runs(root)
    _emit(runs, render_list(runs, root), args.json, stream or sys.stdout)
    return exit_codes.OK
