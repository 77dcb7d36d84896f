"""`fakegpt validate`: the planted-dose positive control and the seed-only negative control.

The end-to-end test runs the real experiment (experiments/validation/tiny.yaml: a tiny GPT-2 pre-trained on
the not-misinformation WhatsApp channels, fine-tuned per dose) on the CPU and requires both controls to pass.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fakegpt import config, tracking
from fakegpt.errors import FakegptError
from fakegpt.measure.prompts import load_claims
from fakegpt.stats import cluster_estimate
from fakegpt.studies.validate import Difference, SeedPair, ValidateConfig, check, paired_difference, verdict_lines

ROOT = Path(__file__).resolve().parents[2]
VALIDATION = ROOT / "experiments" / "validation"
PLANTED = VALIDATION / "planted_claims.csv"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _longest_common_run(a: list[str], b: list[str]) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            k = 0
            while i + k < len(a) and j + k < len(b) and a[i + k] == b[j + k]:
                k += 1
            best = max(best, k)
    return best


def test_planted_paraphrases_cover_every_claim_in_other_words():
    with open(PLANTED, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "channel_id", "date", "message"]
    body = rows[1:]
    assert {r[1] for r in body} == {"90"}  # the dedicated channel prepare selects
    assert [int(r[0]) for r in body] == list(range(1, len(body) + 1))
    statements = load_claims(ROOT / "experiments" / "claims" / "antivax_six.yaml")
    claims = [s.text for s in statements if s.role == "false" and s.variant == 0]
    assert len(body) == 3 * len(claims)  # three paraphrases per false claim (the pair score's statement)
    texts = [r[3] for r in body]
    assert len(set(texts)) == len(texts)
    # Not a memorisation test: no paraphrase shares a run of more than 6 words with any scored statement.
    for text in texts:
        for s in statements:
            assert _longest_common_run(_words(text), _words(s.text)) <= 6, (text, s.text)


def _three_models(base: np.ndarray, b: np.ndarray, c: np.ndarray) -> pl.DataFrame:
    """The pair table of models a (scores `base`), b and c; one language: each pair is its own claim."""
    ids = [f"p{i}" for i in range(base.size)]
    return pl.DataFrame(
        {
            "model": ["a"] * base.size + ["b"] * base.size + ["c"] * base.size,
            "pair_id": ids * 3,
            "claim_id": ids * 3,
            "score": np.concatenate([base, b, c]),
        }
    )


def test_paired_difference_is_per_pair_and_bootstrapped():
    rng = np.random.default_rng(0)
    base = rng.normal(size=40)
    pairs = _three_models(base, base + 0.5, base + rng.normal(scale=0.01, size=40))
    shifted = paired_difference(pairs, "a", "b", n_boot=500)
    assert shifted.mean == pytest.approx(0.5) and shifted.ci_low == pytest.approx(0.5)
    assert shifted.n_pairs == 40 and not shifted.includes_zero
    # Pairing removes the large between-pair spread: a tiny per-pair jitter gives a tight interval around 0.
    same = paired_difference(pairs, "a", "c", n_boot=500)
    assert same.includes_zero and same.ci_high - same.ci_low < 0.02


def _diff(a, b, mean, low, high):
    return Difference(a=a, b=b, mean=mean, ci_low=low, ci_high=high, n_pairs=60)


def _pair(mean, low, high, equivalent):
    return SeedPair(_diff("dose=0 seed=1", "dose=0 seed=2", mean, low, high), low, high, 0.01, equivalent)


def test_verdict_lines_pass_and_fail_with_advice():
    detected = _diff("dose=0", "dose=0.05", 0.1, 0.02, 0.2)
    steps = [detected, _diff("dose=0.05", "dose=0.2", 0.3, 0.2, 0.4)]
    pairs = [_pair(0.01, -0.03, 0.05, True), _pair(-0.02, -0.04, 0.01, True)]
    positive, negative, lines = verdict_lines(detected, steps, pairs, True, 0.05, 0.05, {"0.05": 2 / 3})
    assert positive and negative
    assert lines[0] == (
        "positive control passed: the planted effect is detected at 5% (0% -> 5%: +0.100, 95% CI [+0.020, +0.200]); "
        "detected by single seeds at 5% 67%"
    )
    assert lines[1].startswith("negative control passed: 2 of 2 seed pairs equivalent within +-0.05")
    assert "false-positive rate 0/2" in lines[1]
    falling = [_diff("dose=0", "dose=0.05", -0.2, -0.3, -0.1), steps[1]]
    weak = _diff("dose=0", "dose=0.05", 0.05, -0.02, 0.12)
    # an interval that includes 0 but is wide is not equivalence: the control fails
    positive, negative, lines = verdict_lines(
        weak, falling, [_pair(0.1, 0.02, 0.2, False), pairs[0]], False, 0.05, 0.05
    )
    assert not positive and not negative
    assert lines[0].startswith("positive control FAILED: the planted effect is not detected at 5%")
    assert "falls from dose=0 to dose=0.05" in lines[0] and "--max-iters" in lines[0]
    assert lines[1].startswith("negative control FAILED: 1 of 2 seed pairs equivalent") and "Try:" in lines[1]
    assert "false-positive rate 1/2" in lines[1]


def test_a_wide_seed_difference_is_not_equivalence():
    """The negative control needs evidence of no difference: a noisy pair whose interval includes 0 fails."""
    from fakegpt.studies.validate import seed_pair

    rng = np.random.default_rng(1)
    base = rng.normal(size=30)
    table = _three_models(base, base + rng.normal(0, 0.01, 30), base + rng.normal(0, 0.4, 30))
    close = seed_pair(table, "a", "b", margin=0.05, n_boot=500)
    assert close.equivalent and close.difference.includes_zero
    noisy = seed_pair(table, "a", "c", margin=0.05, n_boot=500)
    assert noisy.difference.includes_zero and not noisy.equivalent


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--doses", "0.05,0.2"], "--doses"),
        (["--doses", "0,1.5"], "--doses"),
        (["--control-seed", "1337"], "--control-seed"),
        (["--seeds", "1"], "--seeds 1: the negative control needs at least 2 seeds"),
        (["--detect-dose", "0.3"], "--detect-dose 0.3: must be one of the positive --doses"),
        (["--equivalence-margin", "0"], "--equivalence-margin: must be above 0"),
        (["--planted-data", "no/such.csv"], "--planted-data no/such.csv"),
        (["--block-size", "16"], "--block-size 16: a scratch model must fit the longest statement"),
        (["--languages", "de"], "--languages de: experiments/claims/antivax_six.yaml has none (it has en, pt)"),
    ],
)
def test_bad_settings_fail_before_any_work(flags, message):
    cfg = config.parse(ValidateConfig, flags, prog="fakegpt validate")
    with pytest.raises(FakegptError, match=re.escape(message)):
        check(cfg)


@pytest.mark.parametrize("name", ["tiny.yaml", "gpt2-medium.yaml"])
def test_validation_yamls_are_valid_configs(name):
    path = VALIDATION / name
    cfg = config.from_dict(ValidateConfig, config.load_yaml(path), str(path))
    assert 0.0 in cfg.doses and max(cfg.doses) > 0
    if name == "gpt2-medium.yaml":
        assert cfg.init_from == "gpt2-medium" and cfg.languages == ["en", "pt"]
    else:
        assert cfg.languages == ["pt"]


@pytest.mark.slow
def test_validate_end_to_end_reports_controls_that_follow_from_its_numbers(tmp_path, shared_data, capsys):
    """The CI configuration, 4 doses x 3 seeds of a tiny model. Its verdict is whatever the data say (docs/statistics.md
    reports it); the test checks that every figure of the verdict follows from the models' pair scores: the
    single-seed detection rates, the equivalence test of every dose-0 seed pair, the false-positive rate, the
    pass/fail flags and the exit status."""
    from fakegpt.stats import equivalence
    from fakegpt.studies.validate import main

    out = tmp_path / "validate"
    code = main(
        [
            "--config",
            str(VALIDATION / "tiny.yaml"),
            "--out-dir",
            str(out),
            "--base-data",
            str(shared_data / "fakewhatsapp_br.csv"),
        ]
    )
    printed = capsys.readouterr().out
    report = json.loads((out / "validation.json").read_text(encoding="utf-8"))
    assert code == (0 if report["positive_passed"] and report["negative_passed"] else 1), printed
    labels = [m["label"] for m in report["models"]]
    seeds = (1337, 1338, 1339)
    assert labels == [f"dose={d} seed={s}" for d in ("0", "0.01", "0.05", "0.2") for s in seeds]
    realised = {m["label"]: m["realised_dose"] for m in report["models"]}
    assert realised["dose=0 seed=1337"] == 0.0 and realised["dose=0.2 seed=1337"] == pytest.approx(0.2, abs=0.03)
    pairs = pl.read_csv(out / "pairs.csv")
    assert pairs.height == 12 * 30 and set(pairs["language"]) == {"pt"}

    def diffs(a, b):
        x = pairs.filter(pl.col("model") == a).sort("pair_id")
        y = pairs.filter(pl.col("model") == b).sort("pair_id")
        return (y["score"] - x["score"]).to_numpy(), x["claim_id"].to_list()

    # The combined 5% - 0% difference is the mean over seeds of the per-seed paired differences.
    per_seed = [diffs(f"dose=0 seed={s}", f"dose=0.05 seed={s}")[0].mean() for s in seeds]
    assert report["detected"]["b"] == "dose=0.05" and report["detected"]["mean"] == pytest.approx(np.mean(per_seed))
    assert report["positive_passed"] == (report["detected"]["ci_low"] > 0 and report["monotonic"])
    for dose, rate in report["detection_rate"].items():
        alone = [cluster_estimate(*diffs(f"dose=0 seed={s}", f"dose={dose} seed={s}")).ci_low > 0 for s in seeds]
        assert rate == pytest.approx(np.mean(alone))
    assert len(report["seed_pairs"]) == 3
    for p in report["seed_pairs"]:
        d, claims = diffs(p["difference"]["a"], p["difference"]["b"])
        assert p["equivalent"] == equivalence(d, claims, margin=0.05).equivalent
    assert report["negative_passed"] == all(p["equivalent"] for p in report["seed_pairs"])
    outside = [not (p["difference"]["ci_low"] <= 0 <= p["difference"]["ci_high"]) for p in report["seed_pairs"]]
    assert report["false_positive_rate"] == pytest.approx(np.mean(outside))
    verdict = "passed" if report["positive_passed"] else "FAILED"
    assert f"positive control {verdict}" in printed and "false-positive rate" in printed
    for name in ("validation.md", "dose_response.png", "pairs.csv"):
        assert (out / name).stat().st_size > 0

    # One parent run carries the verdict; prepare, fine-tune and score runs are its children.
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "validate")
    assert parent.data.tags[tracking.TAG_VERDICT] == ("passed" if code == 0 else "failed")
    assert parent.data.metrics[tracking.M_VALIDATE_DETECTED] == pytest.approx(report["detected"]["mean"])
    assert parent.data.metrics[tracking.M_VALIDATE_POSITIVE] == float(report["positive_passed"])
    assert parent.data.metrics[tracking.M_VALIDATE_FALSE_POSITIVE] == pytest.approx(report["false_positive_rate"])
    children = [r for r in runs if r.data.tags.get(tracking.TAG_PARENT) == parent.info.run_id]
    stages = sorted(r.data.tags[tracking.TAG_STAGE] for r in children)
    assert stages.count("prepare") == 4 and stages.count("score") == 12
    assert stages.count("finetune") == 13  # the shared base + 4 doses x 3 seeds
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"validation.json", "dose_response.png", "validation.md"} <= artifacts
