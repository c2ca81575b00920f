"""Crash torture: SIGKILL one run of the default experiment 50+ times, resume it each time, and prove that it
creates every remote job exactly once and ends with the same bytes as an uninterrupted run.

Scheme
1. Reference: the default experiment (`config/experiment.yaml`, changed only in operational knobs: provider
   `fireworks` pointed at the emulator, poll interval, resample counts) runs uninterrupted under rid `torture`, in
   its own root, against its own emulator process. Its `PIPELINE_CRASH_LOG` gives the crash-point sequence of a
   whole run (about 1,000 points), each labelled with a phase by `label_points`; the bytes of `predictions.csv`,
   `per_item_scores.csv`, `significance.json` and `costs.json` of every trial are kept.
2. Torture: the same rid in a fresh root, against a fresh emulator process (`python -m pipeline.emulator --port 0`,
   reached through `FIREWORKS_BASE_URL`). ONE run is killed again and again until an invocation finishes by itself:
   - an invocation gets `PIPELINE_CRASH_AT = r + s`: `r` is the number of points the previous invocation had passed in
     the task it died in (a re-run passes them again) and `s` a seeded random step. Until one part is left to
     download (counted on disk) `s` is 2 plus a step that spreads the kills still wanted (`KillPlan.body_kills`) over
     the points still to pass (estimated from the reference) and never reaches past the parts left; from then on,
     through the last download, parse, score, stats, costs and report, `s` is 1..`tail_max_step`: with 4, every task
     there gets hit (each writes two files at least, two points each);
   - a few invocations, at seeded positions in the first two thirds, run without a crash point and are SIGKILLed by
     the test after a seeded delay, which lands between instrumented points (startup, HTTP calls, scoring, stats);
   - every kill is labelled with the phase of the point it died at, read from its own crash log;
   - after every invocation the emulator's create counters are checked, so a duplicate create is blamed on the kill
     just before it, and any exit other than our SIGKILL or 0 is reported with its log.
   The seed is fixed (override with `TORTURE_SEED`) and printed with every kill. Luigi's order among equal-priority
   tasks and the number of polls vary from run to run, so a replay is close to, not identical with, the original.
3. After the final invocation (exit 0): each part's job and input dataset were created exactly once and nothing else
   was (`GET /emulator/calls` against the trial manifests' `parts`), the four files of every trial are byte-identical
   to the reference, every manifest validates with its pydantic model, no atomic-writer temp file or non-empty
   download scratch directory is left under the root (the next invocation sweeps what dead writers left), and
   `plan` finds nothing to run.
4. The same, with fewer kills, while the emulator injects a moderate fault plan (429 / 503 with Retry-After 0 on
   creates, uploads and job GETs, job creates that commit and then drop the connection, duplicated result lines,
   one truncated download). None of these faults may change a result or require a second job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.torture_support import (
    COMPARED_FILES,
    PHASES,
    EmulatorProcess,
    KillPlan,
    Runner,
    TortureResult,
    end_state_checks,
    failed_checks,
    leftovers,
    snapshot_outputs,
    torture,
    write_config,
)

pytestmark = [pytest.mark.torture, pytest.mark.slow]
RID = "torture"
SEED = int(os.environ.get("TORTURE_SEED", "20251124"))

FAULT_PLAN: list[dict[str, Any]] = [
    {"fault": "status", "status": 429, "retry_after": 0, "match": r"/datasets$", "method": "POST", "times": 3},
    {"fault": "status", "status": 429, "retry_after": 0, "match": r":upload$", "method": "POST", "times": 2, "after": 1},
    {"fault": "status", "status": 503, "retry_after": 0, "match": r"/batchInferenceJobs$", "method": "POST", "times": 2,
     "after": 1},
    {"fault": "drop_after_commit", "match": "batchInferenceJobs", "method": "POST", "times": 3},
    {"fault": "status", "status": 503, "retry_after": 0, "match": r"/batchInferenceJobs/", "method": "GET", "times": 4,
     "after": 3},
    {"fault": "status", "status": 429, "retry_after": 0, "match": r"/datasets/[^/]+$", "method": "GET", "times": 3,
     "after": 5},
    {"fault": "duplicate_lines", "identical": True, "match": r"-p0[24]-", "times": 0},
    {"fault": "truncated", "match": r"-t07-cont-p01-", "times": 1},
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("torture")
    (base / "shared").mkdir()
    config = write_config(base / "shared")
    with EmulatorProcess(base / "reference-emulator") as emulator:
        runner = Runner(rid=RID, root=base / "reference", config=config, base_url=emulator.base_url,
                        logs=base / "reference-logs")
        run = runner.run()
    if run.returncode != 0:
        pytest.fail(f"the uninterrupted reference run failed with {run.returncode}:\n{run.tail(40)}")
    outputs = snapshot_outputs(runner.run_dir)
    assert len(outputs) == 2 * len(COMPARED_FILES), sorted(outputs)
    print(f"\nreference run: {len(run.points)} crash points, {run.seconds:.1f} s")
    return {"base": base, "config": config, "points": run.points, "outputs": outputs}


def torture_run(reference: dict[str, Any], name: str, plan: KillPlan,
                faults: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A complete tortured run in a fresh root against a fresh emulator; every check's problems, by check."""
    base: Path = reference["base"]
    with EmulatorProcess(base / f"{name}-emulator") as emulator:
        if faults is not None and emulator.set_faults(faults) is None:
            pytest.skip("the emulator has no fault API yet (POST /emulator/faults answered 404)")
        runner = Runner(rid=RID, root=base / name, config=reference["config"], base_url=emulator.base_url,
                        logs=base / f"{name}-logs")
        result = torture(runner, reference["points"], plan, emulator.calls)
        calls = emulator.calls()
        fault_view = emulator.faults() if faults is not None else {}
    jobs = calls.get("job_creates", {})
    print(f"\n[{name}] {result.summary()}\n[{name}] jobs created: {len(jobs)} ({sum(jobs.values())} create calls), "
          f"datasets created: {len(calls.get('dataset_creates', {}))}, "
          f"409 conflicts: {sum(calls.get('job_create_conflicts', {}).values())} job / "
          f"{sum(calls.get('dataset_create_conflicts', {}).values())} dataset")
    checks = end_state_checks(runner, result, reference["outputs"], calls)
    return {"result": result, "checks": checks, "faults": fault_view, "runner": runner}


