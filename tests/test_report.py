"""Markdown reports: sections, units, `—` vs `n/a`, robustness to missing blocks, determinism."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pandas as pd
import pytest

from pipeline.report.render import SIMULATED_LABEL, render_aggregate_report, render_trial_report
from pipeline.stats.significance import compute_significance

NAN = float("nan")


def _row(key: str, type_: str, condition: str, temp: float, em: float, f1: float, abstain: float = 0.0,
         false_answer: float = NAN, unsupported: float = NAN, n_samples: int = 1,
         n_excluded: int = 0) -> dict[str, Any]:
    return {"abstain_rate": abstain, "abstain_rate_std": 0.0, "condition": condition, "em": em, "em_std": 0.0,
            "f1": f1, "f1_std": 0.0, "false_answer_rate": false_answer, "false_answer_rate_std": NAN,
            "item_key": key, "temp": temp, "type": type_, "unsupported_rate": unsupported,
            "unsupported_rate_std": NAN, "n_samples": n_samples, "n_excluded": n_excluded}


def per_item() -> pd.DataFrame:
    rows = []
    for temp in (0.0, 0.7):
        rows += [
            _row("triviaqa|q1", "closed", "control", temp, 1.0, 1.0),
            _row("triviaqa|q2", "closed", "control", temp, 0.0, 0.5),
            _row("triviaqa|q1", "closed", "treatment", temp, 1.0, 1.0),
            _row("triviaqa|q2", "closed", "treatment", temp, 1.0, 0.75),
            _row("squad_v2|o1", "open", "control", temp, 0.0, 0.2, false_answer=1.0, unsupported=1.0),
            _row("squad_v2|o2", "open", "control", temp, 1.0, 1.0, false_answer=0.0, unsupported=0.0),
            _row("squad_v2|o1", "open", "treatment", temp, 1.0, 1.0, abstain=1.0, false_answer=0.0, unsupported=0.0),
            _row("squad_v2|o2", "open", "treatment", temp, NAN, NAN, false_answer=NAN, unsupported=NAN,
                 n_samples=0, n_excluded=2),
        ]
    return pd.DataFrame(rows)


def significance() -> dict[str, Any]:
    em = {"n_items": 2, "delta_mean": 0.5, "ci_95": [0.0, 1.0], "wilcoxon": {"W": 0.0, "p_value": 0.0123,
          "q_value": 0.0456}, "hodges_lehmann": 0.5, "cohens_d": 0.7071, "cliffs_delta": 1.0, "perm_p_value": 0.00001}
    return {
        "schema_version": 2,
        "temps": [0.0, 0.7],
        "results": {
            "0.0": {
                "closed": {
                    "n_items": 2,
                    "mcnemar": {"b": 7, "c": 2, "p_exact": 0.0898, "odds_ratio": 3.0, "or_ci_95": [0.6, 15.2],
                                "q_value": 0.18, "or_ci_method": "clopper_pearson"},
                    "metrics": {"em": em, "abstain_rate": {"n_items": 2, "delta_mean": 0.0, "ci_95": None,
                                                           "wilcoxon": None}},
                    "tost": {"em": {"margin": 0.01, "alpha": 0.05, "p_value": 0.02, "non_inferior": True,
                                    "mean_delta": 0.5}},
                    "selective_risk": {"aurc": {"control": 0.25, "treatment": 0.125}},
                },
                "open": {"n_items": 1, "mcnemar": None},
            }
        },
    }


def costs() -> dict[str, Any]:
    block = {"prompt_tokens": 5000, "completion_tokens": 100, "total_tokens": 5100, "usd": 0.0123}
    return {
        "prompt_tokens": 10000, "completion_tokens": 200, "total_tokens": 10200, "usd": 0.0246,
        "owned_usd": 0.0246, "shared_usd": 0.0,
        "batch_discount_applied": True, "usage_records": 16,
        "pricing": {"provider": "fireworks", "model_key": "accounts/fireworks/models/gpt-oss-20b",
                    "input_rate_per_mtok": 0.035, "output_rate_per_mtok": 0.15, "rate_type": "batch_discount",
                    "table_found": True, "use_batch_api": True,
                    "source": "input: pricing.providers.fireworks['m'].input_per_mtok × discount"},
        "by_condition": {"control": block, "treatment": block},
        "by_temp": {"0.0": block, "0.7": block},
        "by_condition_temp": {"0.0": {"control": block, "treatment": block}},
    }


def context() -> dict[str, Any]:
    return {
        "rid": "run-1",
        "trial": {"slug": "gpt-oss-20b-default", "model": "accounts/fireworks/models/gpt-oss-20b",
                  "prompt_set": "default", "top_p": 1.0, "top_k": 50,
                  "max_new_tokens": {"closed_book": 64, "open_book": 256}},
        "temps": [0.0, 0.7],
        "samples_per_item": {"0.0": 1, "0.7": 3},
        "prompts": {"control": {"path": "prompts/control.txt", "sha256": "a" * 64, "tokens": 12},
                    "treatment": {"path": "prompts/treatment.txt", "sha256": "b" * 64, "tokens": 345}},
        "per_item": per_item(),
        "significance": significance(),
        "costs": costs(),
        "score_summary": {"status_counts": {"ok": 12, "provider_error": 3, "truncated": 1}},
        "jobs": {"t0_control_p00": {"job_id": "job-abc", "state": "COMPLETED"}},
        "config_hash": "cafebabe",
    }


def _section(text: str, start: str, end: str | None = None) -> str:
    tail = text[text.index(start):]
    return tail if end is None else tail[:tail.index(end, len(start))]


def _table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def test_trial_report_sections_and_header() -> None:
    text = render_trial_report(context())
    assert text.startswith("# Evaluation Report — gpt-oss-20b-default\n")
    for heading in ("## Prompts", "## Data balance", "## Results @ T=0.0", "## Results @ T=0.7", "### Closed-book",
                    "### Open-book", "### Significance", "## Cost", "## Provenance"):
        assert heading in text
    assert "T=0.0: 1 · T=0.7: 3" in text
    prompts = _section(text, "## Prompts", "## Data balance")
    assert "`aaaaaaaaaaaa`" in prompts and "a" * 13 not in prompts
    provenance = _section(text, "## Provenance")
    assert f"Control prompt sha256: `{'a' * 64}`" in provenance and f"Treatment prompt sha256: `{'b' * 64}`" in provenance
    assert "Config hash: `cafebabe`" in provenance and "Model: `accounts/fireworks/models/gpt-oss-20b`" in provenance
    assert "job-abc" in provenance and "COMPLETED" in provenance


def test_results_tables_use_percentages_and_dash_for_inapplicable_metrics() -> None:
    results = _section(render_trial_report(context()), "## Results @ T=0.0", "### Significance")
    closed = _section(results, "### Closed-book", "### Open-book")
    control = _table_row(closed, "Control")
    # EM, F1, Abstain, False-Ans, Unsupported, n
    assert control == ["Control", "50.0%", "75.0%", "0.0%", "—", "—", "2"]
    assert _table_row(closed, "Treatment")[2] == "87.5%"
    opened = _section(results, "### Open-book")
    # the treatment item whose samples all failed is excluded, not scored as zero
    assert _table_row(opened, "Treatment") == ["Treatment", "100.0%", "100.0%", "100.0%", "0.0%", "0.0%", "1"]
    assert _table_row(opened, "Control")[4] == "50.0%"


def test_closed_book_blank_f1_is_missing_not_zero() -> None:
    ctx = context()
    frame = ctx["per_item"]
    frame.loc[frame["type"] == "closed", "f1"] = NAN  # original per_item_scores.csv leaves closed F1 blank
    closed = _section(render_trial_report(ctx), "### Closed-book", "### Open-book")
    assert _table_row(closed, "Control")[2] == "n/a"
    assert "0.0%" not in _table_row(closed, "Control")[2]


def test_absent_metric_columns_render_dash() -> None:
    ctx = context()
    ctx["per_item"] = ctx["per_item"].drop(columns=["unsupported_rate", "unsupported_rate_std"])
    opened = _section(render_trial_report(ctx), "### Open-book", "### Significance")
    assert _table_row(opened, "Control")[5] == "—"


def test_significance_section_is_printed_with_mcnemar_and_metric_rows() -> None:
    text = render_trial_report(context())
    sig = _section(text, "### Significance", "## Results @ T=0.7")
    closed = _section(sig, "#### Closed-book", "#### Open-book")
    assert "b = 7, c = 2, exact p = 0.0898, q = 0.18" in closed
    assert "odds ratio = 3 (95% CI 0.6–15.2; method: clopper_pearson)" in closed
    em = _table_row(closed, "EM")
    assert em == ["EM", "+50.00 pp", "[+0.00, +100.00] pp", "0.0123", "0.0456", "+50.00 pp", "0.707", "1.000",
                  "<1e-4"]
    # a metric block with None entries renders n/a instead of raising
    assert _table_row(closed, "Abstain")[2:5] == ["n/a", "n/a", "n/a"]
    assert "Non-inferiority (one-sided t test, H0: Δ ≤ −margin), EM: margin 1.00 pp, α = 0.05, p = 0.02 → non-inferior" in closed
    assert "control 0.2500 · treatment 0.1250" in closed
    opened = _section(sig, "#### Open-book")
    assert "binarised at ≥ 0.5 (K > 1 samples: EM on at least half of them): n/a" in opened
    assert "Per-metric tests: n/a" in opened


@pytest.mark.parametrize("significance", [{}, {"results": None}, {"results": {"0.0": None}}, None])
def test_missing_optional_blocks_render_na_without_raising(significance: Any) -> None:
    ctx = context()
    ctx.update(significance=significance, costs={}, score_summary={}, jobs={}, prompts={})
    text = render_trial_report(ctx)
    assert "Significance: n/a" in text
    assert "Estimated USD: n/a" in text
    assert "Prediction rows by status: n/a" in text
    assert "Jobs: n/a" in text


def test_cost_section_shows_usd_units_and_provenance() -> None:
    cost = _section(render_trial_report(context()), "## Cost", "## Provenance")
    assert "Estimated USD: $0.0246" in cost
    assert "prompt 10,000 · completion 200 · total 10,200" in cost
    assert "batch_discount" in cost and "pricing.providers.fireworks['m'].input_per_mtok" in cost
    assert _table_row(cost, "0.0")[:3] == ["0.0", "control", "5,000"]
    assert _table_row(cost, "all")[-1] == "$0.0123"


def test_data_balance_counts_scored_items_and_excluded_rows() -> None:
    balance = _section(render_trial_report(context()), "## Data balance", "## Results")
    rows = [line for line in balance.splitlines() if line.startswith("| 0.0 | Open-book")]
    assert rows == ["| 0.0 | Open-book | 2 | 1 | 1 | 2 |"]
    assert "ok 12 · provider_error 3 · truncated 1" in balance


def test_trial_report_is_deterministic() -> None:
    ctx = context()
    shuffled = copy.deepcopy(ctx)
    shuffled["per_item"] = ctx["per_item"].sample(frac=1.0, random_state=3)
    shuffled["jobs"] = {"b": {"job_id": "2", "state": "x"}, **ctx["jobs"]}
    ctx["jobs"] = {**ctx["jobs"], "b": {"job_id": "2", "state": "x"}}
    assert render_trial_report(ctx) == render_trial_report(shuffled)
    assert not re.search(r"\d{4}-\d{2}-\d{2}", render_trial_report(ctx))


def _trial(slug: str, **overrides: Any) -> dict[str, Any]:
    return {"slug": slug, "model": "accounts/fireworks/models/gpt-oss-20b", "prompt_set": "default",
            "per_item": per_item(), "significance": significance(), "costs": costs(), **overrides}


def test_aggregate_report_rows_per_trial_and_temperature() -> None:
    text = render_aggregate_report({"rid": "run-1", "trials": [_trial("a"), _trial("b", costs={}, significance={})]})
    assert text.startswith("# Aggregate Trial Comparison\n")
    assert "Run ID: `run-1`" in text
    means = _section(text, "## Means", "## Deltas")
    rows = [line for line in means.splitlines() if line.startswith("| a |") or line.startswith("| b |")]
    assert len(rows) == 4
    first = _table_row(means, "a")
    assert first[3:] == ["0.0", "50.0% → 100.0%", "75.0% → 87.5%", "50.0% → 100.0%", "60.0% → 100.0%", "$0.0123"]
    assert "Total cost: $0.0246 over the run's distinct parts, across 2 trials (1 without costs.json data)." in text
    assert render_aggregate_report({"rid": "run-1", "trials": [_trial("a")]}) == render_aggregate_report(
        {"rid": "run-1", "trials": [_trial("a")]})


def test_aggregate_report_shows_closed_and_open_deltas_with_cis_and_their_method() -> None:
    sig = significance()
    sig["stats_config"] = {"bootstrap_samples": 5000}
    sig["results"]["0.0"]["closed"]["metrics"]["em"]["ci_method"] = "percentile_bootstrap"
    sig["results"]["0.0"]["open"] = {"metrics": {"em": {"delta_mean": -0.025, "ci_95": [-0.05, 0.0]}}}
    text = render_aggregate_report({"rid": "r", "trials": [_trial("a", significance=sig)]})
    deltas = _section(text, "## Deltas")
    assert "| Trial | T | ΔEM (closed) | 95% CI | ΔF1 (closed) | 95% CI | ΔEM (open) | 95% CI | ΔF1 (open) | 95% CI |" \
        in deltas
    assert _table_row(deltas, "a")[1:] == ["0.0", "+50.00 pp", "[+0.00, +100.00] pp", "n/a", "n/a",
                                           "-2.50 pp", "[-5.00, +0.00] pp", "n/a", "n/a"]
    assert "95% CIs: percentile bootstrap over the paired items, B = 5,000 resamples." in deltas


def test_aggregate_report_keeps_a_trial_without_data() -> None:
    text = render_aggregate_report({"rid": "r", "trials": [_trial("empty", per_item=pd.DataFrame(), costs={},
                                                                  significance={})]})
    assert _table_row(text, "empty")[3:] == ["n/a", "n/a → n/a", "n/a → n/a", "n/a → n/a", "n/a → n/a", "n/a"]
    assert _table_row(_section(text, "## Deltas"), "empty")[1:] == ["n/a"] * 9
    assert "Total cost: n/a" in text


@pytest.mark.parametrize("upper", [float("inf"), None])
def test_infinite_odds_ratio_bound_is_shown_as_inf(upper: float | None) -> None:
    # significance.json stores the infinite upper bound of c = 0 as null
    ctx = context()
    mcnemar = ctx["significance"]["results"]["0.0"]["closed"]["mcnemar"]
    mcnemar.update(c=0, odds_ratio=15.0, or_ci_95=[1.9, upper])
    closed = _section(render_trial_report(ctx), "#### Closed-book", "#### Open-book")
    assert "odds ratio = 15 (95% CI 1.9–inf; method: clopper_pearson)" in closed


def test_a_null_bound_with_discordant_pairs_both_ways_stays_missing() -> None:
    ctx = context()
    ctx["significance"]["results"]["0.0"]["closed"]["mcnemar"]["or_ci_95"] = [0.5, None]
    assert "odds ratio = 3 (95% CI n/a;" in render_trial_report(ctx)


def test_jobs_are_listed_by_temperature_then_part_number() -> None:
    ctx = context()
    ctx["jobs"] = {key: {"job_id": f"id-{key}", "state": "COMPLETED"}
                   for key in ("t10_control_p1", "t07_control_p10", "t0_treatment_p1", "t07_control_p2", "t0_control_p1")}
    provenance = _section(render_trial_report(ctx), "## Provenance")
    order = re.findall(r"^\| (t\d+_\w+) \|", provenance, re.M)
    assert order == ["t0_control_p1", "t0_treatment_p1", "t07_control_p2", "t07_control_p10", "t10_control_p1"]


def test_provenance_names_the_statistical_methods() -> None:
    ctx = context()
    ctx["significance"]["stats_config"] = {"bootstrap_samples": 5000, "permutation_samples": 2000, "random_seed": 1337,
                                           "enable_permutation": True}
    ctx["significance"]["fdr"] = {"method": "benjamini_hochberg", "n_tests": 12, "scope": "every p in this file"}
    ctx["significance"]["results"]["0.0"]["closed"]["metrics"]["em"]["ci_method"] = "percentile_bootstrap"
    ctx["significance"]["results"]["0.0"]["closed"]["mcnemar"]["or_ci_method"] = "exact_cp: long explanation"
    text = render_trial_report(ctx)
    provenance = _section(text, "## Provenance")
    assert "Delta CIs: percentile bootstrap over paired items, B = 5,000 resamples, seed 1337" in provenance
    assert "Permutation p: sign-flip, R = 2,000" in provenance
    assert "q-values: Benjamini–Hochberg over a family of 12 tests; family: every p in this file" in provenance
    # an older file without a member list: the q note near the tables falls back to its scope
    assert "q: Benjamini–Hochberg-adjusted p over 12 tests; scope: every p in this file" in text
    for named in ("d_z: mean ÷ standard deviation", "Cliff's δ (unpaired)", "binarised at ≥ 0.5",
                  "only the lower test of a TOST", "abstentions included", "official SQuAD v2 rule"):
        assert named in provenance, named
    assert "McNemar odds-ratio CI: exact_cp: long explanation" in provenance
    # the explanation is given once, the McNemar lines name the method only
    assert text.count("long explanation") == 1 and "method: exact_cp)" in text


def test_significance_of_a_real_stats_run_is_printed_for_every_temperature_and_type() -> None:
    """The original never printed this section: it read significance[T]["mcnemar"]["p_value"], not the
    schema-2 results[T][type]["mcnemar"]["p_exact"]. Render what pipeline.stats writes, through JSON."""
    frame = pd.DataFrame([
        _row(f"{ds}|{type_}{i}", type_, cond, temp, em=float((i + (cond == "treatment")) % 3 > 0),
             f1=((i * 7) % 10) / 10 + (0.05 if cond == "treatment" else 0.0), abstain=float(i % 5 == 0),
             false_answer=float(i % 4 == 0) if type_ == "open" else NAN,
             unsupported=float(i % 6 == 0) if type_ == "open" else NAN)
        for temp in (0.0, 0.7) for cond in ("control", "treatment") for i in range(12)
        for type_, ds in (("closed", "triviaqa" if i % 2 else "nq_open"), ("open", "squad_v2"))])
    doc = compute_significance(frame, temps=[0.0, 0.7], stats_cfg={"bootstrap_samples": 200,
                                                                    "permutation_samples": 200})
    ctx = {**context(), "per_item": frame, "significance": json.loads(json.dumps(doc))}
    text = render_trial_report(ctx)
    for temp in ("0.0", "0.7"):
        sig = _section(text, f"## Results @ T={temp}", "## Results @ T=0.7" if temp == "0.0" else "## Cost")
        sig = _section(sig, "### Significance")
        for type_ in ("Closed-book", "Open-book"):
            block = _section(sig, f"#### {type_}", "#### Open-book" if type_ == "Closed-book" else None)
            assert "- Paired items: 12" in block
            # one sample per item: per-item EM is binary, so McNemar is the EM Wilcoxon hypothesis, left out of BH
            assert re.search(r"at least half of them\): b = \d+, c = \d+, exact p = [0-9.e<-]+, q = — "
                             r"\(per-item EM is binary: the same hypothesis as T=\d\.\d/\w+/all/em/wilcoxon", block)
            assert "95% CI: percentile bootstrap over the paired items, B = 200 resamples" in block
            key = "closed" if type_ == "Closed-book" else "open"
            for metric, name in (("EM", "em"), ("F1", "f1"), ("Abstain", "abstain_rate")):
                row = _table_row(block, metric)
                assert re.fullmatch(r"[+-]\d+\.\d\d pp", row[1]) and row[2].startswith("[") and row[3] != "n/a"
                # the current names (d_z, cliffs_delta_unpaired) are read, as the old ones are
                computed = doc["results"][temp][key]["metrics"][name]
                assert row[6:8] == [f"{computed['d_z']:.3f}", f"{computed['cliffs_delta_unpaired']:.3f}"]
            assert ("False-Ans" in block) == (type_ == "Open-book")
            assert "AURC (risk over coverage" in block and "Non-inferiority (one-sided t test" in block
        assert f"q: Benjamini–Hochberg adjusted p (false discovery rate) over one family of {doc['fdr']['n_tests']} " in sig
        members = [m.split("/", 1)[1] for m in doc["fdr"]["family"] if m.startswith(f"T={temp}/")]
        assert f"BH family members at T={temp} ({len(members)}): {', '.join(members)}" in sig
    # open-book has one dataset: its row repeats the block's test with the same interval, and is not in the family
    opened = _section(text, "## Results @ T=0.0", "## Results @ T=0.7")
    opened = _section(_section(opened, "### Significance"), "#### Open-book")
    squad, overall = _table_row(opened, "squad_v2"), _table_row(opened, "EM")
    assert squad[3] == overall[2] and squad[4] == overall[3] and squad[5] == "—" and overall[4] != "—"
    closed = _section(text, "## Results @ T=0.0", "### Open-book")
    # closed-book F1 is the scored value, neither blank nor 0.0% (the original's report printed 0.0% here)
    assert _table_row(closed, "Control")[2] == "43.3%" and _table_row(closed, "Treatment")[2] == "48.3%"


# ---------------------------------------------------------------- the provider in the header


def _head(text: str, lines: int = 8) -> str:
    return "\n".join(text.splitlines()[:lines])


def test_emulator_reports_carry_the_simulated_label_in_their_first_lines() -> None:
    trial = render_trial_report({**context(), "provider": "emulator"})
    run = render_aggregate_report({"rid": "r", "provider": "emulator", "trials": [_trial("a")]})
    for text in (trial, run):
        assert f"> **{SIMULATED_LABEL}.**" in _head(text, 4)
        assert "emulator" in _head(text)
    assert "- Provider: emulator" in trial and "Provider: emulator" in run


def test_fireworks_reports_name_the_provider_without_the_label() -> None:
    trial = render_trial_report({**context(), "provider": "fireworks"})
    run = render_aggregate_report({"rid": "r", "provider": "fireworks", "trials": [_trial("a")]})
    for text in (trial, run):
        assert SIMULATED_LABEL not in text and "SIMULATED" not in text
    assert "- Provider: fireworks" in _head(trial) and "Provider: fireworks" in _head(run)


def test_without_a_provider_the_one_costs_json_records_is_shown_never_the_rates_table() -> None:
    recorded = {**costs(), "provider": "emulator"}
    assert SIMULATED_LABEL in render_trial_report({**context(), "costs": recorded})
    assert SIMULATED_LABEL in render_aggregate_report({"rid": "r", "trials": [_trial("a", costs=recorded)]})
    # costs.json of an older run names only its rates table (`pricing.provider`), which for the emulator is Fireworks'
    old = render_trial_report(context())
    assert "- Provider: n/a" in old and "SIMULATED" not in old
    assert "priced with the fireworks rates" in _section(old, "## Cost", "## Provenance")


def test_open_book_results_show_the_official_unanswerable_rule_beside_the_detector_one() -> None:
    ctx = context()
    cond = {"n_unanswerable": 2, "unanswerable_em_detector": 1.0, "unanswerable_em_official": 0.5,
            "em_detector": 0.75, "em_official": 0.5, "f1_detector": 0.8, "f1_official": 0.55}
    ctx["unanswerable"] = {"results": {"0.0": {"control": cond, "treatment": cond,
                                               "delta": {"em_detector": 0.0, "em_official": -0.125}}}}
    text = render_trial_report(ctx)
    at_zero = _section(text, "## Results @ T=0.0", "## Results @ T=0.7")
    rules = _section(at_zero, "#### Open-book under the official unanswerable rule", "### Significance")
    assert "only when the prediction normalizes to the empty string" in rules
    assert _table_row(rules, "Control") == ["Control", "2", "100.0%", "50.0%", "75.0%", "50.0%", "80.0%", "55.0%"]
    assert _table_row(rules, "Δ (trt − ctrl)")[4:6] == ["+0.00 pp", "-12.50 pp"]
    # T=0.7 has no entry, and a report without the file says so instead of raising
    assert "Official-rule scores: n/a" in _section(text, "## Results @ T=0.7")
    assert "Official-rule scores: n/a" in render_trial_report(context())
