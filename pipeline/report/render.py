"""Render the per-trial `report.md` and the run's `aggregate_report.md` from plain data.

Contract:
- `render_trial_report(ctx)` / `render_aggregate_report(ctx)` take the dicts described on each function and
  return Markdown text; the same inputs always give the same text (no clock, sorted keys, fixed formats).
- Units are fixed: rates are percentages with one decimal (`45.0%`), differences are percentage points with two
  decimals and a sign (`+2.50 pp`), p- and q-values use 3 significant digits (`0.0123`) or `<1e-4`, money is USD
  with 4 decimals.
- `—` marks a metric that does not apply (false-answer and unsupported rates of closed-book items, a metric
  column absent from the scores); `n/a` marks a value that applies but is missing (an absent significance block,
  a None in significance.json, a group without scored items). Every block of significance.json and costs.json is
  optional: a missing one renders `n/a`, it never raises.
The module turns the inputs into rows of display strings; the templates only lay them out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from pipeline.costs import owned_usd, run_spent_usd
from pipeline.naming import CONDITIONS, TYPES, temp_str

NA = "n/a"
NOT_APPLICABLE = "—"
TYPE_TITLES = {"closed": "Closed-book", "open": "Open-book"}
# per_item_scores.csv column -> display name, in table order
METRICS = {
    "em": "EM",
    "f1": "F1",
    "abstain_rate": "Abstain",
    "false_answer_rate": "False-Ans",
    "unsupported_rate": "Unsupported",
}
# Metrics that are undefined for a task type (closed-book items have no passage to contradict or support).
_UNDEFINED = {"closed": frozenset({"false_answer_rate", "unsupported_rate"}), "open": frozenset()}
_TEMPLATES = Path(__file__).resolve().parent / "templates"
# The label every report of an emulator run carries in its header: the emulator's simulated model has a built-in
# treatment effect, so its numbers must never pass for a real model's.
SIMULATED_LABEL = "SIMULATED — offline emulator, not model output"
SIMULATED_PROVIDERS = frozenset({"emulator"})
API_TITLES = {"fireworks": "Fireworks", "openai": "OpenAI", "anthropic": "Anthropic",
              "local": "local OpenAI-compatible server"}
"""How a report names the API the emulator spoke (provider `emulator/<api>`; plain `emulator` is Fireworks')."""
SELECTIVE_DEFINITION = (
    "Coverage at threshold τ is the share of all paired items whose abstention rate is ≤ τ (kept by the gate, not "
    "necessarily answered: at τ = 1 every item is kept, abstentions included); risk is 1 − mean EM over the kept items."
)
UNANSWERABLE_RULE = (
    "Unanswerable (SQuAD v2) items: EM = F1 = 1 when the answer is an abstention by the abstention detector "
    "(a configured phrase such as “unknown”, or an empty answer), else 0. The official SQuAD v2 rule scores 1 only "
    "when the prediction normalizes to the empty string."
)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["cell"] = _cell
    return env


# ---------------------------------------------------------------- formatting


def _number(value: Any, allow_inf: bool = False) -> float | None:
    """`value` as a float; None for None, NaN, non-numbers, booleans and (unless `allow_inf`) ±inf."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        return None
    return number


def _cell(value: Any) -> str:
    """Free text made safe for one Markdown table cell."""
    return NA if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def fmt_pct(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{number * 100:.1f}%"


def fmt_pp(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{number * 100:+.2f} pp"


def fmt_ci_pp(ci: Any) -> str:
    bounds = _pair(ci)
    return NA if bounds is None else f"[{bounds[0] * 100:+.2f}, {bounds[1] * 100:+.2f}] pp"


def fmt_p(value: Any) -> str:
    number = _number(value)
    if number is None:
        return NA
    return "<1e-4" if number < 1e-4 else f"{number:.3g}"


def fmt_num(value: Any, spec: str = ".3g") -> str:
    # odds ratios and their CI bounds are legitimately infinite when c = 0; show `inf`, not n/a
    number = _number(value, allow_inf=True)
    return NA if number is None else format(number, spec)


def fmt_int(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{int(number):,}"


def fmt_usd(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"${number:.4f}"


def _pair(value: Any, allow_inf: bool = False) -> tuple[float, float] | None:
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    low, high = _number(value[0], allow_inf), _number(value[1], allow_inf)
    return None if low is None or high is None else (low, high)


def _get(data: Any, *keys: str) -> Any:
    """Nested dict lookup that yields None as soon as a level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _temp_key(value: Any) -> str | None:
    number = _number(value)
    return None if number is None else temp_str(number)


def _by_temp(mapping: Any) -> dict[str, Any]:
    """A dict keyed by temperature strings re-keyed with `temp_str`, so `0.7`, `"0.7"` and `"0.70"` all match."""
    if not isinstance(mapping, dict):
        return {}
    result: dict[str, Any] = {}
    for key in sorted(mapping, key=str):
        norm = _temp_key(key)
        if norm is not None:
            result.setdefault(norm, mapping[key])
    return result


def _sorted_temps(keys: Any) -> list[str]:
    return sorted({k for k in keys if k is not None}, key=float)


# ---------------------------------------------------------------- per-item scores


def _prepare_items(per_item: Any) -> pd.DataFrame:
    """per_item_scores with a `temp_key` column and only the items that have at least one scored sample."""
    frame = per_item.copy() if isinstance(per_item, pd.DataFrame) else pd.DataFrame()
    if frame.columns.empty:
        # no scores at all: metrics are missing (n/a), not inapplicable (—)
        frame = pd.DataFrame(columns=list(METRICS), dtype=float)
    for col in ("item_key", "condition", "type", "temp"):
        if col not in frame.columns:
            frame[col] = pd.Series(dtype=object)
    frame["temp_key"] = [_temp_key(t) for t in frame["temp"]]
    if "n_excluded" in frame.columns:
        frame["n_excluded"] = pd.to_numeric(frame["n_excluded"], errors="coerce").fillna(0)
    else:
        frame["n_excluded"] = math.nan  # unknown, shown as n/a
    if "n_samples" in frame.columns:
        frame["scored"] = pd.to_numeric(frame["n_samples"], errors="coerce").fillna(0) > 0
    else:
        frame["scored"] = True
    return frame


def _metric_cell(group: pd.DataFrame, metric: str, type_: str, columns: pd.Index) -> str:
    if metric in _UNDEFINED.get(type_, ()) or metric not in columns:
        return NOT_APPLICABLE
    values = pd.to_numeric(group[metric], errors="coerce").dropna()
    return fmt_pct(values.mean()) if len(values) else NA


def _results_rows(items: pd.DataFrame, temp: str, type_: str) -> list[dict[str, Any]]:
    rows = []
    block = items[(items["temp_key"] == temp) & (items["type"] == type_) & items["scored"]]
    for condition in CONDITIONS:
        group = block[block["condition"] == condition]
        cells = [_metric_cell(group, metric, type_, items.columns) for metric in METRICS]
        rows.append({"condition": condition.capitalize(), "cells": cells, "n": fmt_int(group["item_key"].nunique())})
    return rows


def _balance_rows(items: pd.DataFrame, temps: list[str]) -> list[dict[str, Any]]:
    """Per temperature × type: display strings, and `counts` (scored items per condition) for the chart."""
    rows = []
    for temp in temps:
        for type_ in TYPES:
            block = items[(items["temp_key"] == temp) & (items["type"] == type_)]
            scored = block[block["scored"]]
            keys = {c: set(scored.loc[scored["condition"] == c, "item_key"]) for c in CONDITIONS}
            rows.append({"temp": temp, "type": TYPE_TITLES[type_], "type_key": type_,
                         "counts": {c: len(keys[c]) for c in CONDITIONS},
                         "control": fmt_int(len(keys["control"])), "treatment": fmt_int(len(keys["treatment"])),
                         "paired": fmt_int(len(keys["control"] & keys["treatment"])),
                         "excluded": fmt_int(block["n_excluded"].sum()) if block["n_excluded"].notna().all() else NA})
    return rows


def _status_line(summary: Any) -> str:
    counts = summary.get("status_counts", summary) if isinstance(summary, dict) else None
    if not isinstance(counts, dict) or not counts:
        return NA
    names = [s for s in ("ok", "provider_error", "truncated") if s in counts]
    names += sorted(k for k in counts if k not in names and _number(counts[k]) is not None)
    return " · ".join(f"{name} {fmt_int(counts[name])}" for name in names) or NA


# ---------------------------------------------------------------- unanswerable rules


def _rules_view(document: Any, temp: str) -> dict[str, Any]:
    """Open-book EM/F1 under the abstention-detector rule beside the official SQuAD v2 rule at `temp`, from
    unanswerable_rules.json (`pipeline.stats.unanswerable`); `available` False when the file or the entry is absent."""
    entry = _by_temp(_get(document, "results")).get(temp)
    if not isinstance(entry, dict) or not entry:
        return {"available": False}
    rows = []
    for condition in CONDITIONS:
        block = entry.get(condition) if isinstance(entry.get(condition), dict) else {}
        rows.append({"label": condition.capitalize(), "n": fmt_int(block.get("n_unanswerable")),
                     "cells": [fmt_pct(block.get(k)) for k in ("unanswerable_em_detector", "unanswerable_em_official",
                                                               "em_detector", "em_official", "f1_detector",
                                                               "f1_official")]})
    delta = entry.get("delta") if isinstance(entry.get("delta"), dict) else {}
    rows.append({"label": "Δ (trt − ctrl)", "n": NOT_APPLICABLE,
                 "cells": [NOT_APPLICABLE, NOT_APPLICABLE,
                           *(fmt_pp(delta.get(k)) for k in ("em_detector", "em_official", "f1_detector", "f1_official"))]})
    return {"available": True, "rows": rows}


# ---------------------------------------------------------------- significance


@dataclass(frozen=True)
class Family:
    """The BH hypothesis family significance.json's `fdr` block lists (empty for files that list none)."""

    method: str | None = None
    n_tests: Any = None
    scope: str | None = None
    members: tuple[str, ...] = ()
    excluded: dict[str, str] = field(default_factory=dict)


def _family(significance: Any) -> Family:
    fdr = _get(significance, "fdr")
    if not isinstance(fdr, dict):
        return Family()
    members = fdr.get("family") if isinstance(fdr.get("family"), list) else []
    excluded = fdr.get("excluded") if isinstance(fdr.get("excluded"), list) else []
    return Family(method=fdr.get("method"), n_tests=fdr.get("n_tests"), scope=fdr.get("scope"),
                  members=tuple(str(m) for m in members),
                  excluded={str(e.get("test")): str(e.get("reason") or NA) for e in excluded if isinstance(e, dict)})


def _family_view(family: Family, temp: str) -> dict[str, Any]:
    """What a results section says about q: the definition, the family's size, and its members at `temp`."""
    if not family.method:
        note = ("q: not computed (FDR disabled)" if family.scope == "disabled" else
                "q: n/a (significance.json defines no FDR family)")
        return {"note": note, "members": [], "excluded": []}
    prefix = f"T={temp}/"
    members = [m[len(prefix):] for m in family.members if m.startswith(prefix)]
    excluded = [f"{t[len(prefix):]}: {why}" for t, why in sorted(family.excluded.items()) if t.startswith(prefix)]
    if not family.members:  # an older file: the family is every test in it
        note = (f"q: {str(family.method).replace('_', '–').title()}-adjusted p over {fmt_int(family.n_tests)} tests; "
                f"scope: {family.scope or NA}")
        return {"note": note, "members": [], "excluded": []}
    note = (f"q: Benjamini–Hochberg adjusted p (false discovery rate) over one family of {fmt_int(family.n_tests)} "
            f"hypotheses across all temperatures and task types, one test per hypothesis: the Wilcoxon test of each "
            f"metric and McNemar on binarised EM, for all items and for each dataset whose items differ from all "
            f"items. `—` in a q column: not a separate hypothesis (a repeat of a member's test). "
            f"{len(members)} of the members are at T = {temp}.")
    return {"note": note, "members": members, "excluded": excluded}


def _ci_note(block: Any, cfg: dict[str, Any]) -> str:
    """The CI method and resample count of a significance block's metric tables."""
    metrics = _get(block, "metrics")
    methods = sorted({str(m.get("ci_method")).replace("_", " ") for m in metrics.values()
                      if isinstance(m, dict) and m.get("ci_method")}) if isinstance(metrics, dict) else []
    counts = sorted({m.get("bootstrap_samples") for m in metrics.values()
                     if isinstance(m, dict) and _number(m.get("bootstrap_samples")) is not None}
                    ) if isinstance(metrics, dict) else []
    resamples = counts[0] if len(counts) == 1 else cfg.get("bootstrap_samples")
    return (f"95% CI: {', '.join(methods) or NA} over the paired items, B = {fmt_int(resamples)} resamples "
            f"(seeded by the item set, so the same items get the same interval)")


def _metric_names(metrics: Any) -> list[str]:
    """The keys of a metrics block: the known metrics in table order, then any others sorted."""
    if not isinstance(metrics, dict):
        return []
    return [m for m in METRICS if m in metrics] + sorted(m for m in metrics if m not in METRICS)


def _q(value: Any, test_id: str, family: Family) -> str:
    """A q-value cell: `—` for a test the file's BH family leaves out (not a separate hypothesis), else the value."""
    return NOT_APPLICABLE if test_id in family.excluded else fmt_p(value)


def _metric_stats(block: Any, test_id: str, family: Family) -> dict[str, Any]:
    """The display strings of one metric's paired tests; `excludes_zero` says whether its 95% CI excludes 0.

    Reads the current names (`d_z`, `cliffs_delta_unpaired`) and those of older files (`cohens_d`, `cliffs_delta`).
    """
    block = block if isinstance(block, dict) else {}
    ci = _pair(block.get("ci_95"))
    return {
        "delta": fmt_pp(block.get("delta_mean")),
        "ci": fmt_ci_pp(block.get("ci_95")),
        "p": fmt_p(_get(block, "wilcoxon", "p_value")),
        "q": _q(_get(block, "wilcoxon", "q_value"), f"{test_id}/wilcoxon", family),
        "hl": fmt_pp(block.get("hodges_lehmann")),
        "d": fmt_num(block.get("d_z", block.get("cohens_d")), ".3f"),
        "cliff": fmt_num(block.get("cliffs_delta_unpaired", block.get("cliffs_delta")), ".3f"),
        "perm": fmt_p(block.get("perm_p_value")),
        "excludes_zero": ci is not None and (ci[0] > 0 or ci[1] < 0),
    }


def _metric_rows(metrics: Any, scope_id: str, family: Family) -> list[dict[str, Any]]:
    return [{"metric": METRICS.get(name, name), **_metric_stats(metrics[name], f"{scope_id}/{name}", family)}
            for name in _metric_names(metrics)]


def _metric_table(items: pd.DataFrame, temp: str, type_: str, sig_block: Any, family: Family) -> list[dict[str, Any]]:
    """One row per metric that applies to `type_`: control and treatment means beside the paired delta and tests."""
    metrics = _get(sig_block, "metrics")
    names = [m for m in METRICS if m not in _UNDEFINED.get(type_, ()) and (m in items.columns or _get(metrics, m))]
    names += [m for m in _metric_names(metrics) if m not in METRICS]
    block = items[(items["temp_key"] == temp) & (items["type"] == type_) & items["scored"]]
    rows = []
    for name in names:
        means = [_metric_cell(block[block["condition"] == c], name, type_, items.columns) for c in CONDITIONS]
        rows.append({"metric": METRICS.get(name, name), "control": means[0], "treatment": means[1],
                     **_metric_stats(_get(metrics, name), f"T={temp}/{type_}/all/{name}", family)})
    return rows


def _or_ci(mcnemar: dict[str, Any]) -> str:
    """The odds ratio's CI; significance.json stores an infinite bound as null, which c = 0 makes the upper one."""
    ci = mcnemar.get("or_ci_95")
    if isinstance(ci, list | tuple) and len(ci) == 2 and ci[1] is None and _number(mcnemar.get("c")) == 0:
        ci = [ci[0], math.inf]
    bounds = _pair(ci, allow_inf=True)
    return NA if bounds is None else f"{fmt_num(bounds[0])}–{fmt_num(bounds[1])}"


def _method_name(method: Any) -> str:
    """The name part of a method description (`name: explanation`); the explanation is listed once per report."""
    return (str(method).split(":", 1)[0].strip() or NA) if method else NA


MCNEMAR_RULE = "per-item EM binarised at ≥ 0.5 (with K > 1 samples per item: EM on at least half of them)"


def _mcnemar_line(mcnemar: Any, test_id: str, family: Family) -> str:
    if not isinstance(mcnemar, dict) or not mcnemar:
        return NA
    p_value = mcnemar.get("p_exact", mcnemar.get("p_value"))
    left_out = family.excluded.get(test_id)
    return (f"b = {fmt_int(mcnemar.get('b'))}, c = {fmt_int(mcnemar.get('c'))}, exact p = {fmt_p(p_value)}, "
            f"q = {_q(mcnemar.get('q_value'), test_id, family)}{f' ({left_out})' if left_out else ''}; "
            f"odds ratio = {fmt_num(mcnemar.get('odds_ratio'))} "
            f"(95% CI {_or_ci(mcnemar)}; method: {_method_name(mcnemar.get('or_ci_method'))})")


def _noninferiority_lines(block: Any) -> list[str]:
    """One line per metric of the one-sided non-inferiority t test (`noninferiority`, `tost` in older files)."""
    tests = _get(block, "noninferiority")
    tests = tests if isinstance(tests, dict) else _get(block, "tost")
    if not isinstance(tests, dict):
        return []
    lines = []
    for name in [m for m in METRICS if m in tests] + sorted(m for m in tests if m not in METRICS):
        block = tests[name] if isinstance(tests[name], dict) else {}
        verdict = {True: "non-inferior", False: "non-inferiority not shown"}.get(block.get("non_inferior"), NA)
        margin = _number(block.get("margin"))
        level = _number(block.get("ci_level"))
        ci = (f", {level * 100:.0f}% CI {fmt_ci_pp(block['ci'])}"
              if _pair(block.get("ci")) and level is not None else "")
        lines.append(f"Non-inferiority (one-sided t test, H0: Δ ≤ −margin), {METRICS.get(name, name)}: margin "
                     f"{NA if margin is None else f'{margin * 100:.2f} pp'}, α = {fmt_num(block.get('alpha'))}, "
                     f"p = {fmt_p(block.get('p_value'))} → {verdict} (mean Δ {fmt_pp(block.get('mean_delta'))}{ci})")
    return lines


def _aurc_line(selective: Any) -> str | None:
    aurc = _get(selective, "aurc")
    if not isinstance(aurc, dict):
        return None
    return (f"AURC (risk over coverage, lower is better): control {fmt_num(aurc.get('control'), '.4f')} · "
            f"treatment {fmt_num(aurc.get('treatment'), '.4f')}. {SELECTIVE_DEFINITION}")


def _meta_lines(meta: Any) -> list[str]:
    if not isinstance(meta, dict):
        return []
    lines = []
    for name in [m for m in METRICS if m in meta] + sorted(m for m in meta if m not in METRICS):
        block = meta[name] if isinstance(meta[name], dict) else {}
        if block.get("status", "ok") != "ok":
            lines.append(f"Meta-analysis across datasets, {METRICS.get(name, name)}: not computed "
                         f"({str(block['status']).replace('_', ' ')})")
            continue
        fixed, random, het = (block.get(k) if isinstance(block.get(k), dict) else {}
                              for k in ("fixed", "random", "heterogeneity"))
        lines.append(
            f"Meta-analysis across datasets, {METRICS.get(name, name)}: fixed {fmt_pp(fixed.get('delta_mean'))} "
            f"{fmt_ci_pp(fixed.get('ci_95'))}; random {fmt_pp(random.get('delta_mean'))} "
            f"{fmt_ci_pp(random.get('ci_95'))}, τ² = {fmt_num(random.get('tau2'))}; Q = {fmt_num(het.get('Q'))} "
            f"(df {fmt_int(het.get('df'))}, p = {fmt_p(het.get('p_value'))}), I² = {fmt_pct(het.get('I2'))}")
    return lines


def _subgroup_rows(subgroups: Any, scope_prefix: str, family: Family) -> list[dict[str, str]]:
    datasets = _get(subgroups, "dataset")
    if not isinstance(datasets, dict):
        return []
    rows = []
    for name in sorted(datasets, key=str):
        block = datasets[name] if isinstance(datasets[name], dict) else {}
        em = _get(block, "metrics", "em")
        rows.append({"dataset": str(name), "n": fmt_int(block.get("n_items")),
                     "delta": fmt_pp(_get(em, "delta_mean")), "ci": fmt_ci_pp(_get(em, "ci_95")),
                     "p": fmt_p(_get(em, "wilcoxon", "p_value")),
                     "q": _q(_get(em, "wilcoxon", "q_value"), f"{scope_prefix}/dataset={name}/em/wilcoxon", family),
                     "mcnemar_p": fmt_p(_get(block, "mcnemar", "p_exact"))})
    return rows


def _values_of(data: Any, key: str) -> set[str]:
    """Every string stored under `key` anywhere in nested dicts and lists."""
    if isinstance(data, dict):
        found = {data[key]} if isinstance(data.get(key), str) else set()
        return found.union(*(_values_of(v, key) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_values_of(v, key) for v in data))
    return set()


def _methods_lines(significance: Any) -> list[str]:
    """How the statistics were computed, from significance.json's settings and the methods its blocks name."""
    if not isinstance(significance, dict) or not significance:
        return []
    cfg = significance.get("stats_config") if isinstance(significance.get("stats_config"), dict) else {}
    lines = []
    ci_methods = sorted(_values_of(significance.get("results"), "ci_method"))
    if ci_methods or cfg:
        lines.append(f"Delta CIs: {', '.join(m.replace('_', ' ') for m in ci_methods) or NA} over paired items, "
                     f"B = {fmt_int(cfg.get('bootstrap_samples'))} resamples, seed {fmt_num(cfg.get('random_seed'), 'g')}")
    if cfg.get("enable_permutation") is False:
        lines.append("Permutation test: disabled")
    elif cfg:
        lines.append(f"Permutation p: sign-flip, R = {fmt_int(cfg.get('permutation_samples'))}")
    fdr = significance.get("fdr") if isinstance(significance.get("fdr"), dict) else {}
    if fdr:
        method = fdr.get("method")
        lines.append("q-values: disabled" if not method else
                     f"q-values: {str(method).replace('_', '–').title()} over a family of {fmt_int(fdr.get('n_tests'))} "
                     f"tests; family: {fdr.get('scope') or NA}")
    lines += [
        "d_z: mean ÷ standard deviation of the paired deltas (Cohen's d for paired data).",
        "Cliff's δ (unpaired): P(treatment > control) − P(treatment < control) over all treatment × control pairs "
        "of per-item values, treating the two conditions as independent samples (the pairing is ignored).",
        f"McNemar: exact test on {MCNEMAR_RULE}.",
        "Non-inferiority: one-sided paired t test of H0: mean Δ ≤ −margin (only the lower test of a TOST); "
        "the interval shown is the two-sided (1 − 2α) t interval.",
        SELECTIVE_DEFINITION,
        UNANSWERABLE_RULE,
    ]
    lines += [f"McNemar odds-ratio CI: {m}" for m in sorted(_values_of(significance.get("results"), "or_ci_method"))]
    return lines


def _significance_view(block: Any, scope_prefix: str, family: Family, cfg: dict[str, Any]) -> dict[str, Any]:
    """Display strings of one temperature × type block; `scope_prefix` is its `T=<temp>/<type>` family id prefix."""
    if not isinstance(block, dict) or not block:
        return {"available": False}
    return {
        "available": True,
        "n_items": fmt_int(block.get("n_items")),
        "mcnemar": _mcnemar_line(block.get("mcnemar"), f"{scope_prefix}/all/mcnemar", family),
        "metrics": _metric_rows(block.get("metrics"), f"{scope_prefix}/all", family),
        "ci_note": _ci_note(block, cfg),
        "noninferiority": _noninferiority_lines(block),
        "aurc": _aurc_line(block.get("selective_risk")),
        "meta": _meta_lines(block.get("meta")),
        "subgroups": _subgroup_rows(block.get("subgroups"), scope_prefix, family),
    }


# ---------------------------------------------------------------- costs


def _cost_block(label_temp: str, label_condition: str, block: Any) -> dict[str, str]:
    block = block if isinstance(block, dict) else {}
    return {"temp": label_temp, "condition": label_condition, "prompt": fmt_int(block.get("prompt_tokens")),
            "completion": fmt_int(block.get("completion_tokens")), "total": fmt_int(block.get("total_tokens")),
            "usd": fmt_usd(block.get("usd"))}


def _cost_view(costs: Any) -> dict[str, Any]:
    costs = costs if isinstance(costs, dict) else {}
    pricing = costs.get("pricing") if isinstance(costs.get("pricing"), dict) else {}
    rows = []
    by_condition_temp = _by_temp(costs.get("by_condition_temp"))
    for temp in _sorted_temps(by_condition_temp):
        per_condition = by_condition_temp[temp] if isinstance(by_condition_temp[temp], dict) else {}
        rows += [_cost_block(temp, c, per_condition.get(c)) for c in sorted(per_condition, key=_condition_order)]
    by_condition = costs.get("by_condition") if isinstance(costs.get("by_condition"), dict) else {}
    rows += [_cost_block("all", c, by_condition[c]) for c in sorted(by_condition, key=_condition_order)]
    if costs:
        rows.append(_cost_block("all", "all", costs))
    return {
        "prompt": fmt_int(costs.get("prompt_tokens")),
        "completion": fmt_int(costs.get("completion_tokens")),
        "total": fmt_int(costs.get("total_tokens")),
        "usd": fmt_usd(costs.get("usd")),
        "records": fmt_int(costs.get("usage_records")),
        "batch": _yes_no(costs.get("batch_discount_applied")),
        "rates_table": pricing.get("provider") or NA,
        "model_key": pricing.get("model_key") or NA,
        "input_rate": fmt_num(pricing.get("input_rate_per_mtok"), "g"),
        "output_rate": fmt_num(pricing.get("output_rate_per_mtok"), "g"),
        "rate_type": pricing.get("rate_type") or NA,
        "table_found": _yes_no(pricing.get("table_found")),
        "source": pricing.get("source") or NA,
        "rows": rows,
    }


def _yes_no(value: Any) -> str:
    return {True: "yes", False: "no"}[value] if isinstance(value, bool) else NA


def _condition_order(name: str) -> tuple[int, str]:
    return (CONDITIONS.index(name) if name in CONDITIONS else len(CONDITIONS), str(name))


# ---------------------------------------------------------------- provider


def provider_view(name: Any) -> dict[str, Any]:
    """Who answered the requests, as a report header shows it: `name` (n/a when unknown), `simulated` and `label`
    (`SIMULATED_LABEL` for the offline emulator, else None), and `api`, the API it spoke."""
    shown = str(name) if name else NA
    provider, _, api = shown.partition("/")
    simulated = provider in SIMULATED_PROVIDERS
    return {"name": shown, "simulated": simulated, "label": SIMULATED_LABEL if simulated else None,
            "api": API_TITLES.get(api or "fireworks", api)}


def _provider_name(ctx: dict[str, Any]) -> Any:
    """The ctx's `provider` (the config's provider.name), else the one costs.json records. costs.json's
    `pricing.provider` is never used: it names the rates table, which for the emulator is Fireworks'."""
    return ctx.get("provider") or _get(ctx.get("costs"), "provider")


# ---------------------------------------------------------------- trial report


def _header(ctx: dict[str, Any], temps: list[str]) -> dict[str, Any]:
    trial = ctx.get("trial") if isinstance(ctx.get("trial"), dict) else {}
    max_tokens = trial.get("max_new_tokens") if isinstance(trial.get("max_new_tokens"), dict) else {}
    samples = _by_temp(ctx.get("samples_per_item"))
    return {
        "slug": trial.get("slug") or NA,
        "model": trial.get("model") or NA,
        "prompt_set": trial.get("prompt_set") or NA,
        "top_p": NA if trial.get("top_p") is None else fmt_num(trial["top_p"], "g"),
        "top_k": NA if trial.get("top_k") is None else fmt_int(trial["top_k"]),
        "max_closed": fmt_int(max_tokens.get("closed_book")),
        "max_open": fmt_int(max_tokens.get("open_book")),
        "temps": ", ".join(temps) or NA,
        "samples": " · ".join(f"T={t}: {fmt_int(samples.get(t))}" for t in temps) or NA,
    }


def _prompt_rows(prompts: Any) -> list[dict[str, str]]:
    prompts = prompts if isinstance(prompts, dict) else {}
    rows = []
    for condition in sorted(set(CONDITIONS) | set(prompts), key=_condition_order):
        info = prompts.get(condition) if isinstance(prompts.get(condition), dict) else {}
        sha = info.get("sha256")
        rows.append({"condition": condition.capitalize(), "tokens": fmt_int(info.get("tokens")),
                     "sha256": f"`{str(sha)[:12]}`" if sha else NA, "sha256_full": str(sha) if sha else NA,
                     "path": info.get("path") or NA})
    return rows


def _job_rows(jobs: Any) -> list[dict[str, str]]:
    jobs = jobs if isinstance(jobs, dict) else {}
    rows = []
    for key in sorted(jobs, key=_natural):
        info = jobs[key] if isinstance(jobs[key], dict) else {}
        rows.append({"key": str(key), "job_id": info.get("job_id") or NA, "state": info.get("state") or NA})
    return rows


def _natural(key: Any) -> list[tuple[int, int | str]]:
    """Sort key that compares digit runs as numbers: t0_… before t07_… before t10_…, p2 before p10."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", str(key)) if part]


def render_trial_report(ctx: dict[str, Any]) -> str:
    """report.md for one trial (ctx as for `trial_view`)."""
    return _env().get_template("report.md.j2").render(**trial_view(ctx))


def trial_view(ctx: dict[str, Any]) -> dict[str, Any]:
    """The display strings of one trial's report (shared by report.md and report.html).

    ctx: `rid`, `provider` (the config's provider.name; when absent, costs.json's `provider`),
    `trial{slug, model, prompt_set, top_p, top_k, max_new_tokens{closed_book, open_book}}`,
    `temps` [float], `samples_per_item{temp_str: int}`, `prompts{condition: {path, sha256, tokens}}`,
    `per_item` (per_item_scores.csv as a DataFrame), `significance` (significance.json), `costs` (costs.json),
    `score_summary` (status counts, may be empty), `jobs{jkey: {job_id, state}}`, `config_hash`, and optionally
    `unanswerable` (unanswerable_rules.json).
    """
    items = _prepare_items(ctx.get("per_item"))
    temps = _sorted_temps(_temp_key(t) for t in ctx.get("temps") or [])
    significance = _by_temp(_get(ctx.get("significance"), "results"))
    family = _family(ctx.get("significance"))
    cfg = _get(ctx.get("significance"), "stats_config")
    cfg = cfg if isinstance(cfg, dict) else {}
    sections = []
    for temp in temps:
        sig_at_temp = significance.get(temp)
        sections.append({
            "temp": temp,
            "rules": _rules_view(ctx.get("unanswerable"), temp),
            "family": _family_view(family, temp),
            "types": [{"key": t, "title": TYPE_TITLES[t], "rows": _results_rows(items, temp, t),
                       "table": _metric_table(items, temp, t, _get(sig_at_temp, t), family),
                       "significance": _significance_view(_get(sig_at_temp, t), f"T={temp}/{t}", family, cfg)}
                      for t in TYPES],
        })
    view = {
        "rid": ctx.get("rid") or NA,
        "provider": provider_view(_provider_name(ctx)),
        "header": _header(ctx, temps),
        "prompts": _prompt_rows(ctx.get("prompts")),
        "status_line": _status_line(ctx.get("score_summary")),
        "balance": _balance_rows(items, temps),
        "metric_names": list(METRICS.values()),
        "sections": sections,
        "cost": _cost_view(ctx.get("costs")),
        "config_hash": ctx.get("config_hash") or NA,
        "jobs": _job_rows(ctx.get("jobs")),
        "methods": _methods_lines(ctx.get("significance")),
        "selective_definition": SELECTIVE_DEFINITION,
        "unanswerable_rule": UNANSWERABLE_RULE,
    }
    return view


# ---------------------------------------------------------------- aggregate report


def _arrow(group: pd.DataFrame, metric: str, type_: str, columns: pd.Index) -> str:
    cells = [_metric_cell(group[group["condition"] == c], metric, type_, columns) for c in CONDITIONS]
    return " → ".join(cells)


# the (task type, metric) deltas of the run report, in column order
AGGREGATE_DELTAS: tuple[tuple[str, str], ...] = (("closed", "em"), ("closed", "f1"), ("open", "em"), ("open", "f1"))


def _delta_cells(block: Any) -> dict[str, str]:
    """A delta and its 95% CI as two display strings (the run report shows them in separate columns)."""
    return {"delta": fmt_pp(_get(block, "delta_mean")), "ci": fmt_ci_pp(_get(block, "ci_95"))}


def _aggregate_rows(trial: dict[str, Any]) -> list[dict[str, Any]]:
    items = _prepare_items(trial.get("per_item"))
    significance = _by_temp(_get(trial.get("significance"), "results"))
    costs = trial.get("costs") if isinstance(trial.get("costs"), dict) else {}
    cost_by_temp = _by_temp(costs.get("by_temp"))
    temps = _sorted_temps(set(items["temp_key"]) | set(significance) | set(cost_by_temp))
    rows = []
    for temp in temps or [NA]:  # a trial without any data still gets its row
        scored = items[(items["temp_key"] == temp) & items["scored"]]
        closed, opened = scored[scored["type"] == "closed"], scored[scored["type"] == "open"]
        rows.append({
            "slug": trial.get("slug") or NA, "model": trial.get("model") or NA,
            "prompt_set": trial.get("prompt_set") or NA, "temp": temp,
            "em_closed": _arrow(closed, "em", "closed", items.columns),
            "f1_closed": _arrow(closed, "f1", "closed", items.columns),
            "em_open": _arrow(opened, "em", "open", items.columns),
            "f1_open": _arrow(opened, "f1", "open", items.columns),
            "deltas": [_delta_cells(_get(significance.get(temp), type_, "metrics", metric))
                       for type_, metric in AGGREGATE_DELTAS],
            "usd": fmt_usd(_get(cost_by_temp.get(temp), "usd")),
        })
    return rows


def _aggregate_ci_note(trials: list[dict[str, Any]]) -> str:
    """The CI method and resample counts the trials' significance.json files record."""
    methods = sorted({m.replace("_", " ") for t in trials for m in _values_of(_get(t.get("significance"), "results"),
                                                                              "ci_method")})
    counts = sorted({int(n) for t in trials
                     if (n := _number(_get(t.get("significance"), "stats_config", "bootstrap_samples"))) is not None})
    return (f"Deltas are treatment − control in percentage points with 95% CIs: {', '.join(methods) or NA} over "
            f"the paired items, B = {', '.join(f'{n:,}' for n in counts) or NA} resamples.")


def render_aggregate_report(ctx: dict[str, Any]) -> str:
    """aggregate_report.md (ctx as for `aggregate_view`)."""
    return _env().get_template("aggregate_report.md.j2").render(**aggregate_view(ctx))


def aggregate_view(ctx: dict[str, Any]) -> dict[str, Any]:
    """The display strings of the run's report: one row per trial × temperature, then the run's total cost.

    ctx: `rid`, `provider` (the config's provider.name; when absent, the one the trials' costs.json record if they
    agree), `trials` [{slug, model, prompt_set, per_item (DataFrame), significance, costs}]. Trials keep
    the given order; temperatures within a trial are increasing. A row's usd is what that trial consumed at that
    temperature, shared parts included; `total_usd` is the run's spend over distinct parts
    (`pipeline.costs.run_spent_usd`, each shared part counted once, in its owner's `owned_usd`), `shared_usd` the
    money in the rows that another trial's figure already counts, and `unpriced` the trials without an owned_usd.
    """
    trials = [t for t in ctx.get("trials") or [] if isinstance(t, dict)]
    rows = [row for trial in trials for row in _aggregate_rows(trial)]
    costs = [t.get("costs") for t in trials]
    total = run_spent_usd(costs)
    shared = [_number(_get(c, "shared_usd")) for c in costs]
    recorded = {str(name) for name in (_get(c, "provider") for c in costs) if name}
    provider = ctx.get("provider") or (recorded.pop() if len(recorded) == 1 else None)
    return {"rid": ctx.get("rid") or NA, "provider": provider_view(provider), "rows": rows, "total_usd": fmt_usd(total),
            "delta_columns": [f"Δ{METRICS[m]} ({t})" for t, m in AGGREGATE_DELTAS],
            "ci_note": _aggregate_ci_note(trials),
            "n_trials": len(trials),
            "unpriced": sum(owned_usd(c) is None for c in costs),
            "shared_usd": fmt_usd(sum(u for u in shared if u is not None)) if total is not None else NA}
