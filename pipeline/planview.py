"""`plan`: walk a run's task graph without running or writing anything, and say what is done and why."""

from __future__ import annotations

from typing import TextIO

from luigi.task import flatten

from pipeline import budget, exit_codes
from pipeline.config import ConfigError
from pipeline.run import ConfigDriftError, Run, check_drift, open_run


def _children(task):  # noqa: ANN001, ANN202
    from pipeline.tasks.download import DownloadPart
    from pipeline.tasks.parse import ParsePredictions
    from pipeline.tasks.remote import run_parts

    deps = list(flatten(task.requires()))
    if isinstance(task, ParsePredictions):
        try:
            refs = run_parts(task)[task.trial]
        except (OSError, KeyError):
            refs = []
        deps += [DownloadPart(trial=r.owner, jkey=r.jkey, **task.common()) for r in refs]
    return deps


def render_plan(rid: str, *, root: str = "", config: str = "", stream: TextIO) -> int:
    from pipeline.tasks.report import TrialReport

    try:
        run = open_run(rid, root or None, config or None)
        check_drift(run, config or None)
    except ConfigDriftError as exc:
        print(f"error: {exc}", file=stream)
        return exit_codes.CONFIG_DRIFT
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=stream)
        return exit_codes.CONFIG_INVALID
    source = "frozen effective_config.yaml" if run.frozen else str(run.source)
    print(f"run {rid} at {run.layout.run_dir} (config: {source}); {len(run.trials)} trial(s)", file=stream)
    seen: set[str] = set()
    counts = {"done": 0, "to run": 0}

    def visit(task, depth: int) -> None:  # noqa: ANN001
        if task.task_id in seen:
            return
        seen.add(task.task_id)
        verb, reason = task.status()
        if verb != "skip":
            for dep in _children(task):
                visit(dep, depth + 1)
        state = "done" if verb == "skip" else "to run"
        counts[state] += 1
        print(f"  {state:<7} {task.stage:<10} {task.describe():<55} ({reason})", file=stream)

    visit(TrialReport(rid=rid, root=str(run.layout.root), config=config), 0)
    print(f"{counts['done']} done, {counts['to run']} to run", file=stream)
    for line in budget_lines(run):
        print(line, file=stream)
    return exit_codes.OK


def budget_lines(run: Run) -> list[str]:
    """The cost estimate of the whole run (an upper bound: every request uses its max tokens) against the budget."""
    try:
        plan = budget.plan_estimate(run)
    except (OSError, ValueError, KeyError) as exc:
        return [f"cost estimate unavailable: {exc}"]
    total: budget.Estimate = plan["total"]
    pricing = "batch" if run.cfg.use_batch_api else "standard"
    lines = [f"estimated cost (from the {plan['from']}, {pricing} pricing): at most ${total.usd:,.4f} for "
             f"{total.requests:,} requests, ~{total.prompt_tokens:,} prompt tokens (~{budget.CHARS_PER_TOKEN} chars "
             f"per token) + at most {total.max_completion_tokens:,} completion tokens"]
    lines += [f"  {slug}: ${estimate.usd:,.4f} ({estimate.requests:,} requests)"
              for slug, estimate in plan["by_trial"].items()]
    limit = plan["max_usd"]
    committed = budget.committed_usd(run)
    if limit is None:
        lines.append(f"budget: none set (budget.max_usd); committed so far ${committed:,.4f}")
    else:
        verdict = "fits" if total.usd <= limit else f"EXCEEDS it by ${total.usd - limit:,.4f}: submission stops at the budget"
        lines.append(f"budget: ${limit:,.4f}; committed so far ${committed:,.4f}; the estimate {verdict}")
    return lines
