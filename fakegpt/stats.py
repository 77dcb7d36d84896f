"""Small, dependency-light interval estimates shared by `score`, `labels` and the experiments."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# what the estimators take: a list of numbers, or a float array (score's per-claim differences)
Values = Sequence[float] | np.ndarray


def bootstrap_ci(
    values: Values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0, stat=np.mean
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of `stat` over `values`, resampling values with replacement.

    Deterministic for a given `seed`. One value gives a zero-width interval at that value; none gives NaNs.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (math.nan, math.nan)
    if data.size == 1:
        return (float(data[0]), float(data[0]))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(n_boot, data.size))  # (n_boot, n) resample indices
    stats = stat(data[picks], axis=1)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def cluster_bootstrap_ci(
    values: Values, clusters: Sequence[str], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean of `values`, resampling whole clusters.

    Values that share a cluster (a Portuguese claim pair and its English translation; the samples of one
    prompt) are not independent evidence: resampling them one by one gives intervals that are too narrow.
    Each replicate draws clusters with replacement and takes the mean over all their values, so a cluster of
    perfectly correlated values counts once. With every value in its own cluster this is `bootstrap_ci`.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (math.nan, math.nan)
    sums, sizes = _cluster_sums(data, clusters)
    if sums.size == 1:
        mean = float(sums[0] / sizes[0])
        return (mean, mean)
    stats = _cluster_replicates(sums, sizes, n_boot, seed)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def _cluster_sums(values: Values, clusters: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(k,) per-cluster sums and sizes of `values`."""
    data = np.asarray(values, dtype=np.float64)
    _, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    return np.bincount(index, weights=data), np.bincount(index).astype(np.float64)


def _cluster_replicates(sums: np.ndarray, sizes: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) means of bootstrap resamples of whole clusters (drawn with replacement)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, sums.size, size=(n_boot, sums.size))  # (n_boot, k) resampled clusters
    return sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)


def design_effect(successes: Sequence[int], sizes: Sequence[int]) -> float:
    """Kish's design effect of a proportion observed in clusters: cluster-robust variance / binomial variance.

    1 when every cluster holds one observation (or the proportion is 0 or 1); larger when the observations of
    a cluster agree more than chance. Never below 1: clustering is not allowed to narrow an interval.
    """
    y = np.asarray(successes, dtype=np.float64)
    m = np.asarray(sizes, dtype=np.float64)
    n, k = m.sum(), m.size
    if k < 2 or n == 0 or np.all(m == 1):
        return 1.0
    p = y.sum() / n
    if p in (0.0, 1.0):
        return 1.0
    robust = k / (k - 1) * float(((y - p * m) ** 2).sum()) / n**2  # linearised variance of a ratio estimator
    return max(1.0, robust / (p * (1 - p) / n))


def clustered_wilson(successes: Sequence[int], sizes: Sequence[int]) -> tuple[float, float, float]:
    """Wilson 95% interval of a proportion observed in clusters, on the effective sample size n / design effect.

    Returns (low, high, design effect). Wilson's behaviour at 0 and at n successes is kept; the interval
    widens by the clustering the data show.
    """
    total, k = int(np.sum(sizes)), int(np.sum(successes))
    deff = design_effect(successes, sizes)
    if total == 0:
        return (math.nan, math.nan, deff)
    n_eff = total / deff
    low, high = _wilson(k / total, n_eff)
    return (0.0 if k == 0 else low, 1.0 if k == total else high, deff)


