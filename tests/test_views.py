"""Read-only run views: `status` and `list` over a run built by the real pipeline, then damaged copies of it."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import luigi
import pytest

from pipeline import TrialReport
from pipeline.control.layout import RunLayout
from pipeline.control.stop import request_stop
from pipeline.views.status import list_command, list_runs, run_status, status_command
from targets import store
from targets.manifest import TrialManifest
from tests.conftest import small_experiment

RID = "views"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run (two trials; the second reuses the first's control parts) under its own root."""
    base = tmp_path_factory.mktemp("views")
    common = {"rid": RID, "root": str(base / "exp"), "config": str(small_experiment(base))}
    assert luigi.build([TrialReport(**common)], local_scheduler=True, log_level="WARNING")
    return base / "exp"


@pytest.fixture
def root(built: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, free to damage."""
    shutil.copytree(built / f"run_{RID}", tmp_path / "exp" / f"run_{RID}", symlinks=True)
    return tmp_path / "exp"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def call(command, argv: list[str]) -> tuple[int, str]:  # noqa: ANN001
    out = io.StringIO()
    return command(argv, stream=out), out.getvalue()


def trials(view: dict) -> dict[str, dict]:
    return {t["trial"]: t for t in view["trials"]}


def test_finished_run_status_and_list(root: Path) -> None:
    view = run_status(RID, str(root))
    assert view["status"] == "done" and view["config"]["frozen"] and not view["stop_requested"]
    assert view["aggregate_report"] == {"present": True, "current": True}
    by_slug = trials(view)
    assert len(by_slug) == 2 and all(t["state"] == "done" and t["blocking"] == [] for t in by_slug.values())
    assert all(set(t["stages"].values()) == {"completed"} for t in by_slug.values())
    # Each condition × temperature is two parts; the control parts are shared, so 4 + 8 and never 8 + 8.
    assert sorted(t["parts"]["completed"] for t in by_slug.values()) == [4, 8]
    costs = [json.loads((root / f"run_{RID}" / slug / "results" / "costs.json").read_text()) for slug in by_slug]
    assert [[t[k] for t in by_slug.values()] for k in ("usd", "owned_usd")] == [[c[k] for c in costs]
                                                                               for k in ("usd", "owned_usd")]
    assert view["total_usd"] == round(sum(c["owned_usd"] for c in costs), 6)  # a shared part counts once

    code, text = call(status_command, ["--rid", RID, "--root", str(root)])
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("trial "))
    rows = [line for line in lines if line.split(" ")[0] in by_slug]
    assert code == 0 and [r.split()[0] for r in rows] == sorted(by_slug)
    assert all(r[header.index("parts"):].startswith(("4 completed ", "8 completed ")) for r in rows)  # aligned columns
    code, text = call(status_command, ["--rid", RID, "--root", str(root), "--json"])
    assert code == 0 and json.loads(text) == view

    runs = list_runs(str(root))
    assert [(r["rid"], r["trials"], r["status"], r["total_usd"]) for r in runs] == [(RID, 2, "done", view["total_usd"])]
    code, text = call(list_command, ["--root", str(root), "--json"])
    assert code == 0 and [r["rid"] for r in json.loads(text)] == [RID]
    code, text = call(list_command, ["--root", str(root)])
    assert code == 0 and text.splitlines()[1].split()[0] == RID and " done " in text


def test_list_age_and_runs_not_started(root: Path) -> None:
    (root / "run_empty").mkdir()
    (root / "not_a_run").mkdir()
    mtime = (root / f"run_{RID}" / "effective_config.yaml").stat().st_mtime
    runs = {r["rid"]: r for r in list_runs(str(root), now=mtime + 2 * 3600 + 5)}
    assert sorted(runs) == ["empty", RID]
    assert runs[RID]["age_s"] == pytest.approx(2 * 3600 + 5)
    assert runs["empty"] == {"rid": "empty", "age_s": None, "trials": 0, "status": "not started", "total_usd": None}
    assert call(list_command, ["--root", str(root / "nothing")]) == (0, f"no runs under {root / 'nothing'}\n")


def test_running_parts_and_shared_control_counted_once(root: Path) -> None:
    layout = RunLayout(root, RID)
    by_slug = trials(run_status(RID, str(root)))
    borrower = next(slug for slug, t in by_slug.items() if t["parts"]["completed"] == 4)
    owner = next(slug for slug in by_slug if slug != borrower)

    def running(manifest: TrialManifest | None) -> TrialManifest:
        assert manifest is not None
        jkey = sorted(manifest.parts)[0]
        manifest.parts[jkey] = manifest.parts[jkey].model_copy(update={"state": "running"})
        manifest.set_stage("report", "pending")
        return manifest

    def duplicate_control(manifest: TrialManifest | None) -> TrialManifest:
        assert manifest is not None and manifest.control_registry
        owned = store.read(layout.trial_manifest(owner), TrialManifest)
        assert owned is not None
        for jkey, record in owned.parts.items():  # a borrower that also lists the parts it reuses
            if record.group.split("_")[1] == "control":
                manifest.parts[jkey] = record
        return manifest

    store.update(layout.trial_manifest(owner), TrialManifest, running)
    store.update(layout.trial_manifest(borrower), TrialManifest, duplicate_control)
    view = run_status(RID, str(root))
    by_slug = trials(view)
    assert view["status"] == "in progress"
    assert by_slug[owner]["parts"] == {"running": 1, "completed": 7}
    assert by_slug[owner]["state"] == "in progress"
    assert by_slug[owner]["blocking"] == ["1 part running at the provider", "report missing"]
    assert by_slug[borrower]["parts"] == {"completed": 4} and by_slug[borrower]["state"] == "done"
    code, text = call(status_command, ["--rid", RID, "--root", str(root)])
    assert code == 0 and "1 running, 7 completed" in text and "in progress" in text


def test_corrupt_manifest_and_run_state_do_not_crash(root: Path) -> None:
    layout = RunLayout(root, RID)
    slug = sorted(trials(run_status(RID, str(root))))[0]
    fine_parts = trials(run_status(RID, str(root)))[slug]["parts"]
    layout.trial_manifest(slug).write_text('{"schema_version": 2, "run_id": ')
    layout.run_state.write_text("[1, 2]")
    view = run_status(RID, str(root))
    broken, fine = trials(view)[slug], [t for t in view["trials"] if t["trial"] != slug][0]
    # A corrupt trial manifest is shown as rebuilt in memory from its breadcrumbs (nothing is written): its parts are
    # all there; its stage records are inferred only, so the trial is not shown done until the pipeline verifies it.
    assert broken["manifest"].startswith("corrupt manifest (not valid JSON") and "rebuilt in memory" in broken["manifest"]
    assert broken["parts"] == fine_parts and broken["state"] == "in progress"
    assert fine["state"] == "done" and view["total_usd"] == fine["owned_usd"] + broken["owned_usd"]
    assert view["run_state_error"] and view["aggregate_report"]["current"] is False and view["status"] == "in progress"
    code, text = call(status_command, ["--rid", RID, "--root", str(root)])
    assert code == 0 and "rebuilt in memory" in text and "run_state.json unreadable" in text


def test_stop_requested(root: Path) -> None:
    layout = RunLayout(root, RID)
    slug = sorted(trials(run_status(RID, str(root))))[0]
    request_stop(layout, "test")
    layout.report_md(slug).unlink()
    view = run_status(RID, str(root))
    assert view["stop_requested"] and view["stop_reason"].endswith(" test") and view["status"] == "stopped"
    assert trials(view)[slug]["blocking"] == ["report missing", "stop requested"]
    assert [r["status"] for r in list_runs(str(root))] == ["stopped"]
    assert "stop requested: yes" in call(status_command, ["--rid", RID, "--root", str(root)])[1]


@pytest.mark.parametrize("rid", ["missing", "../escape"])
def test_unknown_rid_exits_2_naming_the_root(root: Path, rid: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = call(status_command, ["--rid", rid, "--root", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and out == "" and err.startswith("error: ")
    if rid == "missing":
        assert str(root) in err


def test_views_write_nothing(root: Path) -> None:
    layout = RunLayout(root, RID)
    slug = sorted(trials(run_status(RID, str(root))))[0]
    layout.trial_manifest(slug).write_text("")
    request_stop(layout, "test")
    os.utime(layout.effective_config, ns=(1, 1))  # an old, stat-stamped file must not be "refreshed" either
    before = snapshot(root)
    run_status(RID, str(root))
    list_runs(str(root))
    for argv in (["--rid", RID, "--root", str(root)], ["--rid", RID, "--root", str(root), "--json"]):
        assert call(status_command, argv)[0] == 0
    for argv in (["--root", str(root)], ["--root", str(root), "--json"]):
        assert call(list_command, argv)[0] == 0
    assert snapshot(root) == before


def test_status_uses_the_predicates_plan_uses(root: Path) -> None:
    """A truncated results.jsonl makes its trial "in progress" in status, as plan sees it, not "done"."""
    from pipeline.views.plan import render_plan

    results = sorted(root.glob(f"run_{RID}/*/results/t0_control_p01/results.jsonl"))[0]
    owner = results.parents[2].name
    results.write_bytes(results.read_bytes()[: results.stat().st_size // 2])
    view = run_status(RID, str(root))
    assert view["status"] == "in progress"
    damaged = trials(view)[owner]
    assert damaged["state"] == "in progress" and any("results.jsonl" in b for b in damaged["blocking"]), damaged["blocking"]
    out = io.StringIO()
    assert render_plan(RID, root=str(root), stream=out, as_json=True) == 0
    planned = json.loads(out.getvalue())
    assert any(t["state"] == "to run" and t["stage"] == "downloaded" for t in planned["tasks"]), planned["counts"]
