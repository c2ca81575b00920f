"""Paired tests and effect sizes for per-item deltas (treatment − control), vectorized with numpy/scipy.

Every function takes plain arrays and returns plain Python numbers, lists or dicts; "not computable" is None,
never NaN or inf, so results are JSON-safe. Inputs must be finite (ValueError otherwise): callers drop
missing items before pairing. Randomized procedures take a `numpy.random.Generator` and draw from it in a
fixed, documented way, so a caller that owns one stream per test gets order-independent results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special, stats

# Resampling works on (rows × n) blocks of about this many elements: bounded memory, cache-friendly draws.
_CHUNK_ELEMENTS = 1 << 19
# Hodges–Lehmann enumerates all unique-value pairs up to this many unique values (≈ 525k pairs).
_HL_DIRECT_MAX_UNIQUE = 1024
_HL_BAND_MAX = 1 << 20
# Measured on numpy 2.x: one multinomial category or binomial draw costs about 100 ns, one bootstrap index draw
# (with its gather) about 4 ns, one byte look-up of the sign-flip table about 9 ns per 8 deltas.
_COUNTS_COST = 24
_BINOMIAL_COST = 80

OR_CI_METHOD = (
    "conditional_clopper_pearson: exact 95% Clopper-Pearson interval for b/(b+c) mapped through p/(1-p); "
    "it bounds the conditional odds ratio b/c (the odds_ratio point estimate adds 0.5 to b and c)"
)


def _finite(values: Sequence[float] | np.ndarray, name: str = "deltas") -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; drop missing items before calling")
    return arr


def _is_constant(arr: np.ndarray) -> bool:
    # exact test: np.std of a constant array of e.g. 0.1 can come out as 1e-17 instead of 0
    return len(arr) == 0 or float(np.ptp(arr)) == 0.0


def mcnemar_exact(ctrl: Sequence[bool] | np.ndarray, trt: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """Exact McNemar test on paired binary outcomes.

    b = #(ctrl 0 → trt 1), c = #(ctrl 1 → trt 0); p_exact = min(1, 2·BinomCDF(min(b, c); b + c, ½)), which is
    statsmodels `mcnemar(table, exact=True).pvalue` (1 when b + c = 0). odds_ratio = (b + ½)/(c + ½);
    or_ci_95 is described by `or_ci_method` (None bounds when not finite).
    """
    ctrl_arr = np.asarray(ctrl, dtype=bool).ravel()
    trt_arr = np.asarray(trt, dtype=bool).ravel()
    if ctrl_arr.shape != trt_arr.shape:
        raise ValueError("mcnemar_exact needs equally long control and treatment arrays")
    b = int(np.count_nonzero(~ctrl_arr & trt_arr))
    c = int(np.count_nonzero(ctrl_arr & ~trt_arr))
    n = b + c
    p_exact = min(1.0, 2.0 * float(stats.binom.cdf(min(b, c), n, 0.5)))
    ci: list[float | None] = [None, None]
    if n > 0:
        lo_p = float(stats.beta.ppf(0.025, b, c + 1)) if b > 0 else 0.0
        hi_p = float(stats.beta.ppf(0.975, b + 1, c)) if c > 0 else 1.0
        ci = [lo_p / (1.0 - lo_p), hi_p / (1.0 - hi_p) if hi_p < 1.0 else None]
    return {
        "n": int(len(ctrl_arr)),
        "b": b,
        "c": c,
        "p_exact": p_exact,
        "odds_ratio": (b + 0.5) / (c + 0.5),
        "or_ci_95": ci,
        "or_ci_method": OR_CI_METHOD,
    }


_EXACT_TIES_MAX_N = 13


def _tied_exact_p(nonzero: np.ndarray) -> float:
    """Two-sided p of the signed-rank statistic by enumerating all 2^n sign flips (n <= 13, ties or not).

    This is the exact permutation test `scipy.stats.wilcoxon(method="auto")` runs when ranks are tied and
    n <= 13, computed as one matrix product instead of 8192 Python-level statistic calls.
    """
    n = len(nonzero)
    ranks = stats.rankdata(np.abs(nonzero))
    observed = float(ranks[nonzero > 0].sum())
    signs = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    null = signs @ ranks
    tol = 1e-14 * max(abs(observed), 1.0) + 1e-12  # scipy compares with a relative tolerance as well
    less = np.count_nonzero(null <= observed + tol) / null.size
    greater = np.count_nonzero(null >= observed - tol) / null.size
    return float(min(1.0, 2.0 * min(less, greater)))


def wilcoxon(deltas: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test = `scipy.stats.wilcoxon(nonzero, zero_method="wilcox")`.

    Zero deltas are dropped first; with no non-zero delta the result is W = 0, p = 1. Method as scipy's "auto":
    exact without ties, exact permutation over all sign flips with ties and n <= 13, else the normal approximation.
    """
    d = _finite(deltas)
    nonzero = d[d != 0]
    if len(nonzero) == 0:
        return {"W": 0.0, "p_value": 1.0, "n_nonzero": 0}
    tied = len(np.unique(np.abs(nonzero))) < len(nonzero)
    if tied and len(nonzero) <= _EXACT_TIES_MAX_N:
        res = stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided", method="asymptotic")
        return {"W": float(res.statistic), "p_value": _tied_exact_p(nonzero), "n_nonzero": int(len(nonzero))}
    res = stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided")
    return {"W": float(res.statistic), "p_value": float(res.pvalue), "n_nonzero": int(len(nonzero))}