def failures(outcome: dict[str, Any], *, known: tuple[str, ...] = ()) -> str:
    return failed_checks(outcome["checks"], known=known)


def uncovered_phases(result: TortureResult) -> list[str]:
    counts = result.phase_counts()
    return [phase for phase in PHASES if not counts.get(phase)]


@pytest.fixture(scope="module")
def tortured(reference: dict[str, Any]) -> dict[str, Any]:
    print(f"\ntorture seed {SEED} (set TORTURE_SEED to replay another)")
    return torture_run(reference, "torture", KillPlan(seed=SEED, body_kills=56, tail_max_step=4, parent_kills=6))


def test_kill_nine_at_fifty_points_then_resume_is_exactly_once_and_identical(tortured: dict[str, Any]) -> None:
    result: TortureResult = tortured["result"]
    assert not failures(tortured), f"{failures(tortured)}\n\n{result.summary()}"
    assert len(result.kills) >= 50, result.summary()
    assert sum(1 for k in result.kills if k.kind == "parent-kill") >= 3, result.summary()
    assert not uncovered_phases(result), f"no kill in {uncovered_phases(result)}\n{result.summary()}"


def test_a_kill_just_before_the_final_sweep_leaves_no_temp_files_behind(tortured: dict[str, Any]) -> None:
    """The window the torture rarely hits: a temp file left by an earlier kill, then a kill after the aggregate report
    is recorded but before the sweep. `--force` re-runs the reports, so the window comes round again."""
    runner: Runner = tortured["runner"]
    if tortured["result"].final.returncode != 0:
        pytest.skip("the tortured run did not complete")
    counted = runner.run(extra=("--force",))
    assert counted.returncode == 0 and counted.points[-1] == "after replace run_state.json", counted.tail()
    first_write = counted.points.index("before replace report.md") + 1
    assert runner.run(crash_at=first_write, extra=("--force",)).killed
    assert leftovers(runner.root), "a kill before os.replace leaves the writer's temp file"
    assert runner.run(crash_at=len(counted.points), extra=("--force",)).killed
    final = runner.run()
    assert final.returncode == 0, final.tail()
    assert not leftovers(runner.root)


def test_kill_nine_under_provider_faults_is_exactly_once_and_identical(reference: dict[str, Any]) -> None:
    print(f"\ntorture seed {SEED + 1} with faults")
    outcome = torture_run(reference, "faults", KillPlan(seed=SEED + 1, body_kills=14, tail_max_step=8, parent_kills=2),
                          faults=FAULT_PLAN)
    result: TortureResult = outcome["result"]
    assert not failures(outcome), f"{failures(outcome)}\n\n{result.summary()}"
    assert len(result.kills) >= 15, result.summary()
    idle = [rule for rule in outcome["faults"].get("rules", []) if not rule.get("fired")]
    assert not idle, f"fault rules that never fired (the plan does not exercise them): {idle}"
