"""`plan`: walk a run's task graph without running or writing anything, and say what is done and why."""

from __future__ import annotations

import json
from typing import Any, TextIO

from luigi.task import flatten

from pipeline import budget
from pipeline.control import exit_codes
from pipeline.control.config import ConfigError
from pipeline.control.run import Run, config_drift, open_run, previewing
from pipeline.pricing import unlisted_message, unlisted_models


def children(task):  # noqa: ANN001, ANN202
    """A task's upstream tasks, the parts ParsePredictions reads (dynamic dependencies in a run) included."""
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


def render_plan(rid: str, *, root: str = "", config: str = "", stream: TextIO, as_json: bool = False) -> int:
    """What a run would do now, read-only; with a `config` that differs from the frozen one, what accepting it
    (`--accept-config-drift`) would re-run and cost, without accepting it."""
    try:
        run = open_run(rid, root or None, config or None)
        drift = config_drift(run, config or None)
        if not drift:
            return _render(run, rid, config, [], stream, as_json)
        with previewing(run, config) as preview:
            return _render(preview, rid, config, drift, stream, as_json)
    except (ConfigError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}) if as_json else f"error: {exc}", file=stream)
        return exit_codes.CONFIG_INVALID


def _render(run: Run, rid: str, config: str, drift: list[str], stream: TextIO, as_json: bool) -> int:
    from pipeline.tasks.report import TrialReport

    source = "frozen effective_config.yaml" if run.frozen and not drift else str(run.source)
    seen: set[str] = set()
    tasks: list[dict[str, str]] = []

    def visit(task) -> None:  # noqa: ANN001
        if task.task_id in seen:
            return
        seen.add(task.task_id)
        verb, reason = task.status()
        if verb != "skip":
            for dep in children(task):
                visit(dep)
        tasks.append({"state": "done" if verb == "skip" else "to run", "stage": task.stage, "task": task.describe(),
                      "reason": reason})

    visit(TrialReport(rid=rid, root=str(run.layout.root), config=config))
    counts = {state: sum(1 for t in tasks if t["state"] == state) for state in ("done", "to run")}
    if as_json:
        print(json.dumps({"rid": rid, "run_dir": str(run.layout.run_dir), "config": source, "trials": len(run.trials),
                          "drift": drift, "tasks": tasks, "counts": counts, "cost": budget_summary(run),
                          "warnings": model_warnings(run)}, indent=2), file=stream)
        return exit_codes.OK
    print(f"run {rid} at {run.layout.run_dir} (config: {source}); {len(run.trials)} trial(s)", file=stream)
    if drift:
        print(f"PREVIEW: {config} differs from the run's frozen config in {len(drift)} key(s); nothing is accepted or "
              "written. What `--accept-config-drift` would run (at most: a stage whose inputs come out byte-identical "
              "is skipped then):", file=stream)
        for key in drift[:20]:
            print(f"  {key}", file=stream)
    for t in tasks:
        print(f"  {t['state']:<7} {t['stage']:<10} {t['task']:<55} ({t['reason']})", file=stream)
    print(f"{counts['done']} done, {counts['to run']} to run", file=stream)
    for line in budget_lines(run):
        print(line, file=stream)
    for line in model_warnings(run):
        print(line, file=stream)
    return exit_codes.OK


def model_warnings(run: Run) -> list[str]:
    """A warning for models the pricing table does not list (the runner refuses them unless allowed)."""
    unlisted = unlisted_models(run.cfg, {t.model_id for t in run.trials})
    if not unlisted:
        return []
    verdict = "allowed by pricing.allow_unlisted_models" if run.cfg.pricing.allow_unlisted_models else \
        "the run refuses them (exit 2)"
    return [f"warning: {unlisted_message(run.cfg, unlisted)}; {verdict}"]


def budget_summary(run: Run) -> dict[str, Any]:
    """The cost estimate, the budget and the money committed so far, as plain data."""
    try:
        plan = budget.plan_estimate(run)
    except (OSError, ValueError, KeyError) as exc:
        return {"error": f"cost estimate unavailable: {exc}"}
    return {"estimate_from": plan["from"], "prompt_rate": plan["prompt_rate"], "estimate_usd": plan["total"].usd,
            "requests": plan["total"].requests,
            "prompt_tokens": plan["total"].prompt_tokens,
            "max_completion_tokens": plan["total"].max_completion_tokens,
            "by_trial_usd": {slug: e.usd for slug, e in plan["by_trial"].items()},
            "max_usd": plan["max_usd"], "committed_usd": budget.committed_usd(run)}


def budget_lines(run: Run) -> list[str]:
    """The cost estimate of the whole run (an upper bound: every request uses its max tokens) against the budget."""
    cost = budget_summary(run)
    if "error" in cost:
        return [str(cost["error"])]
    pricing = "batch" if run.cfg.use_batch_api else "standard"
    lines = [f"estimated cost (from the {cost['estimate_from']}, {pricing} pricing): at most ${cost['estimate_usd']:,.4f} "
             f"for {cost['requests']:,} requests, ~{cost['prompt_tokens']:,} prompt tokens (~{budget.CHARS_PER_TOKEN} "
             f"chars per token, at the {cost['prompt_rate']}) + at most {cost['max_completion_tokens']:,} completion "
             "tokens"]
    lines += [f"  {slug}: ${usd:,.4f}" for slug, usd in cost["by_trial_usd"].items()]
    limit, committed, total = cost["max_usd"], cost["committed_usd"], cost["estimate_usd"]
    if limit is None:
        lines.append(f"budget: none set (budget.max_usd); committed so far ${committed:,.4f}")
    else:
        verdict = "fits" if total <= limit else f"EXCEEDS it by ${total - limit:,.4f}: submission stops at the budget"
        lines.append(f"budget: ${limit:,.4f}; committed so far ${committed:,.4f}; the estimate {verdict}")
    return lines


def first_cause(task) -> str:  # noqa: ANN001
    """Why `task` is not done, at its source: the most upstream not-done task (its own predicate's reason)."""
    for dep in children(task):
        if not dep.complete():
            return first_cause(dep)
    return f"{task.stage} {task.describe()}: {task.status()[1]}"
