"""Paired statistics: parity with scipy/statsmodels and brute force, edge cases, and significance.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.meta_analysis import combine_effects
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from pipeline.stats import paired
from pipeline.stats.fdr import benjamini_hochberg
from pipeline.stats.meta import meta_analysis
from pipeline.stats.paired import (
    bootstrap_ci,
    bootstrap_means,
    cliffs_delta,
    cohens_dz,
    hodges_lehmann,
    mcnemar_exact,
    means_from_counts,
    sign_flip_permutation_p,
    tost_noninferiority,
    wilcoxon,
)
from pipeline.stats.selective import selective_risk
from pipeline.stats.significance import compute_significance
from pipeline.stats.unanswerable import unanswerable_rules

TOL = 1e-9


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- Benjamini–Hochberg ----------------------------------------------------------------------------------------------
def test_bh_fixes_the_original_step_up() -> None:
    assert benjamini_hochberg([0.01, 0.04]) == pytest.approx([0.02, 0.04])  # the original gave [0.02, 0.02]
    assert benjamini_hochberg([0.04, 0.01, 0.03]) == pytest.approx([0.04, 0.03, 0.04])


@pytest.mark.parametrize("n", [1, 2, 3, 10, 200])
def test_bh_matches_statsmodels(n: int) -> None:
    for seed in range(5):
        p = rng(seed).uniform(size=n) ** 3
        p[: n // 4] = p[0]  # ties
        assert np.allclose(benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1], atol=TOL, rtol=0)


def test_bh_edge_cases() -> None:
    assert benjamini_hochberg([]) == []
    out = benjamini_hochberg([0.02, float("nan"), None, 0.03])
    assert math.isnan(out[1]) and math.isnan(out[2])
    assert out[0] == pytest.approx(0.03) and out[3] == pytest.approx(0.03)  # m = 2, NaN not counted
    assert benjamini_hochberg([0.9, 1.0, 0.95]) == pytest.approx([1.0, 1.0, 1.0])


# --- McNemar ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,p_ctrl,p_trt", [(0, 0.5, 0.5), (1, 0.5, 0.5), (2, 0.5, 0.5), (40, 0.3, 0.6), (500, 0.5, 0.52)]
)
def test_mcnemar_matches_statsmodels(n: int, p_ctrl: float, p_trt: float) -> None:
    r = rng(n)
    ctrl, trt = r.random(n) < p_ctrl, r.random(n) < p_trt
    res = mcnemar_exact(ctrl, trt)
    b, c = int(np.sum(~ctrl & trt)), int(np.sum(ctrl & ~trt))
    assert (res["b"], res["c"]) == (b, c)
    table = [[np.sum(~ctrl & ~trt), c], [b, np.sum(ctrl & trt)]]
    assert res["p_exact"] == pytest.approx(sm_mcnemar(table, exact=True).pvalue, abs=TOL)
    assert res["odds_ratio"] == pytest.approx((b + 0.5) / (c + 0.5))
    assert "clopper_pearson" in res["or_ci_method"]


def test_mcnemar_or_ci_is_clopper_pearson_mapped() -> None:
    ctrl = np.array([1] * 4 + [0] * 10 + [1] * 6, dtype=bool)
    trt = np.array([0] * 4 + [1] * 10 + [1] * 6, dtype=bool)
    res = mcnemar_exact(ctrl, trt)
    lo_p, hi_p = stats.beta.ppf(0.025, 10, 5), stats.beta.ppf(0.975, 11, 4)
    assert res["or_ci_95"] == pytest.approx([lo_p / (1 - lo_p), hi_p / (1 - hi_p)], abs=TOL)
    assert mcnemar_exact([], [])["or_ci_95"] == [None, None]
    assert mcnemar_exact([0, 0], [1, 1])["or_ci_95"][1] is None  # c = 0: unbounded above


# --- Wilcoxon --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 30, 80])
def test_wilcoxon_matches_scipy(n: int) -> None:
    d = np.round(rng(n).normal(0.2, 1, size=n), 1)
    d[::4] = 0.0
    nonzero = d[d != 0]
    res = wilcoxon(d)
    if len(nonzero) == 0:
        assert (res["W"], res["p_value"]) == (0.0, 1.0)
        return
    ref = stats.wilcoxon(nonzero, zero_method="wilcox")
    assert res["W"] == pytest.approx(ref.statistic, abs=TOL)
    assert res["p_value"] == pytest.approx(ref.pvalue, abs=TOL)


@pytest.mark.parametrize("seed", range(40))
def test_wilcoxon_tied_small_samples_match_scipys_permutation(seed: int) -> None:
    r = rng(seed)
    n = int(r.integers(1, 14))
    d = r.choice([-1.0, -0.5, 0.5, 1.0, 2.0], size=n)
    ref = stats.wilcoxon(d, zero_method="wilcox")
    res = wilcoxon(d)
    assert res["W"] == pytest.approx(ref.statistic, abs=TOL)
    assert res["p_value"] == pytest.approx(ref.pvalue, abs=TOL)


def test_wilcoxon_all_zero_and_ties() -> None:
    assert wilcoxon(np.zeros(7)) == {"W": 0.0, "p_value": 1.0, "n_nonzero": 0}
    assert wilcoxon([]) == {"W": 0.0, "p_value": 1.0, "n_nonzero": 0}
    ties = wilcoxon(np.ones(6))
    assert ties["p_value"] == pytest.approx(stats.wilcoxon(np.ones(6)).pvalue, abs=TOL)


# --- bootstrap -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,resamples", [(2, 99), (40, 999), (3000, 999)])
def test_bootstrap_percentile_matches_scipy_with_same_draws(n: int, resamples: int) -> None:
    data = rng(n).normal(size=n)
    ours = bootstrap_ci(data, n_resamples=resamples, rng=rng(42), method="percentile")
    ref = stats.bootstrap((data,), np.mean, n_resamples=resamples, method="percentile", rng=rng(42)).confidence_interval
    assert ours == pytest.approx([ref.low, ref.high], abs=TOL)


def test_bootstrap_bca_matches_scipy() -> None:
    data = rng(3).exponential(size=60) - 0.5
    ours = bootstrap_ci(data, n_resamples=999, rng=rng(5), method="bca", alpha=0.1)
    ref = stats.bootstrap((data,), np.mean, n_resamples=999, method="BCa", confidence_level=0.9,
                          rng=rng(5)).confidence_interval
    assert ours == pytest.approx([ref.low, ref.high], abs=TOL)


def test_bootstrap_edges() -> None:
    for draws in ("auto", "index", "counts"):
        assert bootstrap_ci([], n_resamples=10, rng=rng(), draws=draws) == [None, None]
        assert bootstrap_ci([0.3], n_resamples=10, rng=rng(), draws=draws) == [0.3, 0.3]
        assert bootstrap_ci(np.full(9, 0.1), n_resamples=100, rng=rng(), method="bca", draws=draws) == [0.1, 0.1]
        with pytest.raises(ValueError):
            bootstrap_ci([1.0, float("nan")], n_resamples=10, rng=rng(), draws=draws)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], n_resamples=10, rng=rng(), draws="poisson")


def per_row_counts(value_ids: np.ndarray, n_values: int) -> np.ndarray:
    rows = value_ids.shape[0]
    flat = (np.arange(rows)[:, None] * n_values + value_ids).ravel()
    return np.bincount(flat, minlength=rows * n_values).reshape(rows, n_values)


def test_bootstrap_count_means_equal_index_means_on_the_same_draws() -> None:
    d = rng(30).integers(-4, 5, size=700) / 8
    idx = rng(31).integers(0, len(d), (300, len(d)))
    by_index = bootstrap_means(d, n_resamples=300, rng=rng(31), draws="index")
    assert np.array_equal(by_index, d[idx].mean(axis=1))  # the documented index stream
    values, value_ids = np.unique(d, return_inverse=True)
    counts = per_row_counts(value_ids[idx], len(values))
    assert np.allclose(means_from_counts(counts, values), by_index, rtol=0, atol=1e-14)


def test_bootstrap_count_and_index_draws_give_the_same_distribution() -> None:
    d = rng(32).integers(-5, 6, size=2000) / 10 + 0.02  # 11 distinct values: what per-item rate deltas look like
    resamples = 20_000
    by_counts = bootstrap_means(d, n_resamples=resamples, rng=rng(33), draws="counts")
    by_index = bootstrap_means(d, n_resamples=resamples, rng=rng(34), draws="index")
    se = d.std() / math.sqrt(len(d))  # the bootstrap distribution's exact sd
    for means in (by_counts, by_index):
        assert abs(means.mean() - d.mean()) <= 5 * se / math.sqrt(resamples)
        assert abs(means.std() / se - 1) <= 5 * math.sqrt(0.5 / resamples)
    assert stats.ks_2samp(by_counts, by_index).pvalue > 1e-3
    for method in ("percentile", "bca"):
        ci_counts = bootstrap_ci(d, n_resamples=resamples, rng=rng(35), method=method, draws="counts")
        ci_index = bootstrap_ci(d, n_resamples=resamples, rng=rng(36), method=method, draws="index")
        assert np.allclose(ci_counts, ci_index, rtol=0, atol=0.15 * se)  # quantile MC error is about 0.03 se


def test_bootstrap_draws_auto_picks_the_cheaper_equivalent() -> None:
    continuous = rng(40).normal(size=500)
    tied = rng(41).integers(0, 5, size=500) / 4
    for d, expected in ((continuous, "index"), (tied, "counts")):
        for method in ("percentile", "bca"):
            auto = bootstrap_ci(d, n_resamples=200, rng=rng(42), method=method)
            assert auto == bootstrap_ci(d, n_resamples=200, rng=rng(42), method=method, draws=expected)
            assert auto == bootstrap_ci(d, n_resamples=200, rng=rng(42), method=method)  # deterministic per seed


# --- Hodges–Lehmann --------------------------------------------------------------------------------------------------
def walsh_median(x: np.ndarray) -> float:
    i, j = np.triu_indices(len(x))
    return float(np.median((x[i] + x[j]) / 2))


def hl_samples() -> list[np.ndarray]:
    r = rng(11)
    out = []
    for n in (1, 2, 3, 10, 101, 400):
        out += [r.normal(size=n), r.integers(-3, 4, size=n) / 4, np.round(r.normal(size=n) * 1e5) / 7, np.zeros(n)]
    return out


def test_hodges_lehmann_matches_brute_force() -> None:
    for x in hl_samples():
        assert hodges_lehmann(x) == walsh_median(x)
    assert hodges_lehmann([]) is None


def test_hodges_lehmann_selection_path_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paired, "_HL_DIRECT_MAX_UNIQUE", 0)
    monkeypatch.setattr(paired, "_HL_BAND_MAX", 64)
    for x in hl_samples():
        assert hodges_lehmann(x) == walsh_median(x)
    monkeypatch.undo()
    x = rng(12).normal(size=2500)  # more unique values than the direct path takes
    assert hodges_lehmann(x) == walsh_median(x)


def test_hodges_lehmann_is_fast_for_100k() -> None:
    x = rng(13).normal(size=100_000)
    value = hodges_lehmann(x)
    sub = x[:2000]
    assert abs(value) < 0.02 and hodges_lehmann(sub) == walsh_median(sub)


# --- effect sizes, permutation, TOST ---------------------------------------------------------------------------------
def test_cohens_dz() -> None:
    d = np.array([0.1, 0.4, -0.2, 0.5])
    assert cohens_dz(d) == pytest.approx(d.mean() / d.std(ddof=1))
    assert cohens_dz(np.zeros(5)) == 0.0
    assert cohens_dz(np.full(5, 0.1)) is None
    assert cohens_dz([0.3]) is None


def test_cliffs_delta_matches_brute_force() -> None:
    r = rng(4)
    for nx, ny in ((1, 1), (5, 9), (200, 150)):
        x, y = r.integers(0, 5, nx) / 4, r.integers(0, 5, ny) / 4
        diff = np.sign(x[:, None] - y[None, :])
        assert cliffs_delta(x, y) == pytest.approx(diff.mean(), abs=TOL)
    assert cliffs_delta([], [1.0]) is None


def exact_sign_flip_p(d: np.ndarray) -> float:
    """P(|Σ s_i d_i| ≥ |Σ d_i|) over all 2^n fair sign vectors (the permutation p without Monte Carlo error)."""
    signs = 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1) - 1
    return float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12))


@pytest.mark.parametrize("draws", ["bits", "binomial"])
def test_sign_flip_p_estimates_the_exact_enumerated_p(draws: str) -> None:
    r = rng(8)
    resamples = 40_000
    for d in (r.normal(0.3, 1, size=11), r.integers(-2, 4, size=14) / 4, np.array([0.5, 0.5, 0.5, -0.5, 0.25, 0.0])):
        exact = exact_sign_flip_p(d)
        p = sign_flip_permutation_p(d, n_resamples=resamples, rng=rng(9), draws=draws)
        estimate = (p * (resamples + 1) - 1) / resamples  # undo the +1 correction
        assert abs(estimate - exact) <= 5 * math.sqrt(exact * (1 - exact) / resamples) + 1e-12


def test_sign_flip_bits_are_the_documented_draws() -> None:
    d = rng(8).normal(0.1, 1, size=37)
    d[[3, 20]] = 0.0  # zeros are dropped before the signs are drawn
    a = np.abs(d[d != 0])
    bits = np.unpackbits(rng(9).integers(0, 256, (400, 5), dtype=np.uint8), axis=1, count=len(a)).astype(int)
    perm = np.abs((2 * bits - 1) @ a)
    expected = (1 + np.sum(perm >= abs(d.sum()) - 1e-9)) / 401
    assert sign_flip_permutation_p(d, n_resamples=400, rng=rng(9), draws="bits") == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("draws", ["auto", "bits", "binomial"])
def test_sign_flip_plus_one_correction_and_edges(draws: str) -> None:
    # constant deltas: only the all-plus / all-minus flips (chance 2^-29) reach |sum| = 30, so p is 1/(R + 1)
    assert sign_flip_permutation_p(np.full(30, 1.0), n_resamples=99, rng=rng(), draws=draws) == pytest.approx(1 / 100)
    assert sign_flip_permutation_p(np.zeros(5), n_resamples=99, rng=rng(), draws=draws) == 1.0
    assert sign_flip_permutation_p([0.2, -0.1], n_resamples=0, rng=rng(), draws=draws) == 1.0
    assert sign_flip_permutation_p([], n_resamples=9, rng=rng(), draws=draws) is None
    with pytest.raises(ValueError):
        sign_flip_permutation_p([0.1], n_resamples=9, rng=rng(), draws="shuffle")


@pytest.mark.parametrize("draws", ["bits", "binomial"])
def test_sign_flip_is_deterministic_and_ignores_zeros(draws: str) -> None:
    d = rng(3).integers(-3, 4, size=500) / 10
    p = sign_flip_permutation_p(d, n_resamples=999, rng=rng(4), draws=draws)
    assert p == sign_flip_permutation_p(d, n_resamples=999, rng=rng(4), draws=draws)
    assert p == sign_flip_permutation_p(d[d != 0], n_resamples=999, rng=rng(4), draws=draws)


def test_sign_flip_binomial_counts_agree_with_the_bit_draws() -> None:
    r = rng(21)
    resamples = 50_000
    for shift in (0.0, 0.04, 0.08):  # null, borderline and clear effects on tied, discrete deltas
        d = np.clip(r.integers(-4, 5, size=600) / 8 + shift, -1, 1)
        p_bits = sign_flip_permutation_p(d, n_resamples=resamples, rng=rng(22), draws="bits")
        p_binom = sign_flip_permutation_p(d, n_resamples=resamples, rng=rng(23), draws="binomial")
        p = (p_bits + p_binom) / 2
        assert abs(p_bits - p_binom) <= 5 * math.sqrt(2 * p * (1 - p) / resamples) + 2 / resamples
    many = r.normal(size=800)  # all |values| distinct: auto takes the bits
    assert sign_flip_permutation_p(many, n_resamples=99, rng=rng(1)) == sign_flip_permutation_p(
        many, n_resamples=99, rng=rng(1), draws="bits")
    tied = r.integers(-3, 4, size=800) / 4  # 3 distinct |values| in 800: auto takes the binomial counts
    assert sign_flip_permutation_p(tied, n_resamples=99, rng=rng(1)) == sign_flip_permutation_p(
        tied, n_resamples=99, rng=rng(1), draws="binomial")


@pytest.mark.parametrize("n", [2, 3, 25, 300])
def test_tost_matches_statsmodels_lower_test(n: int) -> None:
    r = rng(n)
    x1, x2 = r.normal(0.02, 0.3, n), r.normal(0, 0.3, n)
    res = tost_noninferiority(x1 - x2, margin=0.05, alpha=0.1)
    _, (t1, pv1, df1), _ = ttost_paired(x1, x2, -0.05, 0.05)
    assert res["p_value"] == pytest.approx(pv1, abs=TOL)
    assert res["t"] == pytest.approx(t1, abs=TOL) and res["df"] == df1
    assert res["ci_level"] == pytest.approx(0.8)
    assert res["non_inferior"] == (res["ci"][0] > -0.05) == (pv1 < 0.1)


def test_tost_edges() -> None:
    assert tost_noninferiority(np.zeros(10), margin=0.01, alpha=0.05)["p_value"] == 0.0
    assert tost_noninferiority(np.full(10, -0.02), margin=0.01, alpha=0.05)["non_inferior"] is False
    single = tost_noninferiority([0.3], margin=0.01, alpha=0.05)
    assert single["p_value"] is None and single["ci"] == [None, None]


# --- meta-analysis ---------------------------------------------------------------------------------------------------
def test_meta_matches_statsmodels_when_heterogeneous() -> None:
    y, v = np.array([0.1, 0.5, -0.2, 0.3]), np.array([0.01, 0.02, 0.015, 0.03])
    ours = meta_analysis(y, v)
    ref = combine_effects(y, v, method_re="dl")
    ci_fe, ci_re, _, _ = ref.conf_int()
    assert ours["heterogeneity"]["Q"] == pytest.approx(ref.q, abs=TOL)
    assert ours["heterogeneity"]["I2"] == pytest.approx(ref.i2, abs=TOL)
    assert ours["heterogeneity"]["df"] == 3
    assert ours["heterogeneity"]["p_value"] == pytest.approx(ref.test_homogeneity().pvalue, abs=TOL)
    assert ours["fixed"]["delta_mean"] == pytest.approx(ref.mean_effect_fe, abs=TOL)
    assert ours["fixed"]["ci_95"] == pytest.approx(list(ci_fe), abs=TOL)
    assert ours["random"]["tau2"] == pytest.approx(ref.tau2, abs=TOL)
    assert ours["random"]["delta_mean"] == pytest.approx(ref.mean_effect_re, abs=TOL)
    assert ours["random"]["ci_95"] == pytest.approx(list(ci_re), abs=TOL)


def test_meta_truncates_and_handles_single_group() -> None:
    homogeneous = meta_analysis([0.10, 0.11, 0.10], [0.01, 0.01, 0.01])
    assert homogeneous["random"]["tau2"] == 0.0 and homogeneous["heterogeneity"]["I2"] == 0.0
    assert homogeneous["random"]["delta_mean"] == pytest.approx(homogeneous["fixed"]["delta_mean"])
    single = meta_analysis([0.2], [0.01])
    assert single["heterogeneity"]["df"] == 0 and single["heterogeneity"]["p_value"] is None
    with pytest.raises(ValueError):
        meta_analysis([0.1, 0.2], [0.01, 0.0])


# --- selective risk --------------------------------------------------------------------------------------------------
def test_selective_risk_definitions() -> None:
    em = np.array([1.0, 0.0, 1.0, 1.0])
    abstain = np.array([0.0, 0.0, 0.5, 1.0])
    res = selective_risk(em, abstain, [0.0, 0.5, 1.0])
    cov = [p["coverage"] for p in res["points"]]
    acc = [p["selective_accuracy"] for p in res["points"]]
    assert cov == [0.5, 0.75, 1.0] and acc == pytest.approx([0.5, 2 / 3, 0.75])
    assert all(a <= 1 for a in acc)
    assert res["aurc"] == pytest.approx(0.25 * (0.5 + 1 / 3) / 2 + 0.25 * (1 / 3 + 0.25) / 2)
    none = selective_risk(em, np.ones(4), [0.5])
    assert none["points"][0]["selective_accuracy"] is None and none["aurc"] is None


# --- significance.json -----------------------------------------------------------------------------------------------
CFG = {"bootstrap_samples": 300, "permutation_samples": 300, "random_seed": 7}


def per_item_frame(effect: float, *, seed: int = 0, temps: tuple[float, ...] = (0.0, 0.7)) -> pd.DataFrame:
    r = rng(seed)
    rows = []
    for temp in temps:
        for dataset, type_, n in (("triviaqa", "closed", 60), ("nq_open", "closed", 40), ("squad_v2", "open", 50)):
            for i in range(n):
                base = r.random()
                for cond in ("control", "treatment"):
                    p = min(1.0, base + (effect if cond == "treatment" else 0.0))
                    em = r.binomial(4, p) / 4
                    is_open = type_ == "open"
                    rows.append({
                        "item_key": f"{dataset}|{i}", "type": type_, "condition": cond, "temp": temp, "em": em,
                        "f1": min(1.0, em + 0.1), "abstain_rate": r.binomial(4, 0.2) / 4,
                        "false_answer_rate": r.binomial(4, 0.3) / 4 if is_open else np.nan,
                        "unsupported_rate": r.binomial(4, 0.3) / 4 if is_open else np.nan,
                        "n_samples": 4, "n_excluded": 0,
                    })
    return pd.DataFrame(rows)


def as_json(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, allow_nan=False)


def test_significance_structure_and_json_safety() -> None:
    doc = compute_significance(per_item_frame(0.0), temps=[0.0, 0.7], stats_cfg=CFG)
    as_json(doc)  # no NaN / inf anywhere
    assert doc["schema_version"] == 2 and doc["temps"] == [0.0, 0.7]
    assert set(doc["results"]) == {"0.0", "0.7"}
    closed, open_ = doc["results"]["0.0"]["closed"], doc["results"]["0.0"]["open"]
    assert set(closed["metrics"]) == {"em", "f1", "abstain_rate"}
    assert set(open_["metrics"]) == {"em", "f1", "abstain_rate", "false_answer_rate", "unsupported_rate"}
    for key in ("n_items", "counts", "mcnemar", "metrics", "selective_risk", "subgroups", "meta", "noninferiority"):
        assert key in closed
    assert closed["n_items"] == 100 and set(closed["subgroups"]["dataset"]) == {"nq_open", "triviaqa"}
    assert closed["counts"]["control"]["n_samples"] == 400
    assert "subgroups" not in closed["subgroups"]["dataset"]["nq_open"]
    assert closed["meta"]["em"]["status"] == "ok" and closed["meta"]["em"]["heterogeneity"]["df"] == 1
    assert open_["meta"]["em"]["status"] == "insufficient_groups"
    assert closed["noninferiority"]["em"]["margin"] == 0.01
    assert closed["noninferiority"]["em"]["ci_level"] == pytest.approx(0.9)
    metric = closed["metrics"]["em"]
    for key in ("n_items", "delta_mean", "ci_95", "wilcoxon", "hodges_lehmann", "d_z", "cliffs_delta_unpaired",
                "perm_p_value", "ci_method", "bootstrap_samples"):
        assert key in metric
    assert set(closed["selective_risk"]["points"]) == {"control", "treatment"}


def _all_tests(results: dict) -> dict[str, dict]:
    """Every McNemar and Wilcoxon test of a results tree by its family id (as `_family` names them)."""
    found = {}
    for tkey, by_type in results.items():
        for type_, block in by_type.items():
            for scope, data in [("all", block), *((f"dataset={n}", b) for n, b in block["subgroups"]["dataset"].items())]:
                found[f"T={tkey}/{type_}/{scope}/mcnemar"] = data["mcnemar"]
                for m, res in data["metrics"].items():
                    found[f"T={tkey}/{type_}/{scope}/{m}/wilcoxon"] = res["wilcoxon"]
    return found


def _p(test: dict) -> float | None:
    return test.get("p_exact", test.get("p_value"))


def test_significance_q_values_are_statsmodels_bh_over_exactly_the_family() -> None:
    doc = compute_significance(per_item_frame(0.05), temps=[0.0, 0.7], stats_cfg=CFG)
    tests = _all_tests(doc["results"])
    family = doc["fdr"]["family"]
    excluded = {e["test"] for e in doc["fdr"]["excluded"]}
    assert len(family) == len(set(family)) == doc["fdr"]["n_tests"] > 20
    assert set(family) | excluded == set(tests) and not set(family) & excluded
    expected = multipletests([_p(tests[t]) for t in family], method="fdr_bh")[1]
    assert [tests[t]["q_value"] for t in family] == pytest.approx(expected, abs=TOL)
    assert all(tests[t]["q_value"] is None for t in excluded)
    off = compute_significance(per_item_frame(0.05), temps=[0.0], stats_cfg={**CFG, "enable_fdr": False,
                                                                              "enable_permutation": False})
    block = off["results"]["0.0"]["closed"]
    assert block["mcnemar"]["q_value"] is None and block["metrics"]["em"]["perm_p_value"] is None
    assert off["fdr"]["n_tests"] == 0 and off["fdr"]["family"] == []


def test_significance_family_has_no_duplicate_hypotheses() -> None:
    """A subgroup with its parent's items and McNemar on binary EM (K = 1) are not separate hypotheses."""
    frame = per_item_frame(0.1, seed=4)
    binary = frame.assign(em=(frame["em"] >= 0.5).astype(float), n_samples=1)  # one sample per item
    for data, mcnemar_kept in ((frame, True), (binary, False)):
        doc = compute_significance(data, temps=[0.0], stats_cfg=CFG)
        results = doc["results"]["0.0"]
        family = doc["fdr"]["family"]
        # open-book has one dataset (squad_v2): its subgroup is the block itself
        assert not [t for t in family if "/open/dataset=" in t]
        assert results["open"]["subgroups"]["dataset"]["squad_v2"]["item_set"] == results["open"]["item_set"]
        assert ("T=0.0/closed/all/mcnemar" in family) is mcnemar_kept
        assert "T=0.0/closed/all/em/wilcoxon" in family
        # no two members test the same hypothesis on the same items
        scopes = {f"{type_}/all": block for type_, block in results.items()}
        scopes |= {f"{type_}/dataset={name}": sub for type_, block in results.items()
                   for name, sub in block["subgroups"]["dataset"].items()}
        hypotheses = [(scopes["/".join(t.split("/")[1:3])]["item_set"], t.split("/", 3)[3]) for t in family]
        assert len(hypotheses) == len(set(hypotheses))
    excluded = {e["test"]: e["reason"] for e in doc["fdr"]["excluded"]}
    assert "em/wilcoxon" in excluded["T=0.0/closed/all/mcnemar"]