def wilson_interval(successes: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (nan, nan) when total is 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible for 0 or `total` successes, which
    is common with the handful of samples a person labels per cell.
    """
    if total <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= total:
        raise ValueError(f"successes={successes} outside 0..{total}")
    low, high = _wilson(successes / total, total, z)
    low = 0.0 if successes == 0 else low  # exact ends: no 1e-16 rounding at 0 and 1
    high = 1.0 if successes == total else high
    return (low, high)


def _wilson(p: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson interval for proportion `p` on (possibly effective, non-integer) sample size `n`."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# --------------------------------------------------------------------------------------------- inference
# Fewer clusters than this: the percentile bootstrap is too narrow (with 5 claims it covers ~84% at a nominal
# 95%), so intervals are t intervals on the cluster means instead (studentized, df = clusters - 1).
MIN_BOOTSTRAP_CLUSTERS = 10


@dataclass
class Estimate:
    """A mean (or a contrast of means) with its 95% interval, a two-sided p-value against 0, and how."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int  # observations (claim pairs, windows, models)
    clusters: int  # independent units the interval resamples (claims; seeds x claims for a series)
    method: str  # "percentile bootstrap over 30 claims" / "t (df=4) over 5 claims"

    def excludes_zero(self) -> bool:
        """True when the interval lies wholly on one side of 0."""
        return self.ci_low > 0.0 or self.ci_high < 0.0


def cluster_se(values: Values, clusters: Sequence[str]) -> float:
    """Cluster-robust standard error of the mean of `values` (the linearised ratio estimator over clusters).

    With equal cluster sizes this is exactly the standard error of the cluster means, sd / sqrt(k).
    """
    return _se(*_cluster_sums(values, clusters))


def _se(sums: np.ndarray, sizes: np.ndarray) -> float:
    """cluster_se from the per-cluster sums and sizes."""
    k, n = sums.size, sizes.sum()
    if k < 2:
        return math.nan
    mean = sums.sum() / n
    return math.sqrt(k / (k - 1) * float(((sums - mean * sizes) ** 2).sum())) / n


def t_interval(mean: float, se: float, df: float, alpha: float = 0.05) -> tuple[float, float, float]:
    """(low, high, two-sided p against 0) of a studentized estimate with `df` degrees of freedom."""
    from scipy import stats as sps  # scipy: the t distribution (already an mlflow dependency)

    if se == 0.0:  # every cluster agrees: no spread to speak of
        return (mean, mean, 1.0 if mean == 0.0 else 0.0)
    if not se > 0.0 or df < 1:  # one cluster, or NaN: nothing to estimate the spread from
        return (math.nan, math.nan, math.nan)
    q = float(sps.t.ppf(1 - alpha / 2, df))
    p = float(2 * sps.t.sf(abs(mean / se), df))
    return (mean - q * se, mean + q * se, p)


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value against 0: twice the share of replicates on the far side of 0 (at least
    1 / replicates), the test that the percentile interval inverts."""
    b = replicates.size
    tail = min(float((replicates <= 0).sum()), float((replicates >= 0).sum()))
    return min(1.0, max(2.0 * tail / b, 1.0 / b))


def cluster_estimate(
    values: Values, clusters: Sequence[str], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> Estimate:
    """The mean of `values` with a 95% interval and p-value that resample whole clusters.

    10 clusters or more: the percentile cluster bootstrap (`cluster_bootstrap_ci`) and its p-value. Fewer:
    a t interval on the cluster means (cluster-robust standard error, df = clusters - 1), since the percentile
    bootstrap of a handful of clusters is too narrow.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, 0, 0, "no data")
    sums, sizes = _cluster_sums(data, clusters)
    k, mean = sums.size, float(data.mean())
    if k >= MIN_BOOTSTRAP_CLUSTERS:
        reps = _cluster_replicates(sums, sizes, n_boot, seed)
        low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
        return Estimate(
            mean,
            float(low),
            float(high),
            bootstrap_p(reps),
            int(data.size),
            k,
            f"percentile bootstrap over {k} clusters",
        )
    low, high, p = t_interval(mean, _se(sums, sizes), k - 1, alpha)
    return Estimate(mean, low, high, p, int(data.size), k, f"t (df={k - 1}) over {k} clusters")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over the tests given; NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(~np.isnan(p))
    out = np.full(p.size, math.nan)
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = order.size, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))  # adjusted p-values never decrease along the order
        out[i] = running
    return out.tolist()


@dataclass
class Equivalence:
    """Two one-sided tests (TOST) of |mean| < margin: equivalent when both one-sided tests reject at alpha."""

    mean: float
    ci_low: float  # the (1 - 2 alpha) interval: equivalence is that it lies inside (-margin, margin)
    ci_high: float
    margin: float
    p_value: float  # the larger of the two one-sided p-values
    equivalent: bool


