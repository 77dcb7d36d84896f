"""`fakegpt labels auto`: an NLI judge writes a complete sheet; Cohen's kappa measures it against people."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import polars as pl
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from fakegpt import cli
from fakegpt.data.tokenizer import write_hf_tokenizer_files
from fakegpt.measure.judge import (
    JUDGE_COLUMNS,
    MIN_DEFINED_SHARE,
    agreement,
    agreement_metrics,
    cohen_kappa,
    format_kappa,
    kappa_from_confusion,
    metric_part,
)
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
    overall = {k: report["overall"][k] for k in ("kappa", "ci_low", "ci_high", "undefined_resamples")}
    assert overall == {"kappa": 1.0, "ci_low": 1.0, "ci_high": 1.0, "undefined_resamples": 0}
    assert report["prompts"] == 6
    # nobody said off-topic: kappa of off-topic against the rest is undefined in the data and in every resample
    off = report["off-topic"]
    assert math.isnan(off["kappa"]) and math.isnan(off["ci_low"]) and math.isnan(off["ci_high"])
    assert off["undefined_resamples"] == 200 and off["note"].startswith("kappa undefined")
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


def test_kappa_is_undefined_when_both_labellings_use_one_class():
    assert math.isnan(cohen_kappa(["refutes"] * 5, ["refutes"] * 5))
    assert math.isnan(cohen_kappa([False] * 4, [False] * 4, [True, False]))  # a class nobody used, vs the rest
    # one labelling constant, the other not: chance agreement is below 1, kappa is defined (and 0)
    assert cohen_kappa(["refutes"] * 4, ["refutes", "adopts", "refutes", "refutes"]) == 0.0
    # a 2x2 case by hand: judge x human counts [[20, 5], [10, 15]]; observed 35/50, chance .5*.6 + .5*.4 = .5
    a = [True] * 25 + [False] * 25
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(a, b, [True, False]) == pytest.approx((0.7 - 0.5) / 0.5)
    assert float(kappa_from_confusion(np.array([[20, 5], [10, 15]]))) == pytest.approx(0.4)


def test_confusion_counts_judge_by_human():
    judged = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d", "e", "f"],
            "prompt_id": ["p1", "p1", "p2", "p2", "p3", "p3"],
            "label": ["adopts", "adopts", "refutes", "refutes", "refutes", "adopts"],
        }
    )
    human = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d", "e", "f"],
            "label": ["adopts", "refutes", "refutes", "refutes", "adopts", "adopts"],
        }
    )
    report = agreement(judged, human, ["adopts", "refutes", "off-topic"], n_boot=50)
    assert report["overall"]["confusion"] == {
        "adopts": {"adopts": 2, "refutes": 1, "off-topic": 0},
        "refutes": {"adopts": 1, "refutes": 2, "off-topic": 0},
        "off-topic": {"adopts": 0, "refutes": 0, "off-topic": 0},
    }
    # one against the rest: the same counts collapsed
    assert report["adopts"]["confusion"] == {
        "adopts": {"adopts": 2, "not adopts": 1},
        "not adopts": {"adopts": 1, "not adopts": 2},
    }
    assert report["overall"]["kappa"] == pytest.approx(cohen_kappa(judged["label"].to_list(), human["label"].to_list()))


def rare_class_labels(prompts: int = 12, per_prompt: int = 5, seed: int = 7) -> pl.DataFrame:
    """Simulated judge and human labels: refutes / off-topic with 15% judge noise, and a rare `adopts` (~5%).

    `adopts` is in the first two prompts only, each with one disagreement (the judge says it once more than
    people do), so a resample that holds it never agrees perfectly on it: kappa 1.0 can only come from a
    resample that lacks it, which the old kappa (1.0 when undefined) counted as perfect.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        for k in range(per_prompt):
            human = "refutes" if rng.random() < 0.65 else "off-topic"
            judge = human if rng.random() > 0.15 else ("off-topic" if human == "refutes" else "refutes")
            if p < 2 and k == 0:
                human = judge = "adopts"
            elif p < 2 and k == 1:
                judge = "adopts"
            rows.append({"sample_id": f"{p}-{k}", "prompt_id": f"p{p:02d}", "judge": judge, "human": human})
    return pl.DataFrame(rows)


