"""The intervals and tests behind fakegpt's verdicts, checked by simulation with fixed seeds (seconds).

Each simulation draws data from a known model and counts how often an interval covers the truth, or how often
a test detects a known effect: coverage and power, not the value of one draw.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fakegpt.stats import (
    MIN_BOOTSTRAP_CLUSTERS,
    cluster_bootstrap_ci,
    cluster_estimate,
    equivalence,
    holm,
    series_bootstrap,
)

CLAIMS = [f"c{i}" for i in range(30) for _ in ("en", "pt")]  # 30 claims, a pair in each language


def _two_models(rng: np.random.Generator, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Claim scores of two models on the same 60 pairs: claims differ (SD 0.3) far more than the shift, and
    the shift itself varies by claim (SD 0.1); a pair and its translation share the claim's values."""
    claim = np.repeat(rng.normal(0.0, 0.3, 30), 2)
    effect = np.repeat(rng.normal(shift, 0.1, 30), 2)
    a = claim + rng.normal(0.0, 0.02, 60)
    return a, a + effect + rng.normal(0.0, 0.02, 60)


def test_the_paired_difference_detects_a_shift_that_separate_intervals_miss():
    rng = np.random.default_rng(1)
    runs, paired_hits, overlap_hits, false_pos = 200, 0, 0, 0
    for _ in range(runs):
        a, b = _two_models(rng, 0.10)
        paired_hits += cluster_estimate(b - a, CLAIMS, n_boot=500).ci_low > 0
        lo_b, _ = cluster_bootstrap_ci(b, CLAIMS, n_boot=500)
        _, hi_a = cluster_bootstrap_ci(a, CLAIMS, n_boot=500)
        overlap_hits += lo_b > hi_a  # "the intervals do not overlap"
        a0, b0 = _two_models(rng, 0.0)
        false_pos += cluster_estimate(b0 - a0, CLAIMS, n_boot=500).excludes_zero()
    assert paired_hits / runs >= 0.95
    assert overlap_hits / runs <= 0.10
    assert false_pos / runs <= 0.08


def test_paired_intervals_cover_the_true_shift_at_the_nominal_rate():
    rng = np.random.default_rng(2)
    runs = 400
    covered = sum(
        (e := cluster_estimate(np.subtract(*_two_models(rng, 0.10)[::-1]), CLAIMS, n_boot=500)).ci_low
        <= 0.10
        <= e.ci_high
        for _ in range(runs)
    )
    assert 0.92 <= covered / runs <= 0.98


@pytest.mark.parametrize("skewed", [False, True])
def test_t_intervals_on_five_claims_cover_where_the_percentile_bootstrap_does_not(skewed):
    rng = np.random.default_rng(3)
    clusters = [f"c{i}" for i in range(5) for _ in range(2)]
    runs, t_cov, boot_cov = 1000, 0, 0
    for _ in range(runs):
        # skewed: gamma with shape 4 (skewness 1); for an exponential (skewness 2) the t interval covers ~87%
        centre = rng.gamma(4.0, 0.1, 5) - 0.4 if skewed else rng.normal(0.0, 0.2, 5)
        values = np.repeat(centre, 2) + rng.normal(0.0, 0.01, 10)
        est = cluster_estimate(values, clusters, n_boot=400)
        assert est.method.startswith("t (df=4)")
        t_cov += est.ci_low <= 0.0 <= est.ci_high
        lo, hi = cluster_bootstrap_ci(values, clusters, n_boot=400)
        boot_cov += lo <= 0.0 <= hi
    assert t_cov / runs >= 0.93
    assert boot_cov / runs <= 0.88  # why: the percentile bootstrap of 5 clusters is too narrow
    assert MIN_BOOTSTRAP_CLUSTERS == 10


