"""`python -m pipeline run [TrialReport] --rid X [options]`: run or resume a run, with process control.

The command line is Luigi's (`--trial`, `--config`, `--root`, `--accept-config-drift`, `--force`, `--no-wait`, and
Luigi's own `--workers`, `--scheduler-host`, `--no-lock`, `--worker-keep-alive`, …); the task defaults to
`TrialReport`, the scheduler to the local one unless a `--scheduler-*` option names a luigid.
What this adds to a plain `luigi --module pipeline TrialReport …`, in order:

1. Before anything is written: the config is checked (exit 2 invalid, exit 3 drift refused) by the task's constructor.
2. Luigi takes its process lock (a second identical invocation exits 10 and changes nothing). Then, and only then:
   an accepted config drift is frozen, SIGINT / SIGTERM are turned into a stop request, the session starts (a stop
   request counts from now; failures are recorded for the exit code) and leftovers of killed writers are swept.
3. Luigi runs the graph.
4. The exit code says how the run stands: 0 finished (whichever process ran its tasks), else Luigi's code for a real
   failure, else 4 budget > 75 stopped > 5 waiting. A finished run is recorded in the no-op index and a stop request
   it no longer needs is removed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

import luigi
import luigi.execution_summary as summary
import luigi.interface
import luigi.retcodes
from luigi.cmdline_parser import CmdlineParser

from pipeline.control import console, exit_codes, noop_index, outcome, stop
from pipeline.control.layout import RunLayout
from pipeline.emulator import process as emulator
from pipeline.tasks.download import SCRATCH as DOWNLOAD_SCRATCH
from targets.atomic import sweep_temp_files

log = logging.getLogger("pipeline")
SCRATCH = (DOWNLOAD_SCRATCH,)
REMOTE_SCHEDULER_FLAGS = ("--scheduler-host", "--scheduler-port", "--scheduler-url")


class _Factory(luigi.interface._WorkerSchedulerFactory):
    """Luigi's own factory; creating the worker is the first step after Luigi's process lock is taken."""

    def __init__(self, locked: Callable[[], None]) -> None:
        self._locked = locked

    def create_worker(self, scheduler, worker_processes, assistant=False):  # noqa: ANN001, ANN201 - Luigi's signature
        self._locked()
        return super().create_worker(scheduler, worker_processes, assistant)


def sweep_leftovers(layout: RunLayout) -> None:
    """Remove what writers killed mid-write left behind (their temp files, download scratch); live writers' are kept."""
    for leftover in sweep_temp_files(layout.run_dir, scratch=SCRATCH, exclude=(layout.emulator_dir.name,)):
        log.info("removed leftover %s (from an interrupted write)", layout.rel(leftover))


def install_signal_handlers(layout: RunLayout) -> None:
    """SIGINT / SIGTERM write the stop request instead of killing mid-write; a second signal exits at once."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.stop_requested(layout):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_codes.STOPPED)
        stop.request_stop(layout, signal.Signals(signum).name)
        log.warning("%s: stopping run %s after the current step (signal again to exit at once)",
                    signal.Signals(signum).name, layout.rid)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _luigi_code(worker: luigi.worker.Worker) -> int:
    """The code Luigi's own `luigi` command would exit with (luigi.retcodes.run_with_retcodes)."""
    codes = luigi.retcodes.retcode()
    task_sets = summary._summary_dict(worker)
    root = summary._root_task(worker)
    present = {k for k, v in task_sets.items() if v}
    code = max(c for c, cond in ((0, True), (codes.missing_data, "still_pending_ext" in present),
                                  (codes.task_failed, "failed" in present),
                                  (codes.already_running, "run_by_other_worker" in present),
                                  (codes.scheduling_error, "scheduling_error" in present),
                                  (codes.not_run, "not_run" in present)) if cond)
    if code == 0 and root not in task_sets["completed"] and root not in task_sets["already_done"]:
        return codes.not_run
    return code


def run(argv: list[str]) -> int:
    """Run the task the Luigi command line `argv` names (default `TrialReport`); the process's exit code."""
    args = list(argv)
    if not args or args[0].startswith("-"):
        args = ["TrialReport", *args]
    if not any(a.split("=")[0] in REMOTE_SCHEDULER_FLAGS for a in args) and "--local-scheduler" not in args:
        args.append("--local-scheduler")
    with CmdlineParser.global_instance(args) as parser:
        outcome.control_active(True)
        task = parser.get_task_obj()  # checks the config and exits 2 / 3 before anything is written
        layout: RunLayout = task.layout
        problem = getattr(task, "preflight", lambda: None)()
        if problem:
            log.error("%s", problem)
            return exit_codes.CONFIG_INVALID
        console.install()
        cron = bool(getattr(task, "no_wait", False))

        def locked() -> None:
            accept = getattr(task, "accept_pending_drift", None)
            if accept is not None:
                accept()
            if cron:  # Luigi has set up its logging by now
                console.quiet()
            install_signal_handlers(layout)
            stop.begin_session()
            outcome.begin(layout, wait=not getattr(task, "no_wait", False))
            if not (getattr(task, "indexable", lambda: False)() and noop_index.unchanged(layout, task.task_id, SCRATCH)):
                sweep_leftovers(layout)  # (a run found unchanged since verified has no leftovers: the walk looked)
                if task.run_ctx.cfg.provider.name == "emulator":
                    emulator.take_lease(layout.emulator_dir, os.getpid())
                    leased.append(True)

        leased: list[bool] = []
        try:
            result = luigi.interface._schedule_and_run([task], _Factory(locked))
            return finish(task, layout, result.worker, cron)
        except luigi.interface.PidLockAlreadyTakenExit:
            log.warning("run %s: the same command is already running (Luigi's process lock); nothing was changed "
                        "(exit %d)", task.rid, exit_codes.LOCKED)
            return exit_codes.LOCKED
        finally:
            if leased:  # the emulator a run started ends with it (unless another run still uses it)
                emulator.release(layout.emulator_dir, os.getpid())


def finish(task: luigi.Task, layout: RunLayout, worker: luigi.worker.Worker, cron: bool) -> int:
    """The invocation's exit code; a finished run is indexed for the no-op short-cut and its stop request removed.
    Expected conditions are reported in one line each; in cron mode, also what ran."""
    kinds = outcome.collect(layout)
    if noop_index.confirmed(layout, task.task_id):  # complete before the graph, per the index: nothing ran
        stop.clear_stop(layout)
        return exit_codes.OK
    if cron:
        log.warning("run %s: %s", layout.rid, console.ran_line(worker))
    if task.complete():
        if getattr(task, "indexable", lambda: False)():
            noop_index.record(layout, task.task_id, SCRATCH)
        stop.clear_stop(layout)
        if cron:
            log.warning("run %s finished (exit 0)", layout.rid)
        return exit_codes.OK
    for line in console.outcome_lines(kinds):
        log.warning("run %s %s", layout.rid, line)
    code = outcome.exit_code(set(kinds), stop.stop_requested(layout))
    if code is None:
        return _luigi_code(worker)
    log.warning("run %s %s (exit %d)", layout.rid, outcome.MESSAGES[code], code)
    return code
