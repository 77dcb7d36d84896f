"""Intervals that respect the design: claims and their translations, samples of one prompt."""

from __future__ import annotations

import numpy as np
import pytest

from fakegpt.stats import bootstrap_ci, cluster_bootstrap_ci, clustered_wilson, design_effect, wilson_interval


def test_perfectly_correlated_translations_give_the_portuguese_only_interval():
    """30 claims scored in pt and, identically, in en: 60 pairs carry the evidence of 30, no more."""
    rng = np.random.default_rng(1)
    pt = rng.normal(0.2, 1.0, size=30)
    claims = [f"topic/{i}" for i in range(30)]
    both = np.concatenate([pt, pt])  # the English pair of claim i scores exactly as its Portuguese original
    clustered = cluster_bootstrap_ci(both, claims + claims, seed=3)
    pt_only = cluster_bootstrap_ci(pt, claims, seed=3)
    assert clustered == pytest.approx(pt_only)
    naive = bootstrap_ci(both, seed=3)  # pairs as independent: too narrow by about sqrt(2)
    assert (naive[1] - naive[0]) < 0.8 * (clustered[1] - clustered[0])


def test_singleton_clusters_are_the_plain_bootstrap():
    values = np.random.default_rng(2).normal(size=200)
    low, high = cluster_bootstrap_ci(values, [str(i) for i in range(200)], n_boot=4000, seed=0)
    ref = bootstrap_ci(values, n_boot=4000, seed=0)
    assert low == pytest.approx(ref[0], abs=0.03) and high == pytest.approx(ref[1], abs=0.03)
    assert cluster_bootstrap_ci([1.0, 3.0], ["a", "a"]) == (2.0, 2.0)  # one cluster: its mean, zero width


def test_design_effect_and_clustered_wilson():
    # 10 prompts x 4 samples; every prompt's samples agree (all adopt or none): the 40 samples are 10 answers.
    agree = design_effect([4] * 5 + [0] * 5, [4] * 10)
    assert agree == pytest.approx(4 * 10 / 9 * 40 / 40, rel=0.02)  # = m * k/(k-1): the cluster size, ~4.4
    low, high, deff = clustered_wilson([4] * 5 + [0] * 5, [4] * 10)
    assert deff == agree
    plain = wilson_interval(20, 40)
    assert low < plain[0] and high > plain[1]  # wider than treating 40 samples as independent
    # one sample per prompt: exactly Wilson's interval
    assert clustered_wilson([1] * 7 + [0] * 13, [1] * 20)[:2] == pytest.approx(wilson_interval(7, 20))
    # within-prompt disagreement spread evenly: no design effect beyond 1, never narrower than Wilson
    assert design_effect([2] * 10, [4] * 10) == 1.0
    assert clustered_wilson([0] * 10, [4] * 10)[:2] == (0.0, pytest.approx(wilson_interval(0, 40)[1]))