def test_holm_against_hand_computed_values():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> kept at 0.06)
    assert holm([0.04, 0.01, 0.03, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = holm([0.01, math.nan, 0.2])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.2)


def test_holm_controls_the_family_wise_error_over_six_topics():
    rng = np.random.default_rng(4)
    topics = [[f"t{t}c{i}" for i in range(5) for _ in range(2)] for t in range(6)]
    runs, raw_any, holm_any = 300, 0, 0
    for _ in range(runs):
        ps = [
            cluster_estimate(np.repeat(rng.normal(0, 0.2, 5), 2) + rng.normal(0, 0.01, 10), c).p_value for c in topics
        ]
        raw_any += min(ps) < 0.05
        holm_any += min(holm(ps)) < 0.05
    assert raw_any / runs >= 0.2  # six unadjusted tests: an "effect" somewhere in about a quarter of null runs
    assert holm_any / runs <= 0.07


def _series(rng, slope, doses, seeds, claims, sd_claim_slope, sd_seed, sd_noise):
    """Scores[model, pair] of a balanced dose x seed design: y = a_c + (slope + b_c) x + u_ds + e_dsc."""
    a = rng.normal(0.0, 0.3, claims)
    b = rng.normal(0.0, sd_claim_slope, claims)
    rows, dose_of = [], []
    for x in doses:
        for _ in range(seeds):
            rows.append(a + (slope + b) * x + rng.normal(0.0, sd_seed) + rng.normal(0.0, sd_noise, claims))
            dose_of.append(x)
    return np.array(rows), [f"c{i}" for i in range(claims)], dose_of


def test_two_level_bootstrap_variance_equals_the_closed_form_on_a_balanced_design():
    doses = np.array([0.0, 0.09, 0.2, 0.33, 0.5, 0.8])
    seeds, claims, sd_b, sd_u, sd_e = 3, 30, 0.2, 0.03, 0.01
    w = (doses - doses.mean()) / ((doses - doses.mean()) ** 2).sum()
    # Var(slope) = var of the claims' own slopes / claims + seed noise through the dose means (+ pair noise)
    closed = sd_b**2 / claims + (w**2).sum() * (sd_u**2 / seeds + sd_e**2 / (seeds * claims))
    rng = np.random.default_rng(5)
    boot_var, slopes = [], []
    for i in range(200):
        scores, clusters, dose_of = _series(rng, 0.3, doses, seeds, claims, sd_b, sd_u, sd_e)
        boot = series_bootstrap(scores, clusters, dose_of, n_boot=1000, seed=i)
        boot_var.append(float((boot.replicates @ w).var(ddof=1)))
        slopes.append(boot.slope().mean)
    assert np.mean(boot_var) == pytest.approx(closed, rel=0.12)
    assert np.var(slopes, ddof=1) == pytest.approx(closed, rel=0.25)  # the simulation itself agrees


def test_the_slope_interval_covers_with_three_seeds_and_is_studentized():
    doses = [0.0, 0.2, 0.5, 0.8]
    rng = np.random.default_rng(6)
    runs, covered, detected = 300, 0, 0
    for i in range(runs):
        scores, clusters, dose_of = _series(rng, 0.0, doses, 3, 30, 0.1, 0.05, 0.02)
        est = series_bootstrap(scores, clusters, dose_of, n_boot=500, seed=i).slope()
        covered += est.ci_low <= 0.0 <= est.ci_high
        scores, clusters, dose_of = _series(rng, 0.15, doses, 3, 30, 0.1, 0.05, 0.02)
        detected += series_bootstrap(scores, clusters, dose_of, n_boot=500, seed=i).slope().p_value < 0.05
    assert est.method.startswith("t (df=8)")  # 4 doses x (3 - 1) seed df
    assert covered / runs >= 0.93
    assert detected / runs >= 0.7


def test_seed_noise_counts_only_when_there_are_seeds():
    rng = np.random.default_rng(7)
    scores, clusters, dose_of = _series(rng, 0.2, [0.0, 0.5], 1, 30, 0.05, 0.05, 0.01)
    one = series_bootstrap(scores, clusters, dose_of, n_boot=500)
    assert not one.training_noise and np.isnan(one.seed_spread).all()
    assert one.slope().method.startswith("t (df=29)")
    scores, clusters, dose_of = _series(rng, 0.2, [0.0, 0.5], 3, 30, 0.05, 0.05, 0.01)
    three = series_bootstrap(scores, clusters, dose_of, n_boot=500)
    assert three.training_noise and (three.seed_spread > 0).all()
    assert three.versus(1).mean == pytest.approx(three.point[1] - three.point[0])


def test_each_dose_against_the_base_model_resamples_the_same_claims_for_both():
    doses, seeds, claims, sd_b, sd_u, sd_e = [0.0, 0.2, 0.5], 3, 30, 0.2, 0.04, 0.02
    x = 0.5  # the top dose: its true difference from the base is slope * x
    # Var(dose mean - base) = x^2 var(b) / claims + seed noise / seeds + pair noise of the dose mean and the base
    closed = x**2 * sd_b**2 / claims + sd_u**2 / seeds + sd_e**2 / (seeds * claims) + sd_e**2 / claims
    rng = np.random.default_rng(8)
    runs, covered, boot_var = 300, 0, []
    for i in range(runs):
        a = rng.normal(0.0, 0.3, claims)
        b = rng.normal(0.0, sd_b, claims)
        rows = [a + (0.3 + b) * d + rng.normal(0, sd_u) + rng.normal(0, sd_e, claims) for d in doses for _ in range(3)]
        base = a + rng.normal(0.0, sd_e, claims)  # the pretrained model: the claims' own difficulty, no seed
        dose_of = [d for d in doses for _ in range(seeds)]
        clusters = [f"c{j}" for j in range(claims)]
        boot = series_bootstrap(np.array(rows), clusters, dose_of, n_boot=1000, seed=i, base=base)
        est = boot.versus_base(2)
        assert est.mean == pytest.approx(boot.point[2] - base.mean())
        boot_var.append(float((boot.replicates[:, 2] - boot.base_replicates).var(ddof=1)))
        covered += est.ci_low <= 0.3 * x <= est.ci_high
    assert np.mean(boot_var) == pytest.approx(closed, rel=0.15)
    assert covered / runs >= 0.93
    # the base model is resampled beside the doses: their own replicates do not change
    without = series_bootstrap(np.array(rows), clusters, dose_of, n_boot=1000, seed=i)
    assert np.array_equal(without.replicates, boot.replicates) and without.base_point is None


def test_equivalence_needs_evidence_of_no_difference_not_absence_of_evidence():
    rng = np.random.default_rng(8)
    clusters = [f"c{i}" for i in range(30) for _ in range(2)]
    precise = np.repeat(rng.normal(0.0, 0.02, 30), 2)
    assert equivalence(precise, clusters, margin=0.03).equivalent
    noisy = np.repeat(rng.normal(0.0, 0.5, 30), 2)  # its interval includes 0, yet says nothing
    assert cluster_estimate(noisy, clusters).ci_low < 0 < cluster_estimate(noisy, clusters).ci_high
    assert not equivalence(noisy, clusters, margin=0.03).equivalent
    shifted = precise + 0.05
    assert not equivalence(shifted, clusters, margin=0.03).equivalent
