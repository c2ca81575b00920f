"""The run's budget (`budget.max_usd`): an upper-bound estimate per part, and the check before every submission.

Estimate of one part = its requests' prompt tokens (characters / 4, plus a few per message: no tokenizer is
needed and the figure errs high for English) at the input rate, plus every request using its full `maxTokens`
at the output rate, with the rates `costs.json` uses (batch pricing when `use_batch_api`). With
`provider.prompt_caching` the prompt tokens are priced at max(input, cache write) rate instead: any of them may be
a cache write, and a cache read never costs more than an input token. Real usage is lower; the estimate is what a
submission *commits* until the results are in.

Committed money = the estimate of every generation of every part that was sent (state `submitting` or later,
plus each earlier generation in its history unless the entry says it was never sent). A submission is refused,
before anything is sent, when the committed money plus this part's estimate would pass the budget; the check and
the write-ahead `submitting` record happen under one run-wide lock, so concurrent workers cannot both squeeze
under the limit.

What cannot be recovered is committed, never free (conservative): a trial manifest that is corrupt is read as
rebuilt from its breadcrumbs (in memory; part records come back from the part mirrors), and a part the rebuild
knows only from its job's breadcrumbs (`recovered_parts` of the manifest, no record under `parts`) counts one
generation. A generation whose estimate is not recorded is priced from the part's request file; when that is
unknown too, at the largest estimate of any part of its trial, else of the run, else at the whole `max_usd`, so
nothing more is sent until it is known (a run without a budget refuses nothing and has no such bound: there an
unpriceable part counts 0 and a warning says so).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from pipeline.control.layout import TRIAL_FILES
from pipeline.control.outcome import BudgetExceeded
from pipeline.control.run import Run
from pipeline.pricing import pricing_args, resolve_rates
from pipeline.tasks.base import trial_context
from targets import store
from targets.manifest import PartRecord, TrialManifest

if TYPE_CHECKING:
    from pipeline.plan import PartRef

log = logging.getLogger("pipeline")
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


def prompt_rate(rates: dict[str, Any], *, prompt_caching: bool) -> float:
    """USD per 1M estimated prompt tokens: the input rate, or with prompt caching the larger of it and the cache
    write rate (an upper bound whichever way each token is billed)."""
    if prompt_caching:
        return max(rates["input_rate_per_mtok"], rates["cache_write_rate_per_mtok"])
    return rates["input_rate_per_mtok"]


def estimate_lines(lines: Iterable[str], *, max_tokens: int, rates: dict[str, Any], prompt_caching: bool = False) -> Estimate:
    requests = prompt = 0
    for line in lines:
        if line.strip():
            requests += 1
            prompt += request_tokens(line)
    completion = requests * max_tokens
    usd = (prompt / 1e6 * prompt_rate(rates, prompt_caching=prompt_caching)
           + completion / 1e6 * rates["output_rate_per_mtok"])
    return Estimate(requests, prompt, completion, round(usd, 6))


def part_rates(run: Run, model: str) -> dict[str, Any]:
    return resolve_rates(**pricing_args(run.cfg, model))


def _estimate_run_lines(run: Run, lines: Iterable[str], *, max_tokens: int, model: str) -> Estimate:
    """`estimate_lines` with the run's rates for `model` and its prompt caching setting."""
    return estimate_lines(lines, max_tokens=max_tokens, rates=part_rates(run, model),
                          prompt_caching=run.cfg.provider.prompt_caching)


def estimate_part(run: Run, ref: PartRef) -> Estimate:
    """The estimate of one generation of a built part (read from its request file)."""
    with open(ref.path, encoding="utf-8") as lines:
        return _estimate_run_lines(run, lines, max_tokens=int(ref.inference_parameters["maxTokens"]), model=ref.model)


def _request_file_usd(run: Run, record: PartRecord) -> float | None:
    """One generation of a recorded part, estimated from its request file; None when the file cannot be read."""
    try:
        with open(run.layout.run_dir / record.input_path, encoding="utf-8") as lines:
            return _estimate_run_lines(run, lines, max_tokens=int(record.inference_parameters.get("maxTokens", 0)),
                                       model=record.model).usd
    except (OSError, ValueError, KeyError):
        return None


def sent_estimate(run: Run, record: PartRecord, *, unknown: Callable[[], float] | None = None) -> float:
    """Committed money of one part: the estimate of each of its generations that was sent.

    The current generation counts when its state is `submitting` or later; each earlier one in `history` counts
    unless its entry says `"sent": false`, at the entry's own `estimated_usd` when it has one. The part's estimate is
    `estimated_usd`, else from its request file, else `unknown()` (default: `unknown_part_usd` for the run).
    """
    earlier = [entry for entry in record.history if entry.get("sent", True) is not False]
    if not earlier and record.state not in SENT:
        return 0.0
    per_generation = record.estimated_usd
    if per_generation is None:  # recorded before estimates were kept: estimate from its request file
        per_generation = _request_file_usd(run, record)
    if per_generation is None:
        per_generation = unknown() if unknown is not None else unknown_part_usd(run, None)
    total = per_generation if record.state in SENT else 0.0
    total += followup_usd(record) or 0.0
    for entry in earlier:
        usd = entry.get("estimated_usd")
        total += usd if isinstance(usd, int | float) and not isinstance(usd, bool) and usd >= 0 else per_generation
    return total


