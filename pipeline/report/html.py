"""Render `report.html` per trial and `aggregate_report.html` for the run: self-contained pages (inline CSS and SVG
charts, no scripts, no fonts, no URLs; the only links are in-page anchors and, on the run page, relative links to
the trials' pages), from the same inputs and display strings as the Markdown reports.

Charts (`pipeline.report.charts`): per temperature, a forest plot of treatment − control deltas with their 95%
CIs per task type × dataset × metric; selective-risk curves (risk over coverage) per temperature × task type;
costs per temperature × condition; data balance (scored items per condition). The run page has a forest plot of
ΔEM and ΔF1 per trial × temperature × task type and the cost per trial.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Any

import jinja2

from pipeline.naming import CONDITIONS, TYPES
from pipeline.report.charts import Interval, bar_chart, forest_plot, line_chart
from pipeline.report.render import (
    _TEMPLATES,
    METRICS,
    NA,
    TYPE_TITLES,
    _by_temp,
    _get,
    _number,
    _pair,
    _sorted_temps,
    _temp_key,
    aggregate_view,
    fmt_num,
    fmt_usd,
    trial_view,
)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(_TEMPLATES)), undefined=jinja2.StrictUndefined,
                              autoescape=True, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _interval(label: str, block: Any, group: str) -> Interval:
    ci = _pair(_get(block, "ci_95"))
    return Interval(label, _number(_get(block, "delta_mean")), ci[0] if ci else None, ci[1] if ci else None, group)


def _forest_rows(sig_at_temp: Any) -> list[Interval]:
    """Rows per task type × (all items, then each dataset when there are several) × metric."""
    rows: list[Interval] = []
    for type_ in TYPES:
        block = _get(sig_at_temp, type_)
        if not isinstance(block, dict):
            continue
        scopes: list[tuple[str, Any]] = [("all datasets", block)]
        datasets = _get(block, "subgroups", "dataset")
        if isinstance(datasets, dict) and len(datasets) > 1:
            scopes += [(str(name), datasets[name]) for name in sorted(datasets, key=str)]
        elif isinstance(datasets, dict) and len(datasets) == 1:
            scopes = [(str(next(iter(datasets))), block)]
        for scope, data in scopes:
            metrics = _get(data, "metrics")
            if not isinstance(metrics, dict):
                continue
            n_items = _number(_get(data, "n_items"))
            group = f"{TYPE_TITLES[type_]} · {scope}" + ("" if n_items is None else f" · {int(n_items)} items")
            rows += [_interval(name, metrics.get(key), group) for key, name in METRICS.items() if key in metrics]
    return rows


def _risk_series(block: Any) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    points = _get(block, "selective_risk", "points")
    for condition in CONDITIONS:
        pts = _get(points, condition)
        if isinstance(pts, list):
            pairs = [(_number(p.get("coverage")), _number(p.get("risk"))) for p in pts if isinstance(p, dict)]
            series[condition] = [(c, r) for c, r in pairs if c is not None and r is not None]
    return series


def _aurc_note(block: Any) -> str:
    aurc = _get(block, "selective_risk", "aurc")
    if not isinstance(aurc, dict):
        return ""
    return f"AURC control {fmt_num(aurc.get('control'), '.4f')} · treatment {fmt_num(aurc.get('treatment'), '.4f')}"


def trial_charts(ctx: dict[str, Any], balance: list[dict[str, Any]]) -> dict[str, Any]:
    """The SVG charts of one trial's page (ctx as for `pipeline.report.render.trial_view`; `balance` its rows)."""
    significance = _by_temp(_get(ctx.get("significance"), "results"))
    temps = _sorted_temps(_temp_key(t) for t in ctx.get("temps") or [])
    forests = [{"temp": t, "svg": forest_plot(_forest_rows(significance.get(t)), title=f"Treatment − control at T={t}",
                                              subtitle="per task type, dataset and metric; 95% bootstrap CIs")}
               for t in temps]
    risks = [{"temp": t, "type": TYPE_TITLES[ty],
              "svg": line_chart(_risk_series(_get(significance.get(t), ty)), title=f"T={t} · {TYPE_TITLES[ty]}",
                                subtitle=_aurc_note(_get(significance.get(t), ty)), x_label="coverage",
                                y_label="risk (1 − accuracy)", y_max=1.0)}
             for t in temps for ty in TYPES]
    costs = ctx.get("costs") if isinstance(ctx.get("costs"), dict) else {}
    by_condition_temp = _by_temp(costs.get("by_condition_temp"))
    cost_bars = [(f"T={t} · {c}", _number(_get(by_condition_temp.get(t), c, "usd")), c)
                 for t in _sorted_temps(by_condition_temp) for c in CONDITIONS]
    return {
        "forests": forests,
        "risks": risks,
        "costs": bar_chart(cost_bars, title="Cost by temperature and condition (USD)", prefix="$", width=400),
        "balance": bar_chart([(f"T={b['temp']} · {b['type_key']} · {c}", b["counts"][c], c) for b in balance
                              for c in CONDITIONS], title="Scored items per condition", decimals=0, width=400),
    }