def test_degenerate_resamples_are_left_out_and_counted():
    table = rare_class_labels()
    labels = ["adopts", "refutes", "off-topic"]
    assert 0.02 < (table["human"] == "adopts").mean() < 0.08 and (table["judge"] == "adopts").mean() < 0.08
    judged = table.select("sample_id", "prompt_id", label="judge")
    human = table.select("sample_id", label="human")
    n_boot = 2000
    report = agreement(judged, human, labels, n_boot, seed=3)
    # replay the bootstrap's draws (one rng.integers call per draw, prompts in sorted order) with the list-based
    # cohen_kappa, an independent path to the same kappas
    prompts = sorted(set(table["prompt_id"]))
    rows = {p: table.filter(pl.col("prompt_id") == p) for p in prompts}
    rng = np.random.default_rng(3)
    replayed = []
    for _ in range(n_boot):
        drawn = pl.concat([rows[prompts[i]] for i in rng.integers(0, len(prompts), size=len(prompts))])
        j, h = drawn["judge"].to_list(), drawn["human"].to_list()
        replayed.append(cohen_kappa([v == "adopts" for v in j], [v == "adopts" for v in h], [True, False]))
    replayed = np.array(replayed)
    undefined = int(np.isnan(replayed).sum())
    entry = report["adopts"]
    assert entry["undefined_resamples"] == undefined
    # both adopting prompts are missed with probability (10/12)^12 = 11%: many resamples, yet few enough
    assert 0.07 * n_boot < undefined < 0.16 * n_boot and undefined < (1 - MIN_DEFINED_SHARE) * n_boot
    defined = replayed[~np.isnan(replayed)]
    assert entry["ci_low"] == pytest.approx(np.quantile(defined, 0.025))
    assert entry["ci_high"] == pytest.approx(np.quantile(defined, 0.975))
    assert entry["ci_high"] < 1.0 and entry["note"] is None
    # what the old rule (undefined counted as 1.0) reported: an upper bound of exactly 1.0
    assert np.quantile(np.where(np.isnan(replayed), 1.0, replayed), 0.975) == 1.0
    assert report["overall"]["undefined_resamples"] == 0  # refutes and off-topic are in every prompt


def test_a_class_in_one_prompt_only_gets_no_interval():
    table = rare_class_labels()
    # keep adopts in the first prompt only: (11/12)^12 = 35% of the resamples lack it, more than 1 - 80%
    table = table.with_columns(
        pl.when(pl.col("prompt_id") == "p01").then(pl.lit("refutes")).otherwise(pl.col(c)).alias(c)
        for c in ("judge", "human")
    )
    judged = table.select("sample_id", "prompt_id", label="judge")
    report = agreement(judged, table.select("sample_id", label="human"), ["adopts", "refutes", "off-topic"], 1000)
    entry = report["adopts"]
    assert 0 < entry["kappa"] < 1  # defined in the data
    assert 0.25 * 1000 < entry["undefined_resamples"] < 0.45 * 1000
    assert math.isnan(entry["ci_low"]) and math.isnan(entry["ci_high"])
    assert entry["note"].startswith("interval undefined") and "(under 80%)" in entry["note"]
    assert format_kappa(entry) == f"{entry['kappa']:.3f} [interval undefined]"
    assert format_kappa({"kappa": math.nan, "ci_low": math.nan, "ci_high": math.nan}).startswith("undefined")
    assert format_kappa({"kappa": None, "ci_low": None, "ci_high": None}).startswith("undefined")  # from the JSON


def dosed_labels() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Judged samples of 2 models x 3 doses x 8 prompts x 3 samples, and people's labels of them."""
    rng = np.random.default_rng(11)
    labels = np.array(["adopts", "refutes", "off-topic"])
    rows = []
    for model in ("base", "runs:/abc123/best"):
        for fraction in (0.0, 0.2, 0.5):
            for p in range(8):
                for k in range(3):
                    human = labels[rng.choice(3, p=[fraction * 0.8, 0.9 - fraction * 0.8, 0.1])]
                    # 20% judge errors; it never says adopts where people did not (none at dose 0)
                    judge = human if rng.random() > 0.2 else {"refutes": "off-topic"}.get(human, "refutes")
                    rows.append(
                        {
                            "sample_id": f"{model}|{fraction}|{p}|{k}",
                            "prompt_id": f"p{p}",
                            "model": model,
                            "fraction": fraction,
                            "label": str(judge),
                            "human": str(human),
                        }
                    )
    table = pl.DataFrame(rows)
    return table.drop("human"), table.select("sample_id", label="human")


