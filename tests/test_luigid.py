"""Under a real `luigid` (issue 6): each task runs once, each remote dataset and job is created once, no manifest
update is lost, and `[resources]` caps how many part tasks talk to the provider at once.

One luigid per scenario (its task history in SQLite is the evidence of how often each task ran):
- one `luigi` process with `--workers 4`;
- two `luigi` processes at once on the same run (`--workers 2` each), whose results must equal the first scenario's.
The provider cap is set below the worker count, so the scheduler, not the number of workers, is what limits it.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.control import exit_codes
from pipeline.control.layout import RunLayout
from pipeline.emulator.process import stop_emulator
from pipeline.tasks.download import DownloadPart
from pipeline.tasks.remote import PollJob, SubmitPart, UploadPart
from tests.conftest import PIPELINE_RUN, emulator_calls, small_experiment
from tests.luigid_support import Event, Luigid, luigi_retcode, most_concurrent, runs_per_task
from tests.torture_support import exactly_once_problems, manifest_problems, output_differences, snapshot_outputs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RID = "fleet"
CAP = 2
PROVIDER = "emulator_api"
PART_TASKS = {task.__name__ for task in (UploadPart, SubmitPart, PollJob, DownloadPart)}
TIMEOUT_S = 120
# Luigi's codes for an invocation that leaves while another worker process still runs the rest of the run: its
# summary counts what the other process runs as "run by another worker" (10), "not granted run permission" (25), or,
# for a task it suspended on its dynamic dependencies and the other process resumed, "missing external dependencies".
LEFT_TO_ANOTHER = {luigi_retcode(outcome) for outcome in ("already_running", "not_run", "missing_data")}
_DONE_LINE = re.compile(r"^INFO: \[pid \d+\] Worker Worker\(.*\) done\s+\w+\(", re.MULTILINE)


@dataclass
class Scenario:
    """One run of the pipeline under its own luigid: what each process said, and where the run is."""

    luigid: Luigid
    layout: RunLayout
    codes: list[int]
    logs: list[str]
    calls: dict[str, dict[str, int]]
    statuses: dict[str, str]
    """luigid's status of every task it knows, read before it stopped."""

    def failure(self) -> str:
        """What to show when a check fails: the exit codes and the tail of every process's log and of luigid's."""
        tails = "\n\n".join(f"process {i} (exit {code}):\n{log[-3000:]}" for i, (code, log) in
                             enumerate(zip(self.codes, self.logs, strict=True)))
        return f"exit codes {self.codes}\n{tails}\n\nluigid:\n{self.luigid.log_tail()}"


def run_under_luigid(base: Path, config: Path, *, processes: int, workers: int, extra: tuple[str, ...] = ()) -> Scenario:
    """Start a luigid, run `processes` identical `luigi` invocations at once against it, collect the evidence."""
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    luigid = Luigid(base / "luigid", resources={PROVIDER: CAP})
    layout = RunLayout(base / "experiments", RID)
    luigid.start(env)
    try:
        args = [*PIPELINE_RUN, "TrialReport", "--rid", RID,
                "--root", str(layout.root), "--config", str(config), "--scheduler-host", "127.0.0.1",
                "--scheduler-port", str(luigid.port), "--workers", str(workers), *extra]
        if processes > 1:
            # --no-lock: the invocations are identical, and Luigi's pid lock would turn all but one away at once.
            # --worker-keep-alive: without it a process leaves as soon as luigid has nothing for it right now (the
            # other process holds the provider cap, or runs what its tasks wait for), sometimes leaving the run unfinished.
            args += ["--no-lock", "--worker-keep-alive"]
        # Logs go to files: with pipes read one process after the other, a process whose unread pipe is full blocks
        # while holding tasks the other one (kept alive) waits for.
        outs = [(base / f"process{i}.log").open("w") for i in range(processes)]
        procs = [subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True, env=luigid.env(env), cwd=base)
                 for out in outs]
        try:
            for proc in procs:
                proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
                other.wait()
            raise
        finally:
            for out in outs:
                out.close()
        logs = [(base / f"process{i}.log").read_text() for i in range(processes)]
        calls = emulator_calls(layout.run_dir)
        statuses = {task: str(info["status"]) for task, info in (luigid.task_list() or {}).items()}
        return Scenario(luigid, layout, [p.returncode for p in procs], logs, calls, statuses)
    finally:
        stop_emulator(layout.emulator_dir)
        luigid.stop()


