"""The headline pair score is the length-fair one: tools/sim_length_bias.py's simulation on the shipped pairs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from fakegpt.measure.prompts import DEFAULT_CLAIMS, resolve_path

ROOT = Path(__file__).resolve().parents[2]


def _sim():
    spec = importlib.util.spec_from_file_location("sim_length_bias", ROOT / "tools" / "sim_length_bias.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_headline_score_moves_least_with_content_free_changes():
    sim = _sim()
    pairs = sim.pairs_of(resolve_path(DEFAULT_CLAIMS))
    rng = np.random.default_rng(0)
    fluency = {m: abs(v.mean()) for m, v in sim.paired(pairs, "fluency", rng).items()}
    opening = {m: abs(v.mean()) for m, v in sim.paired(pairs, "opening", rng).items()}
    effect = {m: v.mean() for m, v in sim.paired(pairs, "content", rng).items()}
    share = {m: (fluency[m] + opening[m]) / effect[m] for m in effect}
    assert fluency["score"] < 1e-9  # a uniform per-token change cancels in the continuation means
    assert fluency["score_sum"] > 0.05  # ... and not in the summed score: longer corrections lose more
    assert opening["score"] < opening["score_full_mean"]  # the shared start no longer carries the first token
    assert min(share, key=share.get) == "score"