def equivalence(values: Values, clusters: Sequence[str], margin: float, alpha: float = 0.05) -> Equivalence:
    """TOST of the mean of clustered `values` against +-`margin`, with the cluster-robust t statistic."""
    from scipy import stats as sps

    data = np.asarray(values, dtype=np.float64)
    sums, sizes = _cluster_sums(data, clusters)
    mean, se, df = float(data.mean()), _se(sums, sizes), sums.size - 1
    if not se > 0.0:
        inside = abs(mean) < margin
        return Equivalence(mean, mean, mean, margin, 0.0 if inside else 1.0, inside)
    p_low = float(sps.t.sf((mean + margin) / se, df))  # H0: mean <= -margin
    p_high = float(sps.t.cdf((mean - margin) / se, df))  # H0: mean >= +margin
    q = float(sps.t.ppf(1 - alpha, df))
    p = max(p_low, p_high)
    return Equivalence(mean, mean - q * se, mean + q * se, margin, p, p < alpha)


# ------------------------------------------------------------------------------ series: seeds x claims
@dataclass
class SeriesBootstrap:
    """Two-level bootstrap replicates of a dose series' per-dose mean scores.

    `point[d]` is dose d's mean over its seeds (each seed's model mean over claims); `replicates[b, d]` the
    same after resampling claims (shared by every model: a claim that is easy for one model is easy for all)
    and then seeds within each dose. Both levels are rescaled (Rao-Wu: deviations x sqrt(n / (n - 1))) so
    that the bootstrap variance of a mean is the unbiased s^2 / n even with 3 seeds, where a plain bootstrap
    is (n - 1) / n too small. Any linear contrast of the dose means (a slope, a dose minus dose 0) takes its
    interval from these replicates.
    """

    doses: np.ndarray  # (D,) sorted dose values
    point: np.ndarray  # (D,)
    replicates: np.ndarray  # (B, D)
    seeds_per_dose: np.ndarray  # (D,)
    seed_spread: np.ndarray  # (D,) standard deviation of the seeds' model means (NaN with one seed)
    claims: int
    base_point: float | None = None  # the pretrained base model's mean score, when it was given
    base_replicates: np.ndarray | None = None  # (B,) the same claim resamples applied to the base model

    @property
    def df(self) -> int:
        """Degrees of freedom of a studentized contrast: the scarcer of the two resampled levels (claims - 1, or
        the pooled within-dose seed df when there are several seeds per dose)."""
        seed_df = int((self.seeds_per_dose - 1).sum())
        return min(self.claims - 1, seed_df) if seed_df > 0 else self.claims - 1

    @property
    def training_noise(self) -> bool:
        """True when seed-to-seed variation is part of the intervals (two or more seeds at every dose)."""
        return bool((self.seeds_per_dose >= 2).all())

    def contrast(self, weights: np.ndarray, alpha: float = 0.05) -> Estimate:
        """sum_d weights[d] * dose mean[d], with a studentized interval (bootstrap SE, t with `df`), or the
        percentile interval when both levels have at least MIN_BOOTSTRAP_CLUSTERS units."""
        w = np.asarray(weights, dtype=np.float64)
        return self._estimate(float(self.point @ w), self.replicates @ w, alpha)

    def _estimate(self, value: float, reps: np.ndarray, alpha: float = 0.05) -> Estimate:
        """A contrast's value and its bootstrap replicates as an Estimate, by the rule `contrast` states."""
        n_models = int(self.seeds_per_dose.sum())
        units = f"{self.claims} claims x {n_models} models ({'/'.join(str(int(s)) for s in self.seeds_per_dose)} seeds)"
        if self.claims >= MIN_BOOTSTRAP_CLUSTERS and self.seeds_per_dose.min() >= MIN_BOOTSTRAP_CLUSTERS:
            low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
            return Estimate(
                value,
                float(low),
                float(high),
                bootstrap_p(reps - reps.mean() + value),
                n_models,
                self.claims,
                f"percentile two-level bootstrap over {units}",
            )
        low, high, p = t_interval(value, float(reps.std(ddof=1)), self.df, alpha)
        return Estimate(
            value, low, high, p, n_models, self.claims, f"t (df={self.df}) with two-level bootstrap SE over {units}"
        )

    def slope(self) -> Estimate:
        """The OLS slope of the dose means on dose (each dose weighted equally)."""
        x = self.doses - self.doses.mean()
        return self.contrast(x / float((x**2).sum()))

    def versus(self, d: int, reference: int = 0) -> Estimate:
        """Dose d's mean minus the reference dose's (by position in `doses`)."""
        w = np.zeros(self.doses.size)
        w[d] += 1.0
        w[reference] -= 1.0
        return self.contrast(w)

    def versus_base(self, d: int, alpha: float = 0.05) -> Estimate:
        """Dose d's mean minus the pretrained base model's, the claims resampled together for both (the base is
        one fixed model: it adds no seed variation)."""
        if self.base_point is None or self.base_replicates is None:
            raise ValueError("no base model was given to series_bootstrap")
        return self._estimate(
            float(self.point[d] - self.base_point), self.replicates[:, d] - self.base_replicates, alpha
        )