def test_per_group_reports_are_the_pooled_report_of_each_subset():
    judged, human = dosed_labels()
    labels = ["adopts", "refutes", "off-topic"]
    report = agreement(judged, human, labels, n_boot=300, seed=5, by=["fraction", "model"])
    assert set(report["per_fraction"]) == {"0.0", "0.2", "0.5"}
    assert set(report["per_model"]) == {"base", "runs:/abc123/best"}

    def same(a: dict, b: dict) -> bool:  # value for value, NaN equal to NaN
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    pooled = {k: v for k, v in report.items() if not k.startswith("per_")}
    assert same(pooled, agreement(judged, human, labels, n_boot=300, seed=5))  # `by` adds sections, changes none

    for value in (0.0, 0.2, 0.5):
        subset = agreement(judged.filter(pl.col("fraction") == value), human, labels, n_boot=300, seed=5)
        assert same(report["per_fraction"][str(value)], subset)
        assert report["per_fraction"][str(value)]["n"] == 2 * 8 * 3
    for model in ("base", "runs:/abc123/best"):
        subset = agreement(judged.filter(pl.col("model") == model), human, labels, n_boot=300, seed=5)
        assert same(report["per_model"][model], subset)
    # at dose 0 nobody adopts: that class's kappa is undefined there, and is not logged
    assert math.isnan(report["per_fraction"]["0.0"]["adopts"]["kappa"])
    metrics = agreement_metrics(report)
    assert "labels/judge_kappa_by_fraction/0.0/adopts" not in metrics
    assert metrics["labels/judge_kappa/overall"] == report["overall"]["kappa"]
    assert metrics["labels/judge_kappa_by_fraction/0.2/overall"] == report["per_fraction"]["0.2"]["overall"]["kappa"]
    name = f"labels/judge_kappa_by_model/{metric_part('runs:/abc123/best')}/refutes"
    assert name == "labels/judge_kappa_by_model/runs__abc123_best/refutes"
    assert metrics[name] == report["per_model"]["runs:/abc123/best"]["refutes"]["kappa"]
    assert all(re.fullmatch(r"[A-Za-z0-9_\-. /]+", m) and math.isfinite(v) for m, v in metrics.items())


def test_labels_auto_reports_agreement_per_dose_and_model(tmp_path, samples, judge_dir):
    import mlflow

    # a mixture series' all_samples.parquet: the samples of each dose, with a `fraction` column
    dosed = samples.with_columns(fraction=pl.Series([0.0, 0.2] * 6))
    dosed.write_parquet(tmp_path / "all_samples.parquet")
    human = tmp_path / "human.csv"
    export_sheet(dosed, human, shuffle=False)
    pl.read_csv(human).with_columns(label=pl.Series(["adopts", "refutes"] * 6)).write_csv(human)
    sheet = tmp_path / "auto.csv"
    args = ["labels", "auto", "--samples", str(tmp_path / "all_samples.parquet"), "--judge", str(judge_dir)]
    assert cli.main([*args, "--sheet", str(sheet), "--human", str(human), "--bootstrap", "100"]) == 0

    def no_nan(constant: str):
        raise AssertionError(f"agreement.json holds {constant}: not JSON")

    report = json.loads((tmp_path / "agreement.json").read_text(), parse_constant=no_nan)
    assert set(report["per_fraction"]) == {"0.0", "0.2"} and set(report["per_model"]) == {"m"}
    for part in (report, *report["per_fraction"].values()):
        assert {"kappa", "ci_low", "ci_high", "undefined_resamples", "confusion", "note"} <= set(part["overall"])
        assert sum(n for row in part["overall"]["confusion"].values() for n in row.values()) == part["n"]
    (run,) = mlflow.search_runs(experiment_names=["fakegpt"], output_format="list")
    expected = {
        f"labels/judge_kappa_by_{column}/{value}/{key}": entry["kappa"]
        for column in ("fraction", "model")
        for value, part in report[f"per_{column}"].items()
        for key, entry in part.items()
        if isinstance(entry, dict) and entry["kappa"] is not None
    } | {
        f"labels/judge_kappa/{k}": e["kappa"]
        for k, e in report.items()
        if isinstance(e, dict) and "kappa" in e and e["kappa"] is not None
    }
    assert run.data.metrics == pytest.approx(expected)


def test_labels_auto_prints_an_undefined_kappa(tmp_path, samples, monkeypatch, capsys):
    import fakegpt.measure.labels as labels_cli

    nan = {"kappa": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    monkeypatch.setattr(labels_cli, "auto", lambda cfg, s, read: (tmp_path / "auto.csv", {"n": 12, "overall": nan}))
    args = ["labels", "auto", "--samples", str(tmp_path), "--judge", "x", "--human", "h.csv"]
    assert cli.main(args) == 0
    assert "Cohen's kappa undefined [interval undefined] over 12 samples" in capsys.readouterr().out
