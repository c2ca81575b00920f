"""`compare --rid A --rid B`: two runs' metrics and paired deltas side by side (read-only).

Trials are matched by slug. For every trial, temperature, task type and metric that both runs' significance.json
hold: the control and treatment means and the treatment − control delta with its 95% CI in each run, and B − A of
the deltas. Trials in one run only, temperatures of a common trial that one run only has, and trials not finished
(no significance.json) are listed as such: nothing is dropped silently.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.control.run import open_run
from pipeline.naming import TYPES, temp_str
from pipeline.views.status import trial_status

METRIC_ORDER = ("em", "f1", "abstain_rate", "false_answer_rate", "unsupported_rate")


def _significance(run: Any, slug: str) -> dict[str, Any] | None:
    try:
        data = json.loads(run.layout.significance(slug).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("results"), dict) else None


def _cell(block: Any) -> dict[str, Any] | None:
    if not isinstance(block, dict) or block.get("delta_mean") is None:
        return None
    return {"control": block.get("control_mean"), "treatment": block.get("treatment_mean"),
            "delta": block.get("delta_mean"), "ci_95": block.get("ci_95")}


def compare_runs(rid_a: str, rid_b: str, root: str | None = None) -> dict[str, Any]:
    """`{a, b, rows: [{trial, temp, type, metric, a, b, delta_b_minus_a}], only_in_a, only_in_b, temps_only_in:
    [{trial, temp, run}], unfinished}`."""
    runs = {"a": open_run(rid_a, root), "b": open_run(rid_b, root)}
    for key, run in runs.items():
        if not run.frozen:
            raise FileNotFoundError(f"run {run.rid} has not started under {run.layout.root} (compare {key.upper()})")
    slugs = {key: [t.slug for t in run.trials] for key, run in runs.items()}
    common = [s for s in slugs["a"] if s in slugs["b"]]
    rows: list[dict[str, Any]] = []
    unfinished: list[dict[str, str]] = []
    temps_only_in: list[dict[str, str]] = []
    for slug in common:
        sig = {key: _significance(run, slug) for key, run in runs.items()}
        missing = [key for key, data in sig.items() if data is None]
        if missing:
            unfinished += [{"run": runs[key].rid, "trial": slug,
                            "state": trial_status(runs[key].layout, slug).get("state", "unknown")} for key in missing]
            continue
        results = {key: {temp_str(float(t)): block for t, block in data["results"].items()} for key, data in sig.items()}
        for key, other in (("a", "b"), ("b", "a")):
            temps_only_in += [{"trial": slug, "temp": t, "run": runs[key].rid}
                              for t in sorted(set(results[key]) - set(results[other]), key=float)]
        for temp in sorted(set(results["a"]) & set(results["b"]), key=float):
            for type_ in TYPES:
                metrics = {key: (results[key][temp].get(type_) or {}).get("metrics") or {} for key in results}
                for metric in [m for m in METRIC_ORDER if m in metrics["a"] and m in metrics["b"]]:
                    a, b = _cell(metrics["a"][metric]), _cell(metrics["b"][metric])
                    if a is None or b is None:
                        continue
                    rows.append({"trial": slug, "temp": temp, "type": type_, "metric": metric, "a": a, "b": b,
                                 "delta_b_minus_a": b["delta"] - a["delta"]})
    return {"a": rid_a, "b": rid_b, "rows": rows, "unfinished": unfinished, "temps_only_in": temps_only_in,
            "only_in_a": [s for s in slugs["a"] if s not in slugs["b"]],
            "only_in_b": [s for s in slugs["b"] if s not in slugs["a"]]}


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _pp(value: Any) -> str:
    return "n/a" if value is None else f"{value * 100:+.2f}"


def _ci(ci: Any) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2 or None in ci:
        return "n/a"
    return f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"


def render_comparison(view: dict[str, Any]) -> str:
    a, b = view["a"], view["b"]
    lines = [f"compare A = {a}  vs  B = {b}  (means control→treatment; Δ = treatment − control in pp, 95% CI)"]
    headers = ["trial", "T", "type", "metric", f"A {a}", "A Δ [CI]", f"B {b}", "B Δ [CI]", "B−A of Δ (pp)"]
    table = [[r["trial"], r["temp"], r["type"], r["metric"],
              f"{_pct(r['a']['control'])}→{_pct(r['a']['treatment'])}", f"{_pp(r['a']['delta'])} {_ci(r['a']['ci_95'])}",
              f"{_pct(r['b']['control'])}→{_pct(r['b']['treatment'])}", f"{_pp(r['b']['delta'])} {_ci(r['b']['ci_95'])}",
              _pp(r["delta_b_minus_a"])] for r in view["rows"]]
    if table:
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=False)]
        lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()
                  for row in [headers, *table]]
    else:
        lines.append("no metric is available in both runs")
    for key, label in (("only_in_a", f"only in {a}"), ("only_in_b", f"only in {b}")):
        if view[key]:
            lines.append(f"{label}: {', '.join(view[key])}")
    for item in view["temps_only_in"]:
        lines.append(f"only in {item['run']}: T={item['temp']} of {item['trial']}")
    for item in view["unfinished"]:
        lines.append(f"not finished: {item['trial']} in run {item['run']} ({item['state']})")
    return "\n".join(lines) + "\n"