def followup_usd(record: PartRecord) -> float | None:
    """The estimate of the part's follow-up batch (its failed requests sent again, once) when it was sent, else
    None. A follow-up recorded without an estimate counts as much as its part's generation (an upper bound)."""
    follow = (record.model_extra or {}).get("followup")
    if not isinstance(follow, dict) or follow.get("state") not in SENT:
        return None
    usd = follow.get("estimated_usd")
    if isinstance(usd, int | float) and not isinstance(usd, bool) and usd >= 0:
        return float(usd)
    return record.estimated_usd


def unknown_part_usd(run: Run, slug: str | None) -> float:
    """What a generation of a part of trial `slug` (None: any trial) counts when its own estimate is unknown: the
    largest estimate of any part of the trial (built requests, recorded estimates), else of the run, else the whole
    budget. Never 0 while there is a budget to protect."""
    built = _readable_built_parts(run)
    for scope in ([slug] if slug else []) + [None]:
        estimates = [usd for ref in built if scope in (None, ref.owner) and (usd := _built_usd(run, ref))]
        for trial in run.trials:
            manifest = trial_manifest(run, trial.slug) if scope in (None, trial.slug) else None
            estimates += [r.estimated_usd for r in manifest.parts.values() if r.estimated_usd] if manifest else []
        if estimates:
            return max(estimates)
    if run.cfg.budget.max_usd is not None:
        return run.cfg.budget.max_usd
    log.warning("budget: a part of run %s was sent but no estimate of any part is known; it counts $0 (no budget set)",
                run.rid)
    return 0.0


def _readable_built_parts(run: Run) -> list[PartRef]:
    """The run's built parts, or none when the build manifest is missing, incomplete or unreadable."""
    try:
        return _built_parts(run) or []
    except (OSError, ValueError):
        return []


def _built_usd(run: Run, ref: PartRef) -> float | None:
    try:
        return estimate_part(run, ref).usd
    except (OSError, ValueError, KeyError):
        return None


def _unrecorded_usd(run: Run, built: list[PartRef], slug: str, jkey: str, unknown: Callable[[], float]) -> float:
    """One generation of a part known only from its job's breadcrumbs: from its request file when it is built."""
    ref = next((r for r in built if r.owner == slug and r.jkey == jkey), None)
    usd = _built_usd(run, ref) if ref is not None else None
    return usd if usd is not None else unknown()


def committed_usd(run: Run) -> float:
    """Money committed by every part of the run that was sent, recovered parts included (see the module docstring)."""
    total = 0.0
    built = functools.cache(functools.partial(_readable_built_parts, run))  # read only for unrecorded parts
    for trial in run.trials:
        manifest = trial_manifest(run, trial.slug)
        if manifest is None:
            continue
        unknown = functools.cache(functools.partial(unknown_part_usd, run, trial.slug))
        for record in manifest.parts.values():
            total += sent_estimate(run, record, unknown=unknown)
        recovered = manifest.model_extra.get("recovered_parts") if manifest.model_extra else None
        for jkey in sorted(recovered or {}):
            if jkey not in manifest.parts:
                total += _unrecorded_usd(run, built(), trial.slug, jkey, unknown)
    return round(total, 6)


def trial_manifest(run: Run, slug: str) -> TrialManifest | None:
    """The trial's manifest as it stands, read-only: a corrupt one is rebuilt in memory from its breadcrumbs (part
    records included), so a lost manifest never makes sent parts look free. None when absent or unusable."""
    try:
        return store.read(run.layout.trial_manifest(slug), TrialManifest, context=lambda: trial_context(run, slug),
                          names=TRIAL_FILES)
    except (OSError, ValueError):
        return None


def spent_usd(run: Run) -> float | None:
    """Money priced from downloaded results so far, each distinct part once (`pipeline.costs.run_spent_usd` over the
    trials' costs.json); None when no trial is priced yet."""
    from pipeline.costs import read_costs, run_spent_usd

    return run_spent_usd(read_costs(run.layout.costs(trial.slug)) for trial in run.trials)


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
                by_trial[trial.slug] += _estimate_run_lines(run, lines, max_tokens=int(params["maxTokens"]),
                                                            model=trial.model_id)
    return {"total": sum(by_trial.values(), NOTHING), "by_trial": by_trial, "max_usd": run.cfg.budget.max_usd,
            "from": "built requests" if built is not None else "requests the build will write",
            "prompt_rate": ("max(input, cache write) rate: prompt caching is on" if run.cfg.provider.prompt_caching
                            else "input rate")}


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
                for chunk in split_parts(lines, run.cfg.batching.lines_per_part, run.cfg.part_byte_limit()):
                    yield trial, temp, chunk[0].type, [line.text for line in chunk]
