"""The no-op short-cut: a run verified complete is known complete after one walk, until any of its files changes."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.control import noop_index
from pipeline.control.layout import RunLayout


def finished_run(tmp_path: Path) -> RunLayout:
    layout = RunLayout(tmp_path, "r")
    for rel in ("effective_config.yaml", "a/results/trial_manifest.json", "a/results/t0_control_p01/results.jsonl"):
        path = layout.run_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    (layout.run_dir / ".emulator").mkdir()
    (layout.run_dir / ".emulator" / "state.json").write_text("{}")
    (layout.run_dir / "run_state.json.lock").write_text("")
    noop_index.record(layout, "root-id")
    return layout


def test_an_untouched_run_is_recognised_with_its_file_count(tmp_path: Path) -> None:
    layout = finished_run(tmp_path)
    assert noop_index.unchanged(layout, "root-id") == 3
    assert noop_index.unchanged(layout, "other-root") is None


def test_the_emulator_state_and_lock_files_do_not_count(tmp_path: Path) -> None:
    layout = finished_run(tmp_path)
    (layout.run_dir / ".emulator" / "state.json").write_text('{"more": 1}')
    (layout.run_dir / "run_state.json.lock").write_text("locked")
    assert noop_index.unchanged(layout, "root-id") == 3


def test_any_change_to_the_run_means_the_full_check(tmp_path: Path) -> None:
    layout = finished_run(tmp_path)
    results = layout.run_dir / "a/results/t0_control_p01/results.jsonl"
    st = results.stat()
    os.utime(results, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert noop_index.unchanged(layout, "root-id") is None

    layout = finished_run(tmp_path / "2")
    (layout.run_dir / "a/results/extra.csv").write_text("new")
    assert noop_index.unchanged(layout, "root-id") is None

    layout = finished_run(tmp_path / "3")
    (layout.run_dir / "a/results/trial_manifest.json").unlink()
    assert noop_index.unchanged(layout, "root-id") is None


def test_a_leftover_of_a_killed_writer_means_the_full_check(tmp_path: Path) -> None:
    layout = finished_run(tmp_path)
    (layout.run_dir / "a/results/.predictions.csv.tmp-host-1-x").write_text("half")
    assert noop_index.unchanged(layout, "root-id") is None


def test_a_damaged_index_is_ignored(tmp_path: Path) -> None:
    layout = finished_run(tmp_path)
    (layout.run_dir / noop_index.INDEX_NAME).write_text("{not json")
    assert noop_index.unchanged(layout, "root-id") is None