def test_identical_item_sets_get_identical_intervals_and_p_values() -> None:
    doc = compute_significance(per_item_frame(0.05, seed=2), temps=[0.0], stats_cfg=CFG)
    block = doc["results"]["0.0"]["open"]
    sub = block["subgroups"]["dataset"]["squad_v2"]
    for metric in block["metrics"]:
        for key in ("ci_95", "ci_95_bca", "perm_p_value"):
            assert sub["metrics"][metric][key] == block["metrics"][metric][key]
        assert sub["metrics"][metric]["wilcoxon"]["p_value"] == block["metrics"][metric]["wilcoxon"]["p_value"]
    # the same items with the same values at another temperature: the same resamples again
    frame = per_item_frame(0.05, seed=2, temps=(0.0,))
    twice = pd.concat([frame, frame.assign(temp=0.7)])
    both = compute_significance(twice, temps=[0.0, 0.7], stats_cfg=CFG)["results"]
    assert json.dumps(both["0.0"], sort_keys=True) == json.dumps(both["0.7"], sort_keys=True)
    # different items get different streams: dropping one item changes the digest
    fewer = compute_significance(frame[frame["item_key"] != "squad_v2|0"], temps=[0.0], stats_cfg=CFG)
    assert fewer["results"]["0.0"]["open"]["item_set"] != block["item_set"]


