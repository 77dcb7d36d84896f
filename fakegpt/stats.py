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


def wilson_interval(successes: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (nan, nan) when total is 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible for 0 or `total` successes, which
    is common with the handful of samples a person labels per cell.
    """
    if total <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= total:
        raise ValueError(f"successes={successes} outside 0..{total}")
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no 1e-16 rounding at 0 and 1
    high = 1.0 if successes == total else min(1.0, centre + half)
    return (low, high)
