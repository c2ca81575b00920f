"""`python -m pipeline archive`: a verified, non-destructive bundle of a finished run, recorded as `archived`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.control import exit_codes
from tests.conftest import finished_run, small_experiment

pytestmark = pytest.mark.e2e


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("archive")
    finished_run(base / "exp", small_experiment(base), "arc")
    return {"root": base / "exp", "run_dir": base / "exp" / "run_arc"}


def archive(run: dict[str, Path]) -> dict:
    out = cli("archive", "--rid", "arc", "--root", str(run["root"]), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_an_unfinished_run_is_not_archived(tmp_path: Path) -> None:
    out = cli("archive", "--rid", "nothing-here", "--root", str(tmp_path))
    assert out.returncode == exit_codes.NOT_FINISHED and "not finished" in out.stderr
    assert not (tmp_path / "archives").exists()


def test_archive_holds_every_result_file_with_checksums_and_is_recorded(run: dict[str, Path]) -> None:
    before = {p: p.stat().st_mtime_ns for p in run["run_dir"].rglob("*") if p.is_file() and ".emulator" not in p.parts}
    record = archive(run)
    bundle = Path(record["archive_path"])
    assert bundle.parent == run["root"] / "archives" and bundle.is_file()
    listing = json.loads(Path(record["checksums_path"]).read_text())
    with tarfile.open(bundle) as tar:
        names = {m.name.split("/", 1)[1] for m in tar if m.isfile()}
    assert names == set(listing["files"]) | {"ARCHIVE_MANIFEST.json"}
    assert any(n.endswith("reports/report.html") for n in names) and "aggregate_report.md" in names
    assert not any(n.startswith(".emulator/") or n.endswith(".lock") for n in names)
    manifests = [json.loads(p.read_text()) for p in run["run_dir"].glob("*/results/trial_manifest.json")]
    assert manifests and all(m["stage_status"]["archived"]["status"] == "completed" for m in manifests)
    assert {m["stage_status"]["archived"]["artifacts"]["archive_path"] for m in manifests} == {str(bundle)}
    after = {p: p.stat().st_mtime_ns for p in before if p.exists()}
    bookkeeping = {"trial_manifest.json", ".complete_index.json"}  # the archived stage; the no-op index
    changed = [p for p in before if after.get(p) != before[p] and p.name not in bookkeeping]
    assert not changed, f"archiving is non-destructive: {changed[:3]}"

    again = archive(run)
    assert again["archive_path"] == record["archive_path"], "an unchanged archived run is not archived again"
    status = cli("status", "--rid", "arc", "--root", str(run["root"]), "--json")
    assert json.loads(status.stdout)["archive"] == {"path": str(bundle), "current": True,
                                                    "reason": f"{bundle.name}, {len(listing['files'])} files, "
                                                              "checksums match"}


def test_a_change_or_a_damaged_bundle_means_a_new_bundle_and_the_old_one_stays(run: dict[str, Path]) -> None:
    first = Path(archive(run)["archive_path"])
    (run["run_dir"] / "NOTES.txt").write_text("added after the archive\n")
    status = json.loads(cli("status", "--rid", "arc", "--root", str(run["root"]), "--json").stdout)
    assert status["archive"]["current"] is False and "NOTES.txt is new" in status["archive"]["reason"]
    second = Path(archive(run)["archive_path"])
    assert second != first and first.is_file() and second.is_file()
    with second.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"corrupt!")
    third = Path(archive(run)["archive_path"])
    assert third not in (first, second)


def test_force_with_identical_outputs_keeps_the_archive(run: dict[str, Path]) -> None:
    first = Path(archive(run)["archive_path"])
    bundles = sorted(first.parent.glob("*.tar.gz"))
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    forced = subprocess.run([sys.executable, "-m", "pipeline", "run", "--rid", "arc", "--root", str(run["root"]),
                             "--force"], capture_output=True, text=True, timeout=300, env=env)
    assert forced.returncode == 0, forced.stderr[-3000:]
    again = archive(run)
    assert Path(again["archive_path"]) == first, "nothing the archive holds changed: no new bundle"
    assert sorted(first.parent.glob("*.tar.gz")) == bundles
