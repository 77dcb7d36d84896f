"""Small, dependency-light interval estimates shared by `score`, `labels` and the experiments."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0, stat=np.mean
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
    values: Sequence[float], clusters: Sequence[str], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
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
    _, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    sums = np.bincount(index, weights=data)  # (k,) per-cluster sum and size
    sizes = np.bincount(index).astype(np.float64)
    if sums.size == 1:
        mean = float(sums[0] / sizes[0])
        return (mean, mean)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, sums.size, size=(n_boot, sums.size))  # (n_boot, k) resampled clusters
    stats = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


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