def _draws(requested: str, allowed: tuple[str, ...], cheap: bool) -> str:
    """The draws to use: `requested`, or for "auto" allowed[1] when it is the cheap one, else allowed[0]."""
    if requested not in ("auto", *allowed):
        raise ValueError(f"unknown draws {requested!r}; expected one of {('auto', *allowed)}")
    return requested if requested != "auto" else allowed[1] if cheap else allowed[0]


def _means_by_index(d: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Resample means from index draws: exactly the stream of one `rng.integers(0, n, (n_resamples, n))`."""
    n = len(d)
    out = np.empty(n_resamples)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        out[start:stop] = d[rng.integers(0, n, (stop - start, n))].mean(axis=1)
    return out


def means_from_counts(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Resample means from per-resample counts of each distinct value: `counts @ values / counts.sum(axis=1)`."""
    return (counts @ values) / counts.sum(axis=1)


def _means_by_counts(values: np.ndarray, mult: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Resample means from multinomial counts over the distinct values: O(n_resamples · U) instead of O(n_resamples · n).

    In a resample of n items drawn with replacement, the counts of the distinct values are Multinomial(n, m_u / n),
    so this is the same bootstrap distribution as the index draws (not the same stream).
    """
    n = int(mult.sum())
    out = np.empty(n_resamples)
    rows = max(1, _CHUNK_ELEMENTS // len(values))
    pvals = mult / n
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        out[start:stop] = means_from_counts(rng.multinomial(n, pvals, size=stop - start), values)
    return out


def bootstrap_means(
    deltas: Sequence[float] | np.ndarray, *, n_resamples: int, rng: np.random.Generator, draws: str = "auto"
) -> np.ndarray:
    """Means of `n_resamples` bootstrap resamples of `deltas`.

    draws="index": indices from `rng.integers(0, n, (rows, n))` in consecutive row blocks, which yields exactly
    the stream of one `rng.integers(0, n, (n_resamples, n))` call, i.e. what `scipy.stats.bootstrap` draws.
    draws="counts": `rng.multinomial(n, m_u / n)` counts of the U distinct values per resample (see
    `_means_by_counts`); the same distribution in O(U) per resample.
    draws="auto" (the default) takes the counts when U · `_COUNTS_COST` ≤ n, i.e. when they are the cheaper way
    (one multinomial category costs about as much as `_COUNTS_COST` index draws), else the index draws.
    """
    d = _finite(deltas)
    if len(d) == 0:
        raise ValueError("bootstrap needs at least one value")
    return _resample(d, n_resamples, rng, draws)[0]


def _resample(d: np.ndarray, n_resamples: int, rng: np.random.Generator, draws: str) -> tuple[np.ndarray, float]:
    """Resample means (see `bootstrap_means`) and the observed mean computed the way they are: `d.mean()` for index
    draws, `means_from_counts` of the observed counts for count draws."""
    values, mult = np.unique(d, return_counts=True)
    if _draws(draws, ("index", "counts"), len(values) * _COUNTS_COST <= len(d)) == "counts":
        return _means_by_counts(values, mult, n_resamples, rng), float(means_from_counts(mult[None, :], values)[0])
    return _means_by_index(d, n_resamples, rng), float(d.mean())


def _bca_levels(d: np.ndarray, means: np.ndarray, theta_hat: float, alpha: float) -> tuple[float, float] | None:
    """scipy.stats.bootstrap's BCa quantile levels for the mean; None when the acceleration is undefined.

    The jackknife of a mean is closed-form: leaving out d_i moves the mean by (mean − d_i)/(n − 1), so scipy's
    acceleration Σ(θ̄ − θ_i)³ / (6 (Σ(θ̄ − θ_i)²)^1.5) is Σ(d_i − mean)³ / (6 (Σ(d_i − mean)²)^1.5), computed in O(n).
    """
    if len(d) < 2 or _is_constant(d):
        return None
    below = np.count_nonzero(means < theta_hat) + np.count_nonzero(means <= theta_hat)
    z0 = special.ndtri(below / (2 * len(means)))
    dev = d - d.mean()
    den = float(np.dot(dev, dev))
    if not (den > 0 and np.isfinite(z0)):
        return None
    a_hat = float(np.dot(dev * dev, dev)) / (6.0 * den**1.5)
    z_alpha = special.ndtri(alpha / 2)
    num1 = z0 + z_alpha
    num2 = z0 - z_alpha
    lo = float(special.ndtr(z0 + num1 / (1 - a_hat * num1)))
    hi = float(special.ndtr(z0 + num2 / (1 - a_hat * num2)))
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def bootstrap_cis(
    deltas: Sequence[float] | np.ndarray,
    *,
    n_resamples: int,
    rng: np.random.Generator,
    alpha: float = 0.05,
    draws: str = "auto",
) -> dict[str, list[float | None]]:
    """`{"percentile": [lo, hi], "bca": [lo, hi]}` from ONE set of resamples (see `bootstrap_ci`, `bootstrap_means`).

    BCa's bias correction compares the resample means with the observed mean computed the same way as they are
    (`_resample`), so a resample that reproduces the observed counts is never split from it by rounding.
    """
    d = _finite(deltas)
    if len(d) == 0:
        return {"percentile": [None, None], "bca": [None, None]}
    means, theta_hat = _resample(d, n_resamples, rng, draws)
    plain = (alpha / 2, 1 - alpha / 2)
    out: dict[str, list[float | None]] = {}
    for method, levels in (("percentile", plain), ("bca", _bca_levels(d, means, theta_hat, alpha) or plain)):
        lo, hi = np.quantile(means, levels)
        out[method] = [float(lo), float(hi)]
    return out


def bootstrap_ci(
    deltas: Sequence[float] | np.ndarray,
    *,
    n_resamples: int,
    rng: np.random.Generator,
    alpha: float = 0.05,
    method: str = "percentile",
    draws: str = "auto",
) -> list[float | None]:
    """(1 − alpha) bootstrap CI of the mean; with draws="index" exactly `scipy.stats.bootstrap(..., method=…)`
    given the same generator state (draws: see `bootstrap_means`).

    `percentile`: linear-interpolated alpha/2 and 1 − alpha/2 quantiles of the resampled means.
    `bca`: scipy's bias-corrected and accelerated levels; falls back to percentile when the acceleration is
    undefined (constant deltas, or a single one), where scipy returns NaN. Empty input → [None, None].
    """
    if method not in ("percentile", "bca"):
        raise ValueError(f"unknown bootstrap method {method!r}; expected 'percentile' or 'bca'")
    return bootstrap_cis(deltas, n_resamples=n_resamples, rng=rng, alpha=alpha, draws=draws)[method]


def _walsh_bounds(u: np.ndarray, t: float) -> np.ndarray:
    """q[a] = first index b with fl(u[a] + u[b]) > t, exactly (floating addition is monotone in b)."""
    size = len(u)
    q = np.searchsorted(u, t - u, side="right")
    # t − u[a] is rounded, so the searchsorted guess can be off by a few positions: walk to the exact boundary
    while True:
        up = (q < size) & (u + u[np.minimum(q, size - 1)] <= t)
        if not up.any():
            break
        q = q + up
    while True:
        down = (q > 0) & (u + u[np.maximum(q - 1, 0)] > t)
        if not down.any():
            break
        q = q - down
    return q


def _walsh_count_le(u: np.ndarray, m: np.ndarray, cum: np.ndarray, q: np.ndarray) -> int:
    """Number of Walsh pairs i ≤ j (original indices) whose sum is ≤ t, given q = _walsh_bounds(u, t)."""
    a = np.arange(len(u))
    live = q > a
    diag = m * (m + 1) // 2
    off = m * (cum[q] - cum[a + 1])
    return int(np.sum(np.where(live, diag + off, 0)))


def _band_pairs(u: np.ndarray, m: np.ndarray, q_lo: np.ndarray, q_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums and multiplicities of the unique-value pairs a ≤ b whose sum lies in (lo, hi]."""
    a_all = np.arange(len(u))
    start = np.maximum(a_all, q_lo)
    lengths = np.maximum(q_hi - start, 0)
    a = np.repeat(a_all, lengths)
    offsets = np.cumsum(lengths) - lengths
    b = start[a] + (np.arange(len(a)) - offsets[a])
    weights = np.where(a == b, m[a] * (m[a] + 1) // 2, m[a] * m[b])
    return u[a] + u[b], weights


def _ordered(x: float) -> int:
    """Monotone map of a float to an integer (adjacent floats → adjacent integers)."""
    bits = int(np.float64(x).view(np.int64))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFFFFFFFFFF)


def _from_ordered(k: int) -> float:
    magnitude = float(np.int64(abs(k)).view(np.float64))
    return magnitude if k >= 0 else -magnitude


def _walsh_kth(u: np.ndarray, m: np.ndarray, k: int) -> float:
    """k-th smallest (0-based) Walsh sum x_i + x_j (i ≤ j) of the multiset {u[a] with multiplicity m[a]}.

    Exact: bisect t (alternating value and float-bit midpoints, so at most ~128 steps) keeping
    count(≤ lo) ≤ k < count(≤ hi), with exact counts; once (lo, hi] holds few pairs, enumerate and pick.
    """
    cum = np.concatenate(([0], np.cumsum(m)))
    lo = float(np.nextafter(2 * u[0], -np.inf))
    hi = float(2 * u[-1])
    c_lo = 0
    c_hi = int(cum[-1] * (cum[-1] + 1) // 2)
    q_lo = _walsh_bounds(u, lo)
    q_hi = _walsh_bounds(u, hi)
    step = 0
    while c_hi - c_lo > _HL_BAND_MAX:
        by_value = 0.5 * lo + 0.5 * hi
        by_bits = _from_ordered((_ordered(lo) + _ordered(hi)) // 2)
        first, second = (by_value, by_bits) if step % 2 == 0 else (by_bits, by_value)
        step += 1
        mid = first if lo < first < hi else second
        if not lo < mid < hi:
            return hi  # lo and hi are adjacent floats: every sum in (lo, hi] equals hi
        q_mid = _walsh_bounds(u, mid)
        c_mid = _walsh_count_le(u, m, cum, q_mid)
        if c_mid > k:
            hi, c_hi, q_hi = mid, c_mid, q_mid
        else:
            lo, c_lo, q_lo = mid, c_mid, q_mid
    sums, weights = _band_pairs(u, m, q_lo, q_hi)
    order = np.argsort(sums, kind="stable")
    ranks = c_lo + np.cumsum(weights[order])
    return float(sums[order][np.searchsorted(ranks, k, side="right")])


def _walsh_kth_direct(u: np.ndarray, m: np.ndarray, ks: Sequence[int]) -> list[float]:
    a, b = np.triu_indices(len(u))
    sums = u[a] + u[b]
    weights = np.where(a == b, m[a] * (m[a] + 1) // 2, m[a] * m[b])
    order = np.argsort(sums, kind="stable")
    ranks = np.cumsum(weights[order])
    return [float(sums[order][np.searchsorted(ranks, k, side="right")]) for k in ks]


def hodges_lehmann(deltas: Sequence[float] | np.ndarray) -> float | None:
    """Hodges–Lehmann estimate: the median of the Walsh averages (x_i + x_j)/2 over i ≤ j. None when empty.

    Exact for any n (no fallback to the plain median): ties are collapsed to unique values with counts; up to
    `_HL_DIRECT_MAX_UNIQUE` unique values every pair is enumerated, above that an exact counting selection
    runs in O(U log U) per step.
    """
    d = _finite(deltas)
    n = len(d)
    if n == 0:
        return None
    u, m = np.unique(d, return_counts=True)
    m = m.astype(np.int64)
    total = n * (n + 1) // 2
    ks = [(total - 1) // 2] if total % 2 else [total // 2 - 1, total // 2]
    if len(u) <= _HL_DIRECT_MAX_UNIQUE:
        sums = _walsh_kth_direct(u, m, ks)
    else:
        sums = [_walsh_kth(u, m, k) for k in ks]
    walsh = [s / 2 for s in sums]
    return walsh[0] if len(walsh) == 1 else (walsh[0] + walsh[1]) / 2


def cohens_dz(deltas: Sequence[float] | np.ndarray) -> float | None:
    """Cohen's d_z = mean / sd (ddof=1) of the paired deltas.

    0 when all deltas are 0; None when n < 2 or the deltas are constant but non-zero (d_z would be ±inf).
    """
    d = _finite(deltas)
    if len(d) < 2:
        return None
    if _is_constant(d):
        return 0.0 if d[0] == 0 else None
    return float(d.mean() / d.std(ddof=1))


def cliffs_delta(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Cliff's delta of two samples: P(X > Y) − P(X < Y) over all (x_i, y_j) pairs. None if either is empty.

    Computed by sorting y and counting with searchsorted: O((n + m) log m).
    """
    xa = _finite(x, "x")
    ya = np.sort(_finite(y, "y"))
    if len(xa) == 0 or len(ya) == 0:
        return None
    below = np.searchsorted(ya, xa, side="left").sum(dtype=np.int64)  # pairs with y < x
    above = (len(ya) - np.searchsorted(ya, xa, side="right")).sum(dtype=np.int64)  # pairs with y > x
    return float((int(below) - int(above)) / (len(xa) * len(ya)))


def _byte_sign_table(a: np.ndarray) -> np.ndarray:
    """(ceil(n/8), 256) table: row g, column b = Σ_j ±a[8g + j], + where bit j of b is set (bit 0 = the high bit,
    as `np.unpackbits` orders them); `a` is zero-padded to a multiple of 8."""
    groups = -(-len(a) // 8)
    padded = np.zeros(groups * 8)
    padded[: len(a)] = a
    bits = (np.arange(256)[:, None] >> (7 - np.arange(8))) & 1
    return padded.reshape(groups, 8) @ (2.0 * bits - 1.0).T


def _flip_sums_by_bits(a: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Σ ±a_i per resample, the signs being the bits of `rng.integers(0, 256, (rows, ceil(n/8)), dtype=uint8)`.

    Each byte picks one precomputed signed sum of 8 values, so a resample costs n/8 look-ups, not n products.
    """
    table = _byte_sign_table(a)
    groups = table.shape[0]
    flat = table.ravel()
    offsets = np.arange(groups, dtype=np.intp) * 256
    out = np.empty(n_resamples)
    rows = max(1, _CHUNK_ELEMENTS // groups)
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        raw = rng.integers(0, 256, (stop - start, groups), dtype=np.uint8)
        out[start:stop] = flat[raw.astype(np.intp) + offsets].sum(axis=1)
    return out


def _flip_sums_by_binomial(a: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Σ ±a_i per resample from how many of each distinct |value| are flipped to +: O(U) per resample.

    With m_u deltas of magnitude u, k_u ~ Binomial(m_u, ½) of them are positive and the sum is
    Σ_u u·(2·k_u − m_u): the same distribution as independent fair signs.
    """
    values, mult = np.unique(a, return_counts=True)
    out = np.empty(n_resamples)
    rows = max(1, _CHUNK_ELEMENTS // len(values))
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        plus = rng.binomial(mult, 0.5, size=(stop - start, len(values)))
        out[start:stop] = (2 * plus - mult) @ values
    return out


def sign_flip_permutation_p(
    deltas: Sequence[float] | np.ndarray, *, n_resamples: int, rng: np.random.Generator, draws: str = "auto"
) -> float | None:
    """Two-sided sign-flip permutation p of the mean delta: (1 + #{|perm sum| ≥ |obs sum|}) / (1 + R).

    Zero deltas are dropped first (flipping them changes nothing). draws="bits": one fair sign per remaining delta,
    from the bits of `rng.integers(0, 256, (rows, ceil(n/8)), dtype=uint8)` in row blocks (`_flip_sums_by_bits`).
    draws="binomial": binomial counts per distinct |delta| (`_flip_sums_by_binomial`), the same distribution.
    draws="auto" (the default) takes the binomial counts when U · `_BINOMIAL_COST` ≤ n, else the bits.
    A relative tolerance of 1e-10·Σ|d| absorbs summation-order rounding, so a permutation equal to the observed
    one always counts. All deltas zero → 1.0; empty → None.
    """
    d = _finite(deltas)
    if len(d) == 0:
        return None
    magnitudes = np.abs(d[d != 0])
    n = len(magnitudes)
    cheap = len(np.unique(magnitudes)) * _BINOMIAL_COST <= n
    method = _draws(draws, ("bits", "binomial"), cheap)
    if n == 0:
        return 1.0
    observed = abs(float(d.sum()))
    tolerance = 1e-10 * float(magnitudes.sum())
    flip = _flip_sums_by_binomial if method == "binomial" else _flip_sums_by_bits
    sums = flip(magnitudes, n_resamples, rng)
    hits = int(np.count_nonzero(np.abs(sums) >= observed - tolerance))
    return (1 + hits) / (1 + n_resamples)


def tost_noninferiority(deltas: Sequence[float] | np.ndarray, *, margin: float, alpha: float) -> dict[str, Any]:
    """One-sided t test of non-inferiority, H0: mean delta ≤ −margin (the lower test of statsmodels ttost_paired).

    p_value = t.sf((mean + margin)/se, n − 1); non_inferior = p_value < alpha. `ci` is the two-sided
    (1 − 2·alpha) t interval (its lower bound > −margin ⇔ non_inferior), level recorded in `ci_level`.
    Constant deltas: p = 0 when mean > −margin else 1. n < 2: p_value, non_inferior and ci are None.
    """
    d = _finite(deltas)
    n = len(d)
    result: dict[str, Any] = {
        "margin": float(margin),
        "alpha": float(alpha),
        "n": n,
        "mean_delta": float(d.mean()) if n else None,
        "t": None,
        "df": n - 1 if n >= 2 else None,
        "p_value": None,
        "non_inferior": None,
        "ci_level": 1.0 - 2.0 * float(alpha),
        "ci": [None, None],
    }
    if n < 2:
        return result
    mean = float(d.mean())
    if _is_constant(d):
        p_value = 0.0 if mean > -margin else 1.0
        ci = [mean, mean]
    else:
        se = float(d.std(ddof=1)) / math.sqrt(n)
        t_stat = (mean + margin) / se
        p_value = float(stats.t.sf(t_stat, n - 1))
        crit = float(stats.t.ppf(1.0 - alpha, n - 1))
        ci = [mean - crit * se, mean + crit * se]
        result["t"] = t_stat
    result.update(p_value=p_value, non_inferior=bool(p_value < alpha), ci=ci)
    return result
