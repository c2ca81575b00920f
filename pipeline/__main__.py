"""`python -m pipeline <command>`: run a run, and the views and tools around the Luigi graph.

- `run --rid X [--trial SLUG] [--config PATH] [--root DIR] [--accept-config-drift] [--force] [--no-wait] [Luigi's
  options: --workers N, --local-scheduler, --scheduler-host H, --no-lock, …]`: run or resume the run (`TrialReport`),
  with process control: signals become a stop request, cron exit codes (`pipeline.control.runner`).

- `plan --rid X [--config PATH] [--root DIR] [--json]`: read-only; every task of the run as done / to run, with the
  reason, and the run's cost estimate against its budget.
- `status --rid X [--root DIR] [--json]`: read-only; each trial's stages, parts by job state, cost so far, what blocks it.
- `list [--root DIR] [--json]`: read-only; the runs under the root with their status, age and cost.
- `compare --rid A --rid B [--root DIR] [--json]`: read-only; two runs' metrics and deltas side by side.
- `archive --rid X [--root DIR] [--out DIR] [--json]`: a verified archive bundle of a finished run (non-destructive).
- `stop --rid X [--root DIR]`: ask a running run to stop submitting, save its state and exit (code 75).
- `emulator --port P --state-dir D [--latency S] [--answer-key DIR] [--host H --allow-remote]`: the offline
  Fireworks-compatible server (loopback only unless `--allow-remote`).
- `prepare-data --out DIR [--squad-v2 F] [--triviaqa F] [--nq-open F] [--max-items ...]`: prepared files from the
  published dataset formats.

`luigi --module pipeline TrialReport --rid X --local-scheduler` runs the same graph as plain Luigi (Luigi's exit codes,
no signal handling; `--no-wait` and `--accept-config-drift` need `run`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pipeline.control import exit_codes


def _plan(args: argparse.Namespace) -> int:
    from pipeline.views.plan import render_plan

    return render_plan(args.rid, root=args.root, config=args.config, stream=sys.stdout, as_json=args.json)


def _compare(args: argparse.Namespace) -> int:
    import json

    from pipeline.views.compare import compare_runs, render_comparison

    if len(args.rid) != 2:
        print("error: compare takes exactly two runs: --rid A --rid B", file=sys.stderr)
        return exit_codes.CONFIG_INVALID
    try:
        view = compare_runs(args.rid[0], args.rid[1], args.root or None)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_INVALID
    sys.stdout.write(json.dumps(view, indent=2) + "\n" if args.json else render_comparison(view))
    return exit_codes.OK


def _archive(args: argparse.Namespace) -> int:
    import json

    import luigi

    from pipeline.control.run import resolve_root
    from pipeline.tasks.archive import ArchiveRun
    from pipeline.tasks.report import TrialReport

    common = {"rid": args.rid, "root": str(resolve_root(args.root or None))}
    try:
        report = TrialReport(**common)
        finished = report.complete()
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_INVALID
    if not finished:
        print(f"error: run {args.rid} is not finished (its reports are not current): nothing archived. Run "
              f"`luigi --module pipeline TrialReport --rid {args.rid} --local-scheduler` first, or see "
              f"`python -m pipeline status --rid {args.rid}`", file=sys.stderr)
        return exit_codes.NOT_FINISHED
    task = ArchiveRun(out=args.out, **common)
    if not luigi.build([task], local_scheduler=True, log_level="WARNING") or not task.complete():
        print(f"error: archiving run {args.rid} failed (see the log above)", file=sys.stderr)
        return exit_codes.FAILED
    record = task.records()[0] or {}
    if args.json:
        print(json.dumps({key: record.get(key) for key in ("archive_path", "sha256", "files", "bytes", "checksums_path")},
                         indent=2))
    else:
        print(f"archive of run {args.rid}: {record.get('archive_path')} ({record.get('files')} files, "
              f"{record.get('bytes', 0):,} bytes, sha256 {str(record.get('sha256'))[:12]}; checksums in "
              f"{record.get('checksums_path')})")
    return exit_codes.OK


def _stop(args: argparse.Namespace) -> int:
    from pipeline.control.layout import RunLayout, check_rid
    from pipeline.control.run import resolve_root
    from pipeline.control.stop import request_stop

    layout = RunLayout(resolve_root(args.root or None), check_rid(args.rid))
    if not layout.run_dir.exists():
        print(f"error: no run {args.rid} under {layout.root}", file=sys.stderr)
        return exit_codes.CONFIG_INVALID
    request_stop(layout, "python -m pipeline stop")
    print(f"stop requested for run {args.rid} ({layout.stop_file}); the running process sends nothing new, "
          f"saves its state and exits with code {exit_codes.STOPPED}")
    return exit_codes.OK


def _emulator(argv: list[str]) -> int:
    from pipeline.emulator.server import main

    return main(argv)


def _prepare(args: argparse.Namespace) -> int:
    from pipeline.data.loaders import prepare_from_sources

    summary = prepare_from_sources(squad_v2=args.squad_v2, triviaqa=args.triviaqa, nq_open=args.nq_open,
                                   out_dir=args.out, seed=args.seed, open_book_max_items=args.open_book_max_items,
                                   triviaqa_max_items=args.triviaqa_max_items, nq_open_max_items=args.nq_open_max_items)
    for kind, info in summary.items():
        print(f"{kind}: {info['items']} items, sha256 {info['sha256'][:12]}")
    return exit_codes.OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        from pipeline.control.runner import run

        return run(argv[1:])
    if argv[:1] == ["emulator"]:  # a server must survive clients that hang up: keep Python's SIGPIPE handling
        return _emulator(argv[1:])
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `plan | head` ends quietly
    if argv[:1] in (["status"], ["list"]):
        from pipeline.views.status import list_command, status_command

        return (status_command if argv[0] == "status" else list_command)(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="read-only: what would run and why")
    plan.add_argument("--rid", required=True)
    plan.add_argument("--config", default="", help="experiment config (default: the run's frozen one, else "
                                                   "config/experiment.yaml)")
    plan.add_argument("--root", default="", help="experiments root (default ./experiments)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_plan)
    compare = sub.add_parser("compare", help="read-only: two runs' metrics and deltas side by side")
    compare.add_argument("--rid", action="append", required=True, help="give twice: --rid A --rid B")
    compare.add_argument("--root", default="", help="experiments root (default ./experiments)")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")
    compare.set_defaults(func=_compare)
    archive = sub.add_parser("archive", help="a verified, non-destructive archive bundle of a finished run")
    archive.add_argument("--rid", required=True)
    archive.add_argument("--root", default="", help="experiments root (default ./experiments)")
    archive.add_argument("--out", default="", help="where bundles go (default <root>/archives)")
    archive.add_argument("--json", action="store_true", help="print the archive record as JSON")
    archive.set_defaults(func=_archive)
    sub.add_parser("run", help="run or resume a run (TrialReport) with process control (see `python -m pipeline run "
                   "--help`)")
    sub.add_parser("status", help="read-only: a run's trials, stages, parts and cost (--rid X [--json])")
    sub.add_parser("list", help="read-only: every run under the root (--json)")
    stop = sub.add_parser("stop", help="ask a running run to stop submitting, save its state and exit")
    stop.add_argument("--rid", required=True)
    stop.add_argument("--root", default="", help="experiments root (default ./experiments)")
    stop.set_defaults(func=_stop)
    sub.add_parser("emulator", help="run the offline Fireworks emulator (see `python -m pipeline emulator --help`)")
    prep = sub.add_parser("prepare-data", help="write open_book.jsonl / closed_book.jsonl from published datasets")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--squad-v2", type=Path, help="SQuAD v2 official JSON or HF JSON lines")
    prep.add_argument("--triviaqa", type=Path, help="TriviaQA rc.nocontext (HF rows or unfiltered JSON)")
    prep.add_argument("--nq-open", type=Path, help="NQ-Open JSON lines")
    prep.add_argument("--seed", type=int, default=2025)
    prep.add_argument("--open-book-max-items", type=int)
    prep.add_argument("--triviaqa-max-items", type=int)
    prep.add_argument("--nq-open-max-items", type=int)
    prep.set_defaults(func=_prepare)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