def test_significance_is_deterministic_and_order_independent() -> None:
    frame = per_item_frame(0.1, seed=3)
    first = as_json(compute_significance(frame, temps=[0.0, 0.7], stats_cfg=CFG))
    shuffled = frame.sample(frac=1, random_state=5).reset_index(drop=True)
    assert as_json(compute_significance(shuffled, temps=[0.0, 0.7], stats_cfg=CFG)) == first
    # a block does not depend on which other blocks were computed before it (FDR aside)
    alone = compute_significance(frame, temps=[0.7], stats_cfg={**CFG, "enable_fdr": False})
    both = compute_significance(frame, temps=[0.0, 0.7], stats_cfg={**CFG, "enable_fdr": False})
    assert as_json(alone["results"]["0.7"]) == as_json(both["results"]["0.7"])


def test_significance_detects_planted_effect() -> None:
    null = compute_significance(per_item_frame(0.0, seed=1), temps=[0.0], stats_cfg=CFG)["results"]["0.0"]["closed"]
    planted = compute_significance(per_item_frame(0.35, seed=1), temps=[0.0], stats_cfg=CFG)["results"]["0.0"]["closed"]
    em = planted["metrics"]["em"]
    assert em["delta_mean"] > 0.2 and em["ci_95"][0] > 0 and em["wilcoxon"]["p_value"] < 1e-6
    assert planted["mcnemar"]["p_exact"] < 1e-4 and planted["mcnemar"]["b"] > planted["mcnemar"]["c"]
    assert em["perm_p_value"] == pytest.approx(1 / 301)
    assert em["ci_95_bca"][0] > 0 and em["ci_95_bca"][0] <= em["delta_mean"] <= em["ci_95_bca"][1]
    assert em["ci_95_bca"] != em["ci_95"], "BCa corrects the percentile interval"
    assert null["metrics"]["em"]["ci_95"][0] < 0.1 and null["metrics"]["em"]["wilcoxon"]["p_value"] > 1e-3


