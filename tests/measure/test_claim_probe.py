"""The probe that scores claims during training computes what `fakegpt score` computes."""

from __future__ import annotations

import mlflow
import pytest

from fakegpt import cli, tracking
from fakegpt.measure.claim_probe import ClaimProbe
from fakegpt.measure.prompts import DEFAULT_CLAIMS
from fakegpt.models.loading import load_model


def test_probe_equals_a_score_run_on_the_same_model(tmp_path, tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    model.train()
    probe = ClaimProbe(DEFAULT_CLAIMS, batch_size=8, bootstrap=300)
    got = probe(model)
    assert model.training  # the probe leaves the model in the mode it found it
    assert probe(model) == got  # deterministic: dropout off while measuring
    args = ["score", "--models", str(tiny_model_dir), "--out-dir", str(tmp_path / "s"), "--bootstrap", "300"]
    assert cli.main(args) == 0
    (run,) = mlflow.search_runs(experiment_names=["fakegpt"], output_format="list")
    logged = run.data.metrics
    for name in (
        tracking.M_CLAIM_SCORE,
        tracking.M_CLAIM_SCORE_LOW,
        tracking.M_CLAIM_SCORE_HIGH,
        tracking.M_CLAIM_WIN,
        tracking.M_CLAIM_MC1,
        tracking.M_CLAIM_MC2,
        "claim/score/chip",
    ):
        assert got[name] == pytest.approx(logged[name], abs=1e-6), name
