"""Each stage's done predicate: done, missing, truncated, stale input — through the tasks' public targets."""

from __future__ import annotations

import json
from pathlib import Path

import luigi
import pytest

from pipeline import (
    BuildBatches,
    ComputeStats,
    DownloadPart,
    ParsePredictions,
    PrepareData,
    ScorePredictions,
    SummarizeCosts,
    TrialReport,
)
from pipeline.tasks.remote import run_parts
from tests.conftest import small_experiment

RID = "pred"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("pred")
    config = small_experiment(base)
    common = {"rid": RID, "root": str(base / "experiments"), "config": str(config)}
    assert luigi.build([TrialReport(**common)], local_scheduler=True, log_level="WARNING")
    run_dir = base / "experiments" / f"run_{RID}"
    trial = sorted(p.parent.parent.name for p in run_dir.glob("*/results/trial_manifest.json"))[0]
    return {"common": common, "run_dir": run_dir, "trial": trial}


def restore(path: Path):  # noqa: ANN201
    """Context: keep a copy of `path` and put it back afterwards, so tests stay independent."""
    import contextlib

    @contextlib.contextmanager
    def keep():
        saved = path.read_bytes()
        try:
            yield path
        finally:
            path.write_bytes(saved)
    return keep()


def trial_tasks(finished: dict) -> dict[str, luigi.Task]:
    c, t = finished["common"], finished["trial"]
    return {"parsed": ParsePredictions(trial=t, **c), "scored": ScorePredictions(trial=t, **c),
            "stats": ComputeStats(trial=t, **c), "costs": SummarizeCosts(trial=t, **c),
            "report": TrialReport(trial=t, **c)}


ARTIFACTS = {"parsed": "results/predictions.csv", "scored": "results/per_item_scores.csv",
             "stats": "results/significance.json", "costs": "results/costs.json", "report": "reports/report.md"}
UPSTREAM = {"scored": "parsed", "stats": "scored", "costs": "parsed", "report": "stats"}


def test_everything_done_after_a_run(finished: dict) -> None:
    tasks = trial_tasks(finished)
    assert all(task.complete() for task in tasks.values())
    assert PrepareData(**finished["common"]).complete()
    assert TrialReport(**finished["common"]).complete()


@pytest.mark.parametrize("stage", list(ARTIFACTS))
def test_missing_artifact_is_not_done(finished: dict, stage: str) -> None:
    path = finished["run_dir"] / finished["trial"] / ARTIFACTS[stage]
    with restore(path):
        path.unlink()
        target = trial_tasks(finished)[stage].output()
        assert not target.exists()
        assert "missing" in target.reason
    assert trial_tasks(finished)[stage].output().exists()


@pytest.mark.parametrize("stage", list(ARTIFACTS))
def test_truncated_artifact_is_not_done(finished: dict, stage: str) -> None:
    path = finished["run_dir"] / finished["trial"] / ARTIFACTS[stage]
    with restore(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        target = trial_tasks(finished)[stage].output()
        assert not target.exists()
        assert "changed" in target.reason


@pytest.mark.parametrize("stage", list(UPSTREAM))
def test_stale_input_is_not_done(finished: dict, stage: str) -> None:
    upstream = finished["run_dir"] / finished["trial"] / ARTIFACTS[UPSTREAM[stage]]
    with restore(upstream):
        upstream.write_bytes(upstream.read_bytes() + b"\n")
        task = trial_tasks(finished)[stage]
        assert not task.complete()
        assert not trial_tasks(finished)["report"].complete()


def part_of(finished: dict) -> DownloadPart:
    task = ParsePredictions(trial=finished["trial"], **finished["common"])
    ref = run_parts(task)[finished["trial"]][0]
    return DownloadPart(trial=ref.owner, jkey=ref.jkey, **finished["common"])


def test_download_predicate_accepts_only_the_recorded_results(finished: dict) -> None:
    """Results are done only as recorded for the current requests: any change to the file (truncated, a foreign
    line, broken JSON) or its absence makes the part not done; restoring the recorded bytes makes it done again."""
    part = part_of(finished)
    results = finished["run_dir"] / part.trial / "results" / part.jkey / "results.jsonl"
    assert part.output().exists()
    with restore(results):
        lines = results.read_text().splitlines()
        for damaged in ("\n".join(lines[:-1]) + "\n",
                        results.read_text() + '{"custom_id": "x|y|control|0.0|0|open", "response": {}}\n',
                        '{"custom_id": '):
            results.write_text(damaged)
            target = part.output()
            assert not target.exists() and "changed since it was downloaded" in target.reason
        results.unlink()
        target = part.output()
        assert not target.exists() and "missing" in target.reason
    assert part.output().exists()


def test_edited_part_is_not_downloaded_and_parse_is_stale(finished: dict) -> None:
    part = part_of(finished)
    results = finished["run_dir"] / part.trial / "results" / part.jkey / "results.jsonl"
    with restore(results):
        rows = [json.loads(line) for line in results.read_text().splitlines()]
        rows[0]["response"]["choices"][0]["message"]["content"] = "edited"
        results.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert not part.output().exists()
        parse = ParsePredictions(trial=finished["trial"], **finished["common"]).output()
        assert not parse.exists() and "changed since parsing" in parse.reason


def test_build_predicate_notices_changed_shard_and_prompt(finished: dict) -> None:
    build = BuildBatches(prompt_set="excellence", temp=0.0, **finished["common"])
    assert build.output().exists()
    shard = finished["run_dir"] / "batch_inputs" / "t0_excellence_control.p01.jsonl"
    with restore(shard):
        shard.write_text("")
        assert not build.output().exists()
    prompt = finished["run_dir"] / "prompts" / "excellence.treatment.txt"
    with restore(prompt):
        prompt.write_text("changed")
        target = build.output()
        assert not target.exists() and "changed since the build" in target.reason


def test_prepared_predicate_notices_tampering(finished: dict) -> None:
    prepared = finished["run_dir"] / "prepared" / "open_book.jsonl"
    with restore(prepared):
        prepared.write_text(prepared.read_text().replace("Lake", "Loch"))
        assert not PrepareData(**finished["common"]).output().exists()


def test_corrupt_manifest_means_not_done_not_a_crash(finished: dict) -> None:
    manifest = finished["run_dir"] / finished["trial"] / "results" / "trial_manifest.json"
    with restore(manifest):
        manifest.write_text('{"schema_version": 2, "run_id": ')
        target = trial_tasks(finished)["parsed"].output()
        assert not target.exists()
        manifest.write_text(json.dumps({"schema_version": 2, "run_id": RID, "trial": {}, "temps": "x",
                                        "samples_per_item": {}}))
        target = trial_tasks(finished)["stats"].output()
        assert not target.exists()
    assert sorted(p.name for p in manifest.parent.iterdir() if ".corrupt." in p.name) == [], "reading never writes"