def _job_summary(jobs: list[dict[str, str]]) -> str:
    """`20 batch jobs: completed 20`, states by frequency (then name)."""
    counts = Counter(job["state"] for job in jobs)
    states = ", ".join(f"{state} {n}" for state, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{len(jobs)} batch job{'' if len(jobs) == 1 else 's'}: {states}"


def render_trial_html(ctx: dict[str, Any]) -> str:
    """report.html for one trial; ctx as for `pipeline.report.render.trial_view`."""
    view = trial_view(ctx)
    return _env().get_template("report.html.j2").render(**view, charts=trial_charts(ctx, view["balance"]),
                                                        job_summary=_job_summary(view["jobs"]))


def aggregate_charts(ctx: dict[str, Any]) -> dict[str, Any]:
    """The SVG charts of the run's page (ctx as for `pipeline.report.render.aggregate_view`)."""
    rows: list[Interval] = []
    cost_bars = []
    for trial in (t for t in ctx.get("trials") or [] if isinstance(t, dict)):
        slug = str(trial.get("slug"))
        significance = _by_temp(_get(trial.get("significance"), "results"))
        for t in _sorted_temps(significance):
            for ty in TYPES:
                metrics = _get(significance[t], ty, "metrics")
                rows += [_interval(f"{METRICS[m]} · T={t} · {TYPE_TITLES[ty]}", _get(metrics, m), slug)
                         for m in ("em", "f1") if isinstance(_get(metrics, m), dict)]
        cost_bars.append((slug, _number(_get(trial.get("costs"), "usd")), "trial"))
    return {"forest": forest_plot(rows, title="Treatment − control per trial",
                                  subtitle="EM and F1 per temperature and task type; 95% bootstrap CIs"),
            "costs": bar_chart(cost_bars, title="Cost per trial (USD)", prefix="$", width=1036)}


def _trial_rows(ctx: dict[str, Any]) -> list[dict[str, str]]:
    """One row per trial for the run page: its identity, a relative link to its page (or ""), its cost."""
    return [{"slug": str(t.get("slug") or NA), "model": str(t.get("model") or NA),
             "prompt_set": str(t.get("prompt_set") or NA), "href": str(t.get("report_href") or ""),
             "usd": fmt_usd(_get(t.get("costs"), "usd"))}
            for t in ctx.get("trials") or [] if isinstance(t, dict)]


def render_aggregate_html(ctx: dict[str, Any]) -> str:
    """aggregate_report.html for the run; ctx as for `pipeline.report.render.aggregate_view`, and each trial may
    carry `report_href`, its report.html relative to the run page."""
    return _env().get_template("aggregate_report.html.j2").render(**aggregate_view(ctx), charts=aggregate_charts(ctx),
                                                                  trials=_trial_rows(ctx))
