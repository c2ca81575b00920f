"""Optional analyses: power/MDE (vs statsmodels), cost-effectiveness, unsupported sensitivity, mixed model, entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import luigi
import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.power import NormalIndPower, TTestPower

from pipeline import OptionalAnalyses, TrialReport
from pipeline.costs import summarize_costs
from pipeline.scoring import score as score_module
from pipeline.scoring.score import per_item_scores, score_predictions, scored_from_arrays, scored_row_arrays
from pipeline.stats.optional import mixed
from pipeline.stats.optional.analyses import OUTPUT_FILES, optional_analyses
from pipeline.stats.optional.common import rng
from pipeline.stats.optional.cost import cost_effectiveness
from pipeline.stats.optional.mixed import mixed_effects
from pipeline.stats.optional.power import power_analysis
from pipeline.stats.optional.sensitivity import STREAM, unsupported_sensitivity
from pipeline.stats.paired import bootstrap_ci
from tests.conftest import small_experiment

Z = float(stats.norm.ppf(0.975) + stats.norm.ppf(0.8))


def dump(doc: object) -> str:
    """Strict JSON (NaN/inf refused), as the files are written."""
    return json.dumps(doc, sort_keys=True, allow_nan=False)


def per_item_frame(rows: list[tuple[str, str, float, str, dict[str, float]]]) -> pd.DataFrame:
    """Per-item rows from (item_key, type, temp, condition, {metric: value})."""
    return pd.DataFrame([{"item_key": k, "type": t, "temp": temp, "condition": c, **m} for k, t, temp, c, m in rows])


def paired_rows(key: str, type_: str, temp: float, metric: str, ctrl: float, trt: float) -> list:
    return [(key, type_, temp, "control", {metric: ctrl}), (key, type_, temp, "treatment", {metric: trt})]


def shuffled(frame: pd.DataFrame, seed: int = 7) -> pd.DataFrame:
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


# --- power analysis --------------------------------------------------------------------------------------------------
def open_items(unanswerable: list[str], answerable: list[str]) -> pd.DataFrame:
    rows = [{"dataset": "sq", "id": i, "type": "open", "is_unanswerable": True} for i in unanswerable]
    rows += [{"dataset": "sq", "id": i, "type": "open", "is_unanswerable": False} for i in answerable]
    return pd.DataFrame(rows)


def test_power_false_answer_uses_unanswerable_items_only() -> None:
    rows = []
    for key, c, t in (("u1", 1.0, 0.0), ("u2", 1.0, 1.0), ("u3", 0.5, 0.0), ("u4", 1.0, 0.5)):
        rows += paired_rows(f"sq|{key}", "open", 0.0, "false_answer_rate", c, t)
    for key in ("a1", "a2"):  # answerable: rate 0 by definition; including them would shrink mean and sd
        rows += paired_rows(f"sq|{key}", "open", 0.0, "false_answer_rate", 0.0, 0.0)
    rows += [("sq|u5", "open", 0.0, "control", {"false_answer_rate": 1.0})]  # unpaired
    doc = power_analysis(per_item_frame(rows), temps=[0.0, 0.7], items=open_items(["u1", "u2", "u3", "u4", "u5"],
                                                                                  ["a1", "a2"]))
    block = doc["results"]["0.0"]
    sd = float(np.std([-1.0, 0.0, -0.5, -0.5], ddof=1))
    assert block["n_items"] == 4 and block["mean_delta"] == pytest.approx(-0.5)
    assert block["sd_delta"] == pytest.approx(sd, abs=1e-12)
    assert block["mde"] == pytest.approx(Z * sd / 2, abs=1e-12)
    assert block["required_n_for_target"] == {
        "0.020": math.ceil((Z * sd / 0.02) ** 2), "0.050": math.ceil((Z * sd / 0.05) ** 2),
        "0.100": math.ceil((Z * sd / 0.1) ** 2),
    }
    assert block["reason"] is None
    assert doc["results"]["0.7"]["n_items"] == 0 and doc["results"]["0.7"]["mde"] is None
    assert doc["targets"] == [0.02, 0.05, 0.1] and doc["metric"] == "false_answer_rate"
    with pytest.raises(ValueError, match="prepared items"):
        power_analysis(per_item_frame(rows), temps=[0.0])


@pytest.mark.parametrize("n", [12, 40, 250])
def test_power_matches_statsmodels(n: int) -> None:
    gen = np.random.default_rng(n)
    ctrl, trt = gen.uniform(size=n), gen.uniform(size=n)
    rows = []
    for i in range(n):
        rows += paired_rows(f"d|{i}", "closed", 0.7, "em", float(ctrl[i]), float(trt[i]))
    targets = (0.02, 0.05, 0.1, 0.3)
    doc = power_analysis(per_item_frame(rows), temps=[0.7], metric="em", targets=targets, alpha=0.05, power=0.8)
    block = doc["results"]["0.7"]
    sd = float(np.std(trt - ctrl, ddof=1))
    effect = block["mde"] / sd
    # exact: the closed form solves the one-sided normal power equation at alpha/2
    assert NormalIndPower().power(effect, n, 0.025, ratio=0, alternative="larger") == pytest.approx(0.8, abs=1e-9)
    # documented: the two-sided solution also counts the opposite tail (~1e-6)
    two_sided = NormalIndPower().solve_power(None, n, 0.05, 0.8, ratio=0, alternative="two-sided")
    assert effect == pytest.approx(two_sided, rel=1e-5)
    for target in targets:
        required = block["required_n_for_target"][f"{target:.3f}"]
        exact = NormalIndPower().solve_power(target / sd, None, 0.025, 0.8, ratio=0, alternative="larger")
        assert required - 1 < exact <= required + 1e-6
        t_based = TTestPower().solve_power(target / sd, None, 0.05, 0.8)
        assert 0 < t_based - exact < 3  # the t correction adds about z²/2 ≈ 2 items


def test_power_degenerate_cases_have_reasons() -> None:
    constant = []
    for i in range(5):
        constant += paired_rows(f"d|{i}", "closed", 0.0, "em", 0.0, 0.5)
    block = power_analysis(per_item_frame(constant), temps=[0.0], metric="em")["results"]["0.0"]
    assert block["sd_delta"] == 0.0 and block["mde"] is None and "zero variance" in block["reason"]
    assert set(block["required_n_for_target"].values()) == {None}
    single = power_analysis(per_item_frame(constant[:2]), temps=[0.0], metric="em")["results"]["0.0"]
    assert single["n_items"] == 1 and single["sd_delta"] is None and "at least 2" in single["reason"]
    with pytest.raises(ValueError):
        power_analysis(per_item_frame(constant), temps=[0.0], metric="em", targets=(0.0,))


# --- cost-effectiveness ----------------------------------------------------------------------------------------------
def costs_doc(usd: dict[str, tuple[float, float]]) -> dict:
    return {
        "pricing": {"provider": "fireworks", "model_key": "m", "input_rate_per_mtok": 1.0},
        "by_condition_temp": {t: {"control": {"usd": c}, "treatment": {"usd": tr}} for t, (c, tr) in usd.items()},
    }


def effects(temp: float, em: tuple[float, float], f1: tuple[float, float], far: tuple[float, float]) -> list:
    rows = paired_rows("tq|c1", "closed", temp, "em", *em)
    rows += [(k, t, tp, c, {**m, "f1": f1[i % 2], "false_answer_rate": far[i % 2]})
             for i, (k, t, tp, c, m) in enumerate(paired_rows("sq|o1", "open", temp, "em", *em))]
    return rows


def test_cost_effectiveness_ratios_and_outcomes() -> None:
    rows = effects(0.0, (0.5, 0.6), (0.8, 0.6), (0.2, 0.15)) + effects(0.7, (0.5, 0.7), (0.5, 0.5), (0.1, 0.2))
    doc = cost_effectiveness(per_item_frame(rows), costs_doc({"0.0": (1.0, 1.5), "0.7": (2.0, 1.0)}))
    cold, warm = doc["results"]["0.0"], doc["results"]["0.7"]
    assert cold["usd_diff"] == 0.5 and cold["delta_metrics"]["em"] == pytest.approx(0.1)
    assert cold["usd_per_1pp_gain_em"] == pytest.approx(0.5 / 10)
    assert cold["usd_per_1pp_gain_f1"] is None and cold["outcome"]["usd_per_1pp_gain_f1"] == "no_gain"
    assert cold["usd_per_1pp_reduction_false_answer"] == pytest.approx(0.5 / 5)
    assert cold["n_items"] == {"em": 2, "f1": 1, "false_answer_rate": 1}
    # cheaper and better: a negative "cost per gain" would mislead; zero gain and a loss give None
    assert warm["usd_diff"] == -1.0 and warm["usd_per_1pp_gain_em"] is None
    assert warm["outcome"] == {"usd_per_1pp_gain_em": "cheaper_and_better", "usd_per_1pp_gain_f1": "no_gain",
                               "usd_per_1pp_reduction_false_answer": "no_gain"}
    assert doc["pricing"] == costs_doc({})["pricing"]
    missing = cost_effectiveness(per_item_frame(rows), costs_doc({"0.0": (1.0, 1.5)}), temps=[0.7])
    assert missing["results"]["0.7"]["usd_control"] is None
    assert set(missing["results"]["0.7"]["outcome"].values()) == {"no_data"}


def test_cost_effectiveness_never_divides_by_zero_or_goes_negative() -> None:
    for usd in ((1.0, 1.0), (1.0, 0.5), (1.0, 3.0)):
        for trt in (0.4, 0.5, 0.5 + 1e-15, 0.9):
            rows = effects(0.0, (0.5, trt), (0.5, trt), (0.5, 1.0 - trt))
            entry = cost_effectiveness(per_item_frame(rows), costs_doc({"0.0": usd}))["results"]["0.0"]
            for key in ("usd_per_1pp_gain_em", "usd_per_1pp_gain_f1", "usd_per_1pp_reduction_false_answer"):
                value = entry[key]
                assert value is None or (value >= 0 and math.isfinite(value))
                assert (value is None) == (trt <= 0.5 + 1e-12 or usd[1] < usd[0])


def test_cost_effectiveness_uses_costs_json_as_priced() -> None:
    usage = pd.DataFrame({"condition": ["control", "treatment"] * 2, "temp": [0.0, 0.0, 0.7, 0.7],
                          "prompt_tokens": [1_000_000, 2_000_000, 0, 0], "completion_tokens": [0, 0, 10, 10],
                          "total_tokens": [0, 0, 0, 0]})
    pricing = {"providers": {"fireworks": {"my/model": {"input_per_mtok": 3.0, "output_per_mtok": 9.0}}}}
    costs = summarize_costs(usage, pricing=pricing, provider="fireworks", model="my/model", use_batch_api=False)
    doc = cost_effectiveness(per_item_frame(effects(0.0, (0.5, 0.6), (0.5, 0.6), (0.5, 0.4))), costs)
    entry = doc["results"]["0.0"]
    assert (entry["usd_control"], entry["usd_treatment"], entry["usd_diff"]) == (3.0, 6.0, 3.0)  # not default rates
    assert doc["pricing"] == costs["pricing"] and doc["pricing"]["table_found"] is True
    assert sorted(doc["results"]) == ["0.0", "0.7"]


# --- unsupported sensitivity -----------------------------------------------------------------------------------------
ITEMS = pd.DataFrame([
    {"dataset": "sq", "id": "o1", "type": "open", "answers": ["mat"], "context": "The cat sat on the mat.",
     "is_unanswerable": False},
    {"dataset": "sq", "id": "o2", "type": "open", "answers": ["Paris"], "context": "Paris is the capital of France.",
     "is_unanswerable": False},
    {"dataset": "sq", "id": "o3", "type": "open", "answers": [], "context": "Nothing useful here.",
     "is_unanswerable": True},
    {"dataset": "tq", "id": "c1", "type": "closed", "answers": ["Rome"], "context": None, "is_unanswerable": False},
])
# (item, condition, sample, response); overlap fractions: "cat dog" 1/2, "paris london berlin" 1/3, "cat sat dog" 2/3
RESPONSES = [
    ("o1", "control", 0, "cat dog"), ("o1", "control", 1, "unknown"),
    ("o1", "treatment", 0, "cat mat"), ("o1", "treatment", 1, "cat sat dog"),
    ("o2", "control", 0, "Paris London Berlin"), ("o2", "control", 1, "the"),  # "the" has no token: always unsupported
    ("o2", "treatment", 0, "Paris, capital"), ("o2", "treatment", 1, "Paris London Berlin"),
    ("o3", "control", 0, "nothing here"), ("o3", "control", 1, "useful banana"),
    ("o3", "treatment", 0, "I don't know."), ("o3", "treatment", 1, "banana split"),
]


def predictions(temps: tuple[float, ...] = (0.0,)) -> pd.DataFrame:
    rows = []
    for temp in temps:
        for item, cond, k, text in RESPONSES:
            rows.append({"dataset": "sq", "item_id": item, "condition": cond, "temp": temp, "sample_index": k,
                         "type": "open", "finish_reason": "stop", "response_text": text, "error": ""})
        for cond in ("control", "treatment"):
            rows.append({"dataset": "tq", "item_id": "c1", "condition": cond, "temp": temp, "sample_index": 0,
                         "type": "closed", "finish_reason": "stop", "response_text": "Rome", "error": ""})
    rows.append({**rows[0], "sample_index": 9, "response_text": "zzz", "error": "500 from provider"})  # not scored
    return pd.DataFrame(rows)


def scored(preds: pd.DataFrame, **kwargs: object) -> pd.DataFrame:
    out = score_predictions(preds, ITEMS, unsupported_strategy="overlap", **kwargs)
    return out.assign(response_text=preds["response_text"].to_numpy())


def test_sensitivity_matches_the_scorer_at_every_threshold() -> None:
    preds = predictions((0.0, 0.7))
    thresholds = [i / 10 for i in range(11)]
    doc = unsupported_sensitivity(scored(preds), ITEMS, thresholds=thresholds, n_bootstrap=300, seed=5)
    assert doc["swept"] == "min_token_overlap" and doc["thresholds"] == thresholds
    for theta in thresholds:
        table = per_item_scores(scored(preds, min_token_overlap=theta))
        table = table[(table["type"] == "open") & (table["temp"] == 0.7)]
        rates = table.pivot(index="item_key", columns="condition", values="unsupported_rate")
        point = doc["results"]["0.7"][f"{theta:.2f}"]
        assert point["n_items"] == 3
        assert point["control_rate"] == pytest.approx(rates["control"].mean(), abs=1e-12)
        assert point["treatment_rate"] == pytest.approx(rates["treatment"].mean(), abs=1e-12)
        deltas = (rates["treatment"] - rates["control"]).sort_index().to_numpy()
        assert point["delta_mean"] == pytest.approx(deltas.mean(), abs=1e-12)
        assert point["ci_95"] == bootstrap_ci(deltas, n_resamples=300, rng=rng(5, STREAM, "0.7"))


def test_sensitivity_varies_with_the_threshold() -> None:
    doc = unsupported_sensitivity(scored(predictions()), ITEMS, n_bootstrap=200)
    curve = {k: v["delta_mean"] for k, v in doc["results"]["0.0"].items()}
    # by hand, (treatment rates of o1, o2, o3) − (control rates): e.g. at 0.60 control "cat dog" (1/2) and
    # "useful banana" (1/2) become unsupported, while treatment "cat sat dog" (2/3) only does from 0.70 on
    assert curve["0.00"] == pytest.approx(((0 + 0 + 0) - (0 + 0.5 + 0)) / 3)  # only "the" (no token) is unsupported
    assert curve["0.50"] == pytest.approx(((0 + 0.5 + 0.5) - (0 + 1 + 0)) / 3)
    assert curve["0.60"] == pytest.approx(((0 + 0.5 + 0.5) - (0.5 + 1 + 0.5)) / 3)
    assert curve["0.70"] == pytest.approx(((0.5 + 0.5 + 0.5) - (0.5 + 1 + 0.5)) / 3)
    assert curve["1.00"] == pytest.approx(((0.5 + 0.5 + 0.5) - (0.5 + 1 + 0.5)) / 3)
    assert len(set(curve.values())) == 3


def test_sensitivity_is_order_independent_and_validates_inputs() -> None:
    rows = scored(predictions((0.0, 0.7)))
    a = unsupported_sensitivity(rows, ITEMS, n_bootstrap=200, temps=[0.0, 0.7, 1.0])
    b = unsupported_sensitivity(shuffled(rows), shuffled(ITEMS), n_bootstrap=200, temps=[1.0, 0.7, 0.0])
    assert dump(a) == dump(b)
    assert a["results"]["1.0"]["0.60"] == {"n_items": 0, "control_rate": None, "treatment_rate": None,
                                           "delta_mean": None, "ci_95": [None, None]}
    with pytest.raises(ValueError, match="overlap"):
        unsupported_sensitivity(rows, ITEMS, strategy="baseline")
    with pytest.raises(ValueError, match="response_text"):
        unsupported_sensitivity(rows.drop(columns="response_text"), ITEMS)
    with pytest.raises(ValueError, match="missing from the prepared items"):
        unsupported_sensitivity(rows, ITEMS[ITEMS["id"] != "o2"])


# --- mixed model -----------------------------------------------------------------------------------------------------
def em_rows(n_items: int = 8, seed: int = 3) -> pd.DataFrame:
    gen = np.random.default_rng(seed)
    rows = []
    for i in range(n_items):
        base = gen.uniform(0.1, 0.9)
        for temp in (0.0, 0.7):
            for cond in ("control", "treatment"):
                for k in range(2):
                    p = base + (0.1 if cond == "treatment" else 0.0)
                    rows.append({"item_key": f"d|{i}", "type": "closed", "condition": cond, "temp": temp,
                                 "sample_index": k, "status": "ok", "em": float(gen.uniform() < p)})
    rows.append({**rows[0], "status": "provider_error", "em": np.nan})
    return pd.DataFrame(rows)


def test_mixed_effects_fits_and_matches_cell_means() -> None:
    rows = em_rows()
    doc = mixed_effects(rows, enabled=True)
    assert doc["status"] == "ok", doc
    assert doc["n_rows"] == 64 and doc["n_items"] == 8 and doc["subsample"] is None
    model = doc["models"]["em"]
    assert model["converged"] is True
    assert set(model["params"]) == {"Intercept", "condition[T.treatment]", "C(temp)[T.0.7]",
                                    "condition[T.treatment]:C(temp)[T.0.7]", "Group Var"}
    ok = rows[rows["status"] == "ok"]
    cell = ok.groupby(["temp", "condition"])["em"].mean()
    # balanced design: the GLS fixed effects are the cell-mean contrasts
    assert model["params"]["condition[T.treatment]"] == pytest.approx(cell[(0.0, "treatment")] - cell[(0.0, "control")],
                                                                      abs=1e-6)
    assert all(v is None or 0 <= v <= 1 for v in model["pvalues"].values())
    assert dump(doc) == dump(mixed_effects(shuffled(rows), enabled=True))


def test_mixed_effects_skips_and_fails_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = em_rows()
    assert mixed_effects(rows, enabled=False)["status"] == "skipped"
    constant = mixed_effects(rows.assign(em=1.0), enabled=True)
    assert constant["status"] == "skipped" and "constant" in constant["reason"]
    one_arm = mixed_effects(rows[rows["condition"] == "control"], enabled=True)
    assert one_arm["status"] == "skipped" and "treatment" in one_arm["reason"]

    def broken(*args: object, **kwargs: object) -> object:
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(smf, "mixedlm", broken)
    failed = mixed_effects(rows, enabled=True)
    assert failed["status"] == "failed" and failed["error"] == "LinAlgError: Singular matrix"
    dump(failed)


def test_mixed_effects_subsamples_whole_items_deterministically() -> None:
    rows = em_rows(n_items=20)
    doc = mixed_effects(rows, enabled=True, max_rows=50, seed=1)
    assert doc["n_rows"] <= 50 and doc["n_rows"] % 8 == 0  # 8 ok rows per item: items are kept whole
    assert doc["subsample"]["rows_before"] == 160 and doc["subsample"]["items_before"] == 20
    assert doc["n_items"] == doc["n_rows"] // 8
    assert dump(doc) == dump(mixed_effects(shuffled(rows), enabled=True, max_rows=50, seed=1))
    assert mixed._subsample(mixed._design(rows), 50, 2)[0]["item"].tolist() != \
        mixed._subsample(mixed._design(rows), 50, 1)[0]["item"].tolist()


# --- entry point -----------------------------------------------------------------------------------------------------
def test_optional_analyses_entry_point() -> None:
    preds = predictions((0.0, 0.7))
    rows = scored(preds)
    per_item = per_item_scores(rows)
    costs = summarize_costs(preds.assign(prompt_tokens=100, completion_tokens=10, total_tokens=110),
                            pricing={}, provider="fireworks", model="m", use_batch_api=True)
    cfg = {"bootstrap_samples": 200, "seed": 11}
    docs = optional_analyses(per_item, rows, ITEMS, costs, temps=[0.0, 0.7], cfg=cfg)
    assert set(docs) == set(OUTPUT_FILES) and OUTPUT_FILES["mixed_models"] == "mixed_models.json"
    assert docs["power_analysis"]["results"]["0.7"]["n_items"] == 1  # o3 is the only unanswerable item
    assert docs["unsupported_sensitivity"]["n_bootstrap"] == 200
    assert docs["mixed_models"]["n_rows"] == len(rows) - 1  # the provider error is not a sample
    again = optional_analyses(shuffled(per_item), shuffled(rows), shuffled(ITEMS), costs, temps=[0.7, 0.0], cfg=cfg)
    assert dump(docs) == dump(again)

    only = optional_analyses(per_item, None, ITEMS, None, temps=[0.0], cfg={
        "enable_cost_effectiveness": False, "enable_unsupported_sensitivity": False, "enable_mixed_effects": False})
    assert set(only) == {"power_analysis"}
    with pytest.raises(ValueError, match="unknown optional-analysis settings"):
        optional_analyses(per_item, rows, ITEMS, costs, temps=[0.0], cfg={"enable_power": True})
    with pytest.raises(ValueError, match="costs"):
        optional_analyses(per_item, rows, ITEMS, None, temps=[0.0], cfg={})


# --- per-prediction scores persisted by ScorePredictions --------------------------------------------------------------
def test_scored_rows_rebuild_equals_scoring_and_refuses_other_predictions() -> None:
    preds = predictions((0.0, 0.7))
    rows = score_predictions(preds, ITEMS, unsupported_strategy="overlap")
    arrays = scored_row_arrays(rows)
    pd.testing.assert_frame_equal(scored_from_arrays(preds, arrays), rows)
    edited = preds.assign(error=["boom"] + [""] * (len(preds) - 1))  # row 0 is now a provider error
    with pytest.raises(ValueError, match="statuses"):
        scored_from_arrays(edited, arrays)
    with pytest.raises(ValueError, match="rows"):
        scored_from_arrays(preds.iloc[1:], arrays)


def test_optional_analyses_task_reads_the_persisted_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = {"rid": "opt", "root": str(tmp_path / "exp"), "config": str(small_experiment(tmp_path))}
    assert luigi.build([TrialReport(**common)], local_scheduler=True, log_level="WARNING")
    results = next((tmp_path / "exp" / "run_opt").glob("*/results/trial_manifest.json")).parent
    trial = results.parent.name
    written = {name: (results / name).read_bytes() for name in OUTPUT_FILES.values() if (results / name).exists()}
    assert written and (results / "scored_rows.npz").exists()

    def no_scoring(*_: object, **__: object) -> None:
        raise AssertionError("OptionalAnalyses scored the predictions again")

    monkeypatch.setattr(score_module, "score_predictions", no_scoring)
    OptionalAnalyses(trial=trial, **common).run()  # from scored_rows.npz: the same bytes
    assert {name: (results / name).read_bytes() for name in written} == written
    monkeypatch.undo()
    (results / "scored_rows.npz").unlink()  # gone: scored again, still the same bytes
    OptionalAnalyses(trial=trial, **common).run()
    assert {name: (results / name).read_bytes() for name in written} == written
