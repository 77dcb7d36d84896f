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
from fakegpt.studies.controls import Difference, ValidateConfig, check, paired_difference, verdict_lines

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


def test_paired_difference_is_per_pair_and_bootstrapped():
    ids = [f"p{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    base = rng.normal(size=40)
    pairs = pl.DataFrame(
        {
            "model": ["a"] * 40 + ["b"] * 40 + ["c"] * 40,
            "pair_id": ids * 3,
            "claim_id": ids * 3,  # one language: each pair is its own claim
            "score": np.concatenate([base, base + 0.5, base + rng.normal(scale=0.01, size=40)]),
        }
    )
    shifted = paired_difference(pairs, "a", "b", n_boot=500)
    assert shifted.mean == pytest.approx(0.5) and shifted.ci_low == pytest.approx(0.5)
    assert shifted.n_pairs == 40 and not shifted.includes_zero
    # Pairing removes the large between-pair spread: a tiny per-pair jitter gives a tight interval around 0.
    same = paired_difference(pairs, "a", "c", n_boot=500)
    assert same.includes_zero and same.ci_high - same.ci_low < 0.02


def _diff(a, b, mean, low, high):
    return Difference(a=a, b=b, mean=mean, ci_low=low, ci_high=high, n_pairs=60)


def test_verdict_lines_pass_and_fail_with_advice():
    effect = _diff("dose=0", "dose=0.2", 0.41, 0.27, 0.55)
    steps = [_diff("dose=0", "dose=0.05", 0.1, 0.02, 0.2), _diff("dose=0.05", "dose=0.2", 0.3, 0.2, 0.4)]
    seed = _diff("dose=0", "dose=0 seed=2", 0.01, -0.03, 0.05)
    positive, negative, lines = verdict_lines(effect, steps, seed, True, 0.2)
    assert positive and negative
    assert lines == [
        "positive control passed: the score rises with dose (0% -> 20%: +0.41, 95% CI [+0.27, +0.55])",
        "negative control passed: seed-only difference +0.01, 95% CI [-0.03, +0.05], CI includes 0",
    ]
    falling = [_diff("dose=0", "dose=0.05", -0.2, -0.3, -0.1), steps[1]]
    weak = _diff("dose=0", "dose=0.2", 0.05, -0.02, 0.12)
    positive, negative, lines = verdict_lines(
        weak, falling, _diff("dose=0", "dose=0 seed=2", 0.1, 0.02, 0.2), False, 0.2
    )
    assert not positive and not negative
    assert lines[0].startswith("positive control FAILED") and "falls from dose=0 to dose=0.05" in lines[0]
    assert "--max-iters" in lines[0]
    assert lines[1].startswith("negative control FAILED: seed-only difference +0.10") and "Try:" in lines[1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--doses", "0.05,0.2"], "--doses"),
        (["--doses", "0,1.5"], "--doses"),
        (["--control-seed", "1337"], "--control-seed"),
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
def test_validate_end_to_end_both_controls_pass(tmp_path, shared_data, capsys):
    """The CI configuration: planted effect detected and rising with dose; two seeds at dose 0 agree."""
    from fakegpt.studies.controls import main

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
    assert code == 0, printed
    assert report["positive_passed"] and report["negative_passed"] and report["monotonic"]
    assert "positive control passed: the score rises with dose (0% -> 20%: +" in printed
    assert "negative control passed: seed-only difference" in printed and "CI includes 0" in printed
    labels = [m["label"] for m in report["models"]]
    assert labels == ["dose=0", "dose=0.01", "dose=0.05", "dose=0.2", "dose=0 seed=1338"]
    realised = {m["label"]: m["realised_dose"] for m in report["models"]}
    assert realised["dose=0"] == 0.0 and realised["dose=0.2"] == pytest.approx(0.2, abs=0.03)
    assert report["effect"]["ci_low"] > 0 and report["effect"]["n_pairs"] == 30  # the Portuguese pairs
    assert report["seed_diff"]["ci_low"] <= 0 <= report["seed_diff"]["ci_high"]
    for name in ("validation.md", "dose_response.png", "pairs.csv"):
        assert (out / name).stat().st_size > 0
    pairs = pl.read_csv(out / "pairs.csv")
    assert pairs.height == 5 * 30 and set(pairs["language"]) == {"pt"}

    # One parent run carries the verdict; prepare, fine-tune and score runs are its children.
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "validate")
    assert parent.data.tags[tracking.TAG_VERDICT] == "passed"
    assert parent.data.metrics[tracking.M_VALIDATE_EFFECT_LOW] > 0
    assert parent.data.metrics[tracking.M_VALIDATE_POSITIVE] == 1.0
    children = [r for r in runs if r.data.tags.get(tracking.TAG_PARENT) == parent.info.run_id]
    stages = sorted(r.data.tags[tracking.TAG_STAGE] for r in children)
    assert stages.count("prepare") == 4 and stages.count("score") == 5
    assert stages.count("finetune") == 6  # the shared base + 4 doses + the control seed
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"validation.json", "dose_response.png", "validation.md"} <= artifacts