def check_ran_once(scenario: Scenario) -> dict[str, int]:
    """Every task luigid knows is DONE and was started once per its history; each dataset and job was created once
    and is recorded in a trial manifest (no update was lost); the provider cap held. Returns the runs per task id."""
    events = scenario.luigid.history()
    runs = runs_per_task(events)
    assert runs and set(runs) == set(scenario.statuses), scenario.failure()
    assert set(scenario.statuses.values()) == {"DONE"}, scenario.failure()
    assert {task: n for task, n in runs.items() if n != 1} == {}, "each task ran once"
    assert [e for e in events if e.status == "FAILED"] == [], scenario.failure()
    problems = exactly_once_problems(scenario.calls, scenario.layout.run_dir) + manifest_problems(scenario.layout.run_dir)
    assert problems == [], "\n".join(problems)
    assert most_concurrent(events, PART_TASKS) <= CAP, f"[resources] {PROVIDER}={CAP} was exceeded"
    assert scenario.layout.aggregate_report.is_file()
    return runs


def test_history_counts_a_rerun_but_not_a_resumption_and_sees_overlaps() -> None:
    """The evidence can fail: a task started again after DONE, or after its worker vanished, counts twice."""
    history = [Event(task, family, status) for task, family, status in [
        ("parse", "ParsePredictions", "PENDING"), ("parse", "ParsePredictions", "RUNNING"),
        ("parse", "ParsePredictions", "PENDING"),  # suspended on its dynamic dependencies
        ("up1", "UploadPart", "RUNNING"), ("up2", "UploadPart", "RUNNING"), ("up1", "UploadPart", "DONE"),
        ("up2", "UploadPart", "RUNNING"),  # its worker vanished: started again without an end
        ("up2", "UploadPart", "DONE"), ("parse", "ParsePredictions", "RUNNING"), ("parse", "ParsePredictions", "DONE"),
        ("up1", "UploadPart", "PENDING"), ("up1", "UploadPart", "RUNNING"), ("up1", "UploadPart", "DONE")]]
    assert runs_per_task(history) == {"parse": 1, "up1": 2, "up2": 2}
    assert most_concurrent(history, PART_TASKS) == 2


def families(task_ids) -> Counter:  # noqa: ANN001
    """How many tasks of each family (`UploadPart_t0_control_p01_<params>_<hash>` → `UploadPart`)."""
    return Counter(task_id.split("_", 1)[0] for task_id in task_ids)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_experiment(tmp_path_factory.mktemp("luigid_config"), latency_s=0.3)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, config: Path) -> Scenario:
    return run_under_luigid(tmp_path_factory.mktemp("luigid_single"), config, processes=1, workers=4)


def test_four_workers_run_each_task_once_within_the_provider_cap(single: Scenario) -> None:
    assert single.codes == [exit_codes.OK], single.failure()
    check_ran_once(single)
    # Four workers and more part tasks than that ready at once: the cap, not the worker count, is what held them.
    assert most_concurrent(single.luigid.history(), PART_TASKS) == CAP


def test_two_processes_on_one_run_run_each_task_once(tmp_path: Path, config: Path, single: Scenario) -> None:
    both = run_under_luigid(tmp_path, config, processes=2, workers=2)
    # The process that completes the run exits 0; the other one too, unless it left while the rest was running there.
    codes = both.codes
    assert exit_codes.OK in codes and set(codes) <= {exit_codes.OK, *LEFT_TO_ANOTHER}, both.failure()
    runs = check_ran_once(both)
    # Task ids include the run's root (two roots are two runs), so the two scenarios are compared family by family.
    assert families(runs) == families(runs_per_task(single.luigid.history())), "the same tasks as with one process"
    assert all(_DONE_LINE.search(log) for log in both.logs), "both processes ran tasks"
    differences = output_differences(snapshot_outputs(single.layout.run_dir), both.layout.run_dir)
    assert differences == [], "\n".join(differences)


def test_parts_waiting_on_their_jobs_are_pending_not_failed(tmp_path: Path) -> None:
    """Cron mode under luigid: jobs still running leave their parts pending on them; nothing shows as FAILED."""
    slow = small_experiment(tmp_path / "slow", latency_s=3600)
    waiting = run_under_luigid(tmp_path, slow, processes=1, workers=2, extra=("--no-wait",))
    assert waiting.codes == [exit_codes.WAITING], waiting.failure()
    assert "FAILED" not in waiting.statuses.values(), waiting.failure()
    assert [e for e in waiting.luigid.history() if e.status == "FAILED"] == [], waiting.failure()
    pending = families(task for task, status in waiting.statuses.items() if status == "PENDING")
    submitted = families(waiting.statuses)["SubmitPart"]
    assert submitted and pending["PollJob"] == pending["JobRunning"] == submitted, waiting.failure()
    assert "Traceback" not in waiting.logs[0], waiting.failure()