def test_significance_pairing_missing_values_and_temp_keys() -> None:
    frame = per_item_frame(0.0, temps=(0.25,))
    frame = frame[~((frame["item_key"] == "triviaqa|0") & (frame["condition"] == "treatment"))].copy()
    frame.loc[(frame["item_key"] == "triviaqa|1") & (frame["condition"] == "control"), "f1"] = np.nan
    doc = compute_significance(frame, temps=[0.25], stats_cfg=CFG)
    assert set(doc["results"]) == {"0.25"}
    closed = doc["results"]["0.25"]["closed"]
    assert closed["n_items"] == 99 and closed["counts"]["control"]["unpaired_items"] == 1
    assert closed["metrics"]["em"]["n_items"] == 99 and closed["metrics"]["f1"]["n_items"] == 98
    with pytest.raises(ValueError, match="duplicate"):
        compute_significance(pd.concat([frame, frame.head(1)]), temps=[0.25], stats_cfg=CFG)


# --- unanswerable items: the detector rule beside the official SQuAD v2 rule ----------------------------------------
def test_official_unanswerable_rule_matches_a_hand_computed_case() -> None:
    items = pd.DataFrame([
        {"dataset": "squad_v2", "id": "u1", "type": "open", "is_unanswerable": True},
        {"dataset": "squad_v2", "id": "u2", "type": "open", "is_unanswerable": True},
        {"dataset": "squad_v2", "id": "a1", "type": "open", "is_unanswerable": False},
        {"dataset": "triviaqa", "id": "c1", "type": "closed", "is_unanswerable": float("nan")},
    ])

    def row(key: str, cond: str, resp: str, em: float, f1: float, status: str = "ok", type_: str = "open") -> dict:
        return {"item_key": key, "type": type_, "condition": cond, "temp": 0.0, "status": status, "em": em,
                "f1": f1, "response_text": resp}

    rows = pd.DataFrame([
        # control: u1 empty (both rules 1), u2 answered (both 0), a1 right
        row("squad_v2|u1", "control", "", 1, 1), row("squad_v2|u2", "control", "Paris", 0, 0),
        row("squad_v2|a1", "control", "Paris", 1, 1),
        # treatment: u1 an abstention phrase (detector 1, official 0), u2 "The." normalizes to "" (official 1),
        # two samples on a1 (EM 0 and 1, F1 0.5 and 1), and a provider error that does not count
        row("squad_v2|u1", "treatment", "unknown", 1, 1), row("squad_v2|u2", "treatment", "The.", 1, 1),
        row("squad_v2|a1", "treatment", "paris france", 0, 0.5), row("squad_v2|a1", "treatment", "Paris", 1, 1),
        row("squad_v2|a1", "treatment", "", float("nan"), float("nan"), status="provider_error"),
        row("triviaqa|c1", "control", "", 0, 0, type_="closed"),
    ])
    doc = unanswerable_rules(rows, items, temps=[0.0, 0.7])
    assert doc["results"]["0.7"] == {}
    ctrl, trt, delta = (doc["results"]["0.0"][k] for k in ("control", "treatment", "delta"))
    assert ctrl["n_items"] == 3 and ctrl["n_unanswerable"] == 2
    assert ctrl["em_detector"] == ctrl["em_official"] == pytest.approx(2 / 3)
    assert trt["unanswerable_em_detector"] == 1.0 and trt["unanswerable_em_official"] == 0.5
    assert trt["em_detector"] == pytest.approx((1 + 1 + 0.5) / 3) and trt["em_official"] == pytest.approx(1.5 / 3)
    assert trt["f1_detector"] == pytest.approx((1 + 1 + 0.75) / 3) and trt["f1_official"] == pytest.approx(1.75 / 3)
    assert delta["n_items"] == 3 and delta["em_official"] == pytest.approx(1.5 / 3 - 2 / 3)
    assert delta["em_detector"] == pytest.approx(2.5 / 3 - 2 / 3)
