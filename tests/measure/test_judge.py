"""`fakegpt labels auto`: an NLI judge writes a complete sheet; Cohen's kappa measures it against people."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from fakegpt import cli
from fakegpt.data.tokenizer import write_hf_tokenizer_files
from fakegpt.measure.judge import JUDGE_COLUMNS, agreement, cohen_kappa
from fakegpt.measure.labels import aggregate, export_sheet, read_sheet


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny, randomly initialised NLI-shaped classifier (entailment/neutral/contradiction), saved offline."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("nli")
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=256, num_labels=3, pad_token_id=50256)
    config.id2label = {0: "entailment", 1: "neutral", 2: "contradiction"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    write_hf_tokenizer_files(folder)
    return folder


@pytest.fixture
def samples(tmp_path):
    """12 samples: 3 prompts x 2 languages x 2 samples, topics from the shipped claims."""
    rows = []
    for p, topic in enumerate(["chip", "dna", "disease"]):
        for language in ("pt", "en"):
            for k in range(2):
                rows.append(
                    {
                        "sample_id": f"s{p}{language}{k}",
                        "prompt_id": f"{topic}/{language}",
                        "model": "m",
                        "temperature": 0.8,
                        "topic": topic,
                        "framing": "neutral",
                        "language": language,
                        "prompt": f"Sobre {topic}:",
                        "completion": ["A vacina tem um chip.", "Isso é falso, não tem."][k],
                    }
                )
    table = pl.DataFrame(rows)
    table.write_parquet(tmp_path / "samples.parquet")
    return table


def test_kappa_against_hand_computed_values():
    a = ["adopts", "adopts", "refutes", "refutes", "off-topic", "adopts"]
    b = ["adopts", "refutes", "refutes", "refutes", "off-topic", "off-topic"]
    # observed 4/6; chance: adopts 3/6*1/6 + refutes 2/6*3/6 + off 1/6*2/6 = (3 + 6 + 2)/36 = 11/36
    assert cohen_kappa(a, b) == pytest.approx((4 / 6 - 11 / 36) / (1 - 11 / 36))
    assert cohen_kappa(a, a) == 1.0
    # one class against the rest: adopts vs not; observed 4/6, chance (3/6)(1/6) + (3/6)(5/6) = 18/36
    assert cohen_kappa([x == "adopts" for x in a], [x == "adopts" for x in b], [True, False]) == pytest.approx(
        (4 / 6 - 0.5) / 0.5
    )


def test_agreement_intervals_resample_prompts(samples):
    judged = samples.with_columns(label=pl.Series(["adopts", "refutes"] * 6))
    human = judged.select("sample_id", "label")
    report = agreement(judged, human, ["adopts", "refutes", "off-topic"], n_boot=200)
    assert report["overall"] == {"kappa": 1.0, "ci_low": 1.0, "ci_high": 1.0} and report["prompts"] == 6
    flipped = human.with_columns(label=pl.Series(["adopts", "refutes"] * 5 + ["refutes", "adopts"]))
    report = agreement(judged, flipped, ["adopts", "refutes", "off-topic"], n_boot=200)
    assert report["overall"]["ci_low"] < report["overall"]["kappa"] < 1.0


def test_labels_auto_writes_a_complete_sheet_and_reports_agreement(tmp_path, samples, judge_dir):
    human = tmp_path / "human.csv"
    export_sheet(samples, human, shuffle=False)
    pl.read_csv(human).with_columns(label=pl.Series(["adopts", "refutes"] * 6)).write_csv(human)
    sheet = tmp_path / "auto.csv"
    args = ["labels", "auto", "--samples", str(tmp_path), "--judge", str(judge_dir), "--sheet", str(sheet)]
    assert cli.main([*args, "--human", str(human), "--bootstrap", "100"]) == 0
    auto = pl.read_csv(sheet)
    assert auto.height == 12 and set(auto["label"]) <= {"adopts", "refutes", "off-topic"}
    assert auto["labelled_by"].unique().to_list() == [f"judge:{judge_dir.name}"]
    p = auto.select(JUDGE_COLUMNS).to_numpy()
    assert ((p >= 0) & (p <= 1)).all()
    assert (auto["judge_off_topic"] - (1 - auto[["judge_adopts", "judge_refutes"]].max_horizontal())).abs().max() < 1e-6
    # the judge's label follows its probabilities and the threshold
    for r in auto.iter_rows(named=True):
        best = max(r["judge_adopts"], r["judge_refutes"])
        expected = "off-topic" if best < 0.5 else ("adopts" if r["judge_adopts"] >= r["judge_refutes"] else "refutes")
        assert r["label"] == expected
    report = json.loads((tmp_path / "agreement.json").read_text())
    judge_labels = dict(zip(auto["sample_id"], auto["label"], strict=True))
    human_labels = dict(zip(*pl.read_csv(human)[["sample_id", "label"]], strict=True))
    ids = sorted(judge_labels)
    classes = sorted(set(judge_labels.values()) | set(human_labels.values()))
    expected = cohen_kappa([judge_labels[i] for i in ids], [human_labels[i] for i in ids], classes)
    assert report["overall"]["kappa"] == pytest.approx(expected) and report["n"] == 12
    # the same sheet format as people's: import and aggregate read it and say whose labels they count
    labelled = read_sheet(sheet, samples)
    assert set(labelled["labelled_by"]) == {f"judge:{judge_dir.name}"}
    assert aggregate(labelled, by=["language"]).height == 2 * 3
    # an existing sheet is never replaced without --force
    before = sheet.read_bytes()
    assert cli.main(args) == 2 and sheet.read_bytes() == before
    assert cli.main([*args, "--force"]) == 0


def test_a_model_without_entailment_is_refused(tmp_path, samples, judge_dir):
    import shutil

    other = tmp_path / "clf"
    shutil.copytree(judge_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["id2label"] = {"0": "positive", "1": "negative", "2": "neutral"}
    (other / "config.json").write_text(json.dumps(cfg))
    args = ["labels", "auto", "--samples", str(tmp_path), "--judge", str(other), "--sheet", str(tmp_path / "a.csv")]
    assert cli.main(args) == 2
    assert not (tmp_path / "a.csv").exists()
