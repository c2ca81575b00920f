"""Entry point of the optional analyses: one JSON document per enabled analysis, written next to significance.json,
plus unanswerable_rules.json (the report's official SQuAD v2 rule column) whenever the scored rows are given.

`optional_analyses(...)` returns `{name: document}` for the enabled analyses; the file of each is
`OUTPUT_FILES[name]` (the original's names). `cfg` keys (all optional, unknown keys refused):
- enable_power_analysis, enable_cost_effectiveness, enable_unsupported_sensitivity, enable_mixed_effects:
  default True, as in the original;
- alpha (0.05), power (0.8), power_metric ("false_answer_rate"), power_targets ((0.02, 0.05, 0.1));
- seed (1337), bootstrap_samples (5000), sensitivity_thresholds (0.0 … 1.0 by 0.1),
  unsupported_threshold (the scorer's abstention gate, 0.5); mixed_max_rows (200 000).
The mixed model uses the per-sample scored rows when given, else the per-item rows. Bad inputs raise
ValueError (an analysis that cannot be computed is a visible failure, not an empty file); only the mixed
model reports its fitting failures inside its document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from pipeline.stats.optional.cost import cost_effectiveness
from pipeline.stats.optional.mixed import DEFAULT_MAX_ROWS, mixed_effects
from pipeline.stats.optional.power import DEFAULT_TARGETS, power_analysis
from pipeline.stats.optional.sensitivity import DEFAULT_THRESHOLDS, unsupported_sensitivity
from pipeline.stats.unanswerable import unanswerable_rules

OUTPUT_FILES: dict[str, str] = {
    "power_analysis": "power_analysis.json",
    "cost_effectiveness": "cost_effectiveness.json",
    "unsupported_sensitivity": "unsupported_sensitivity.json",
    "mixed_models": "mixed_models.json",
    "unanswerable_rules": "unanswerable_rules.json",
}
DEFAULT_CFG: dict[str, Any] = {
    "enable_power_analysis": True,
    "enable_cost_effectiveness": True,
    "enable_unsupported_sensitivity": True,
    "enable_mixed_effects": True,
    "alpha": 0.05,
    "power": 0.8,
    "power_metric": "false_answer_rate",
    "power_targets": DEFAULT_TARGETS,
    "seed": 1337,
    "bootstrap_samples": 5000,
    "sensitivity_thresholds": DEFAULT_THRESHOLDS,
    "unsupported_threshold": 0.5,
    "mixed_max_rows": DEFAULT_MAX_ROWS,
}


def effective_cfg(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """DEFAULT_CFG overlaid with the given non-None values; ValueError naming unknown keys."""
    given = {k: v for k, v in (cfg or {}).items() if v is not None}
    unknown = sorted(set(given) - set(DEFAULT_CFG))
    if unknown:
        raise ValueError(f"unknown optional-analysis settings {unknown}; known: {sorted(DEFAULT_CFG)}")
    return {**DEFAULT_CFG, **given}


def optional_analyses(
    per_item: pd.DataFrame,
    scored_rows: pd.DataFrame | None,
    items: pd.DataFrame,
    costs: dict[str, Any] | None,
    *,
    temps: Sequence[float],
    cfg: dict[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    """`{"power_analysis", "cost_effectiveness", "unsupported_sensitivity", "mixed_models"}` → document, enabled only,
    and `unanswerable_rules` (`pipeline.stats.unanswerable`) whenever scored rows are given: it is not an optional
    analysis but the official-rule column of the report, computed here because this stage reads the responses.

    `scored_rows` is `score_predictions` output with `response_text` added (needed by the sensitivity sweep);
    `costs` is the trial's costs.json (needed by cost-effectiveness).
    """
    c = effective_cfg(cfg)
    out: dict[str, dict[str, Any]] = {}
    if c["enable_power_analysis"]:
        out["power_analysis"] = power_analysis(
            per_item, temps=temps, alpha=float(c["alpha"]), power=float(c["power"]), metric=str(c["power_metric"]),
            targets=c["power_targets"], items=items,
        )
    if c["enable_cost_effectiveness"]:
        if costs is None:
            raise ValueError("cost-effectiveness is enabled but no costs.json was given")
        out["cost_effectiveness"] = cost_effectiveness(per_item, costs, temps=temps)
    if c["enable_unsupported_sensitivity"]:
        if scored_rows is None:
            raise ValueError("unsupported sensitivity is enabled but no scored rows were given")
        out["unsupported_sensitivity"] = unsupported_sensitivity(
            scored_rows, items, thresholds=c["sensitivity_thresholds"], abstain_gate=float(c["unsupported_threshold"]),
            temps=temps, n_bootstrap=int(c["bootstrap_samples"]), seed=int(c["seed"]),
        )
    if c["enable_mixed_effects"]:
        out["mixed_models"] = mixed_effects(
            scored_rows if scored_rows is not None else per_item, enabled=True, max_rows=int(c["mixed_max_rows"]),
            seed=int(c["seed"]),
        )
    if scored_rows is not None:
        out["unanswerable_rules"] = unanswerable_rules(scored_rows, items, temps=temps)
    return out
