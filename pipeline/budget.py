"""The run's budget (`budget.max_usd`): an upper-bound estimate per part, and the check before every submission.

Estimate of one part = its requests' prompt tokens (characters / 4, plus a few per message: no tokenizer is
needed and the figure errs high for English) at the input rate, plus every request using its full `maxTokens`
at the output rate, with the rates `costs.json` uses (batch pricing when `use_batch_api`). Real usage is lower;
the estimate is what a submission *commits* until the results are in.

Committed money = the estimate of every generation of every part that was sent (state `submitting` or later,
plus each earlier generation in its history). A submission is refused, before anything is sent, when the committed
money plus this part's estimate would pass the budget; the check and the write-ahead `submitting` record happen
under one run-wide lock, so concurrent workers cannot both squeeze under the limit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from pipeline.outcome import BudgetExceeded
from pipeline.pricing import pricing_args, resolve_rates
from pipeline.run import Run
from targets import store
from targets.manifest import PartRecord, TrialManifest

if TYPE_CHECKING:
    from pipeline.plan import PartRef

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
SENT = {"submitting", "submitted", "running", "completed", "failed", "expired", "cancelled"}


@dataclass(frozen=True)
class Estimate:
    requests: int
    prompt_tokens: int
    max_completion_tokens: int
    usd: float

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.requests + other.requests, self.prompt_tokens + other.prompt_tokens,
                        self.max_completion_tokens + other.max_completion_tokens, round(self.usd + other.usd, 6))


NOTHING = Estimate(0, 0, 0, 0.0)


def request_tokens(line: str) -> int:
    """Estimated prompt tokens of one request line (`{"custom_id", "body": {"messages": [...]}}`)."""
    messages = json.loads(line)["body"]["messages"]
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages)


def estimate_lines(lines: Iterable[str], *, max_tokens: int, rates: dict[str, Any]) -> Estimate:
    requests = prompt = 0
    for line in lines:
        if line.strip():
            requests += 1
            prompt += request_tokens(line)
    completion = requests * max_tokens
    usd = prompt / 1e6 * rates["input_rate_per_mtok"] + completion / 1e6 * rates["output_rate_per_mtok"]
    return Estimate(requests, prompt, completion, round(usd, 6))


def part_rates(run: Run, model: str) -> dict[str, Any]:
    return resolve_rates(**pricing_args(run.cfg, model))


def estimate_part(run: Run, ref: PartRef) -> Estimate:
    """The estimate of one generation of a built part (read from its request file)."""
    with open(ref.path, encoding="utf-8") as lines:
        return estimate_lines(lines, max_tokens=int(ref.inference_parameters["maxTokens"]),
                              rates=part_rates(run, ref.model))


def sent_estimate(run: Run, record: PartRecord) -> float:
    """Committed money of one part: its estimate times the generations that were sent."""
    generations = len(record.history) + (1 if record.state in SENT else 0)
    if not generations:
        return 0.0
    per_generation = record.estimated_usd
    if per_generation is None:  # recorded before estimates were kept: estimate from its request file
        try:
            with open(run.layout.run_dir / record.input_path, encoding="utf-8") as lines:
                per_generation = estimate_lines(lines, max_tokens=int(record.inference_parameters.get("maxTokens", 0)),
                                                rates=part_rates(run, record.model)).usd
        except (OSError, ValueError, KeyError):
            per_generation = 0.0
    return per_generation * generations


def committed_usd(run: Run) -> float:
    """Money committed by every part of the run that was sent."""
    total = 0.0
    for trial in run.trials:
        manifest = _manifest(run, trial.slug)
        for record in manifest.parts.values() if manifest else ():
            total += sent_estimate(run, record)
    return round(total, 6)


def spent_usd(run: Run) -> float | None:
    """Money priced from downloaded results so far (each trial's costs.json); None when no trial has one."""
    spent = None
    for trial in run.trials:
        path = run.layout.costs(trial.slug)
        try:
            usd = float(json.loads(path.read_text(encoding="utf-8"))["usd"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        spent = (spent or 0.0) + usd
    return None if spent is None else round(spent, 6)


def summary(run: Run) -> dict[str, Any]:
    """What `status` shows: the budget, money committed by sent parts, money spent per the priced results."""
    return {"max_usd": run.cfg.budget.max_usd, "committed_usd": committed_usd(run), "spent_usd": spent_usd(run)}


def reserve(run: Run, ref: PartRef, record: PartRecord, save: Any) -> None:
    """Record the write-ahead `submitting` state of a part, refusing first if the budget does not allow it.

    `save(record)` persists the record. A part already `submitting` (a create may have been sent before a crash)
    is re-attached, not paid again, so it is never refused.
    """
    limit = run.cfg.budget.max_usd
    if record.estimated_usd is None:
        record.estimated_usd = estimate_part(run, ref).usd
    if limit is None or record.state == "submitting":
        record.state = "submitting"
        save(record)
        return
    with FileLock(str(run.layout.run_dir / "budget.lock"), timeout=120):
        committed = committed_usd(run)
        if committed + record.estimated_usd > limit + 1e-9:
            raise BudgetExceeded(
                f"budget: sending part {ref.jkey} of trial {ref.owner} (estimate ${record.estimated_usd:.4f}) would "
                f"commit ${committed + record.estimated_usd:.4f}, over budget.max_usd ${limit:.4f} "
                f"(${committed:.4f} committed so far); nothing was sent. Raise budget.max_usd in the config and re-run "
                "with --accept-config-drift to continue")
        record.state = "submitting"
        save(record)


def _manifest(run: Run, slug: str) -> TrialManifest | None:
    try:
        return store.read(run.layout.trial_manifest(slug), TrialManifest)
    except (OSError, ValueError):
        return None


def plan_estimate(run: Run) -> dict[str, Any]:
    """The whole run's estimate before anything is sent, per owner trial (a shared part counts once): from the built
    parts when every build exists, else from the requests the build would write (computed in memory, nothing written).
    """
    by_trial: dict[str, Estimate] = {trial.slug: NOTHING for trial in run.trials}
    built = _built_parts(run)
    if built is not None:
        for ref in built:
            by_trial[ref.owner] += estimate_part(run, ref)
    else:
        from pipeline.plan import inference_parameters

        seen: set[str] = set()
        for trial, temp, type_, lines in _planned_parts(run):
            params = inference_parameters(run, trial, temp, type_)
            key = hashlib.sha256("\n".join([trial.model_id, json.dumps(params, sort_keys=True), *lines]).encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                by_trial[trial.slug] += estimate_lines(lines, max_tokens=int(params["maxTokens"]),
                                                       rates=part_rates(run, trial.model_id))
    return {"total": sum(by_trial.values(), NOTHING), "by_trial": by_trial, "max_usd": run.cfg.budget.max_usd,
            "from": "built requests" if built is not None else "requests the build will write"}


def _built_parts(run: Run) -> list[PartRef] | None:
    from pipeline.plan import all_parts
    from targets.manifest import BuildManifest

    build = store.read(run.layout.build_manifest, BuildManifest)
    if build is None:
        return None
    try:
        parts = all_parts(run, build)
    except KeyError:  # some builds are not there yet
        return None
    return [ref for refs in parts.values() for ref in refs if not ref.shared]


def _planned_parts(run: Run) -> Iterable[tuple[Any, float, str, list[str]]]:
    from pipeline.batches import build_lines, split_parts
    from pipeline.data.prepared import read_prepared
    from pipeline.naming import CONDITIONS, temp_str
    from pipeline.tasks.prepare import select_rows

    layout = run.layout
    rows: dict[str, list[dict]] = {}
    for kind in ("open_book", "closed_book"):
        snapshot = layout.prepared_file(kind)
        if snapshot.exists():
            rows[kind] = read_prepared(snapshot, kind)
        else:
            source = Path(run.cfg.paths.prepared_dir) / f"{kind}.jsonl"
            rows[kind] = select_rows(kind, read_prepared(source, kind), run.cfg.sizes.model_dump())
    instructions = {"open": run.instructions_path("open_book").read_text(encoding="utf-8"),
                    "closed": run.instructions_path("closed_book").read_text(encoding="utf-8")}
    for trial in run.trials:
        for temp in trial.temps:
            for cond in CONDITIONS:
                lines = build_lines(closed_rows=rows["closed_book"], open_rows=rows["open_book"], condition=cond,
                                    temp=temp, samples=run.cfg.samples_per_item[temp_str(temp)],
                                    system_prompt=run.prompt_path(trial.prompt_set, cond).read_text(encoding="utf-8"),
                                    instructions=instructions, stop=run.cfg.stop, use_batch_api=run.cfg.use_batch_api)
                for chunk in split_parts(lines, run.cfg.batching.lines_per_part):
                    yield trial, temp, chunk[0].type, [line.text for line in chunk]
