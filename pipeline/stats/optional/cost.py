"""cost_effectiveness.json: extra USD the treatment costs per percentage point it gains, per temperature.

Costs come from costs.json (`pipeline.costs.summarize_costs`): `by_condition_temp[temp_str][condition]["usd"]`,
already priced with the trial's own model and the provider table. Nothing is re-priced here (the original
re-priced with default rates), and `pricing` is costs.json's own block.
Effects are paired mean deltas (treatment − control) over the paired items where the metric is defined,
exactly the population of significance.json's `delta_mean` (em and f1: both task types pooled; false_answer_rate:
the open-book items). The original used unpaired condition means and |delta|, so a loss looked like a gain.
usd_per_1pp_gain_{em,f1} = usd_diff / (100·delta); usd_per_1pp_reduction_false_answer = usd_diff / (100·(−delta)).
A ratio is None unless it means "extra cost per point gained"; `outcome` says which case applies:
- `cost_per_gain`: gain > 0 and usd_diff ≥ 0 (the ratio is given, ≥ 0);
- `no_gain`: the treatment does not improve the metric (gain ≤ 1e-12, absorbing float noise);
- `cheaper_and_better`: gain > 0 while the treatment costs less (a negative "cost per gain" would mislead);
- `no_data`: no paired items, or no cost for one of the conditions at that temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from pipeline.naming import temp_str
from pipeline.stats.optional.common import paired_values, prepare_per_item
from pipeline.stats.significance import json_safe

METRICS: tuple[str, ...] = ("em", "f1", "false_answer_rate")
# output key -> (metric, sign that turns the delta into a gain)
RATIOS: dict[str, tuple[str, float]] = {
    "usd_per_1pp_gain_em": ("em", 1.0),
    "usd_per_1pp_gain_f1": ("f1", 1.0),
    "usd_per_1pp_reduction_false_answer": ("false_answer_rate", -1.0),
}
_MIN_GAIN = 1e-12


def _usd(costs: dict[str, Any], tkey: str, condition: str) -> float | None:
    block = (costs.get("by_condition_temp") or {}).get(tkey, {}).get(condition)
    if not block or block.get("usd") is None:
        return None
    return float(block["usd"])


def _ratio(usd_diff: float | None, delta: float | None, sign: float) -> tuple[float | None, str]:
    if usd_diff is None or delta is None:
        return None, "no_data"
    gain = sign * delta
    if gain <= _MIN_GAIN:
        return None, "no_gain"
    if usd_diff < 0:
        return None, "cheaper_and_better"
    return usd_diff / (100.0 * gain), "cost_per_gain"


def cost_effectiveness(
    per_item: pd.DataFrame, costs: dict[str, Any], *, temps: Sequence[float] | None = None
) -> dict[str, Any]:
    """The cost_effectiveness.json document (module docstring).

    `temps` defaults to every temperature in per_item or costs.json. Returns `{pricing, source, results:
    {temp_str: {usd_control, usd_treatment, usd_diff, delta_metrics{em, f1, false_answer_rate}, n_items{…},
    usd_per_1pp_gain_em, usd_per_1pp_gain_f1, usd_per_1pp_reduction_false_answer, outcome{<ratio key>: …}}}}`.
    """
    frame = prepare_per_item(per_item)
    if temps is None:
        found = {float(t) for t in frame["temp"]} | {float(k) for k in costs.get("by_condition_temp") or {}}
        temps = sorted(found)
    results: dict[str, Any] = {}
    for temp in sorted({float(t) for t in temps}):
        tkey = temp_str(temp)
        usd_control, usd_treatment = _usd(costs, tkey, "control"), _usd(costs, tkey, "treatment")
        usd_diff = None if usd_control is None or usd_treatment is None else round(usd_treatment - usd_control, 6)
        deltas: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        for metric in METRICS:
            ctrl, trt = paired_values(frame, metric, tkey)
            counts[metric] = len(ctrl)
            deltas[metric] = float((trt - ctrl).mean()) if len(ctrl) else None
        entry: dict[str, Any] = {
            "usd_control": usd_control,
            "usd_treatment": usd_treatment,
            "usd_diff": usd_diff,
            "delta_metrics": deltas,
            "n_items": counts,
            "outcome": {},
        }
        for key, (metric, sign) in RATIOS.items():
            entry[key], entry["outcome"][key] = _ratio(usd_diff, deltas[metric], sign)
        results[tkey] = entry
    return json_safe(
        {
            "pricing": costs.get("pricing"),
            "source": "costs.json by_condition_temp (priced with the trial's model); paired per-item deltas",
            "results": results,
        }
    )