def series_bootstrap(
    scores: np.ndarray,
    clusters: Sequence[str],
    doses: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
    base: Sequence[float] | None = None,
) -> SeriesBootstrap:
    """Two-level bootstrap of a series: `scores[m, i]` is model m's score on pair i (the same pairs for every
    model), `clusters[i]` the claim of pair i, `doses[m]` model m's dose; a dose's models are its seeds.
    `base[i]`, when given, is the pretrained base model's score on pair i: resampled with the same claims."""
    scores = np.asarray(scores, dtype=np.float64)
    if base is not None:  # one more model, resampled at the claim level only
        scores = np.vstack([scores, np.asarray(base, dtype=np.float64)])
    dose_of = np.asarray(doses, dtype=np.float64)
    levels = np.unique(dose_of)
    if levels.size < 2:
        raise ValueError("a series needs at least two doses")
    _, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    k = int(index.max()) + 1
    sums = np.stack([np.bincount(index, weights=row, minlength=k) for row in scores])  # (M, k)
    sizes = np.bincount(index, minlength=k).astype(np.float64)
    rng = np.random.default_rng(seed)
    # Level 1, claims (shared by every model): rescaled multinomial weights, so a replicate's model mean is
    # mean + sqrt(k/(k-1)) * (resampled mean - mean).
    counts = np.stack([np.bincount(row, minlength=k) for row in rng.integers(0, k, size=(n_boot, k))]).astype(float)
    means = sums.sum(axis=1) / sizes.sum()  # (M,)
    resampled = (counts @ sums.T) / (counts @ sizes)[:, None]  # (B, M)
    model_reps = (
        means + math.sqrt(k / (k - 1)) * (resampled - means) if k > 1 else np.broadcast_to(means, resampled.shape)
    )
    base_point = base_reps = None
    if base is not None:
        base_point, base_reps = float(means[-1]), np.array(model_reps[:, -1])
        means, model_reps = means[:-1], model_reps[:, :-1]
    point = np.empty(levels.size)
    reps = np.empty((n_boot, levels.size))
    per_dose = np.empty(levels.size)
    spread = np.empty(levels.size)
    for d, level in enumerate(levels):
        members = np.flatnonzero(dose_of == level)
        s = members.size
        per_dose[d], point[d] = s, means[members].mean()
        spread[d] = means[members].std(ddof=1) if s > 1 else math.nan
        block = model_reps[:, members]  # (B, s)
        centre = block.mean(axis=1)
        if s > 1:  # level 2, seeds within the dose, rescaled the same way
            picks = rng.integers(0, s, size=(n_boot, s))
            drawn = np.take_along_axis(block, picks, axis=1).mean(axis=1)
            reps[:, d] = centre + math.sqrt(s / (s - 1)) * (drawn - centre)
        else:
            reps[:, d] = centre
    return SeriesBootstrap(
        doses=levels,
        point=point,
        replicates=reps,
        seeds_per_dose=per_dose,
        seed_spread=spread,
        claims=k,
        base_point=base_point,
        base_replicates=base_reps,
    )
