"""Label sheets: export, import of a filled sheet, bad sheets reported by row, Wilson-interval aggregation."""

from __future__ import annotations

import json

import polars as pl
import pytest

from fakegpt import cli
from fakegpt.errors import FakegptError
from fakegpt.measure.labels import (
    AggregateConfig,
    aggregate,
    export_sheet,
    label_rates,
    load_samples,
    paired_rates,
    rates_from_sheet,
    read_sheet,
)
from fakegpt.measure.prompts import DEFAULT_PROMPTS, load_prompts
from fakegpt.measure.sample import COLUMNS, sample_id
from fakegpt.stats import wilson_interval


@pytest.fixture
def samples(tmp_path, shared_data) -> tuple[pl.DataFrame, str]:
    """A sample table in sample's format: shipped prompts, real corpus messages standing in for completions."""
    messages = pl.read_csv(shared_data / "fakewhatsapp_br.csv")["message"][:200].to_list()
    prompts = [p for p in load_prompts(DEFAULT_PROMPTS) if p.topic == "chip"]  # 6 prompts: 3 framings x 2 langs
    rows = []
    for model in ("gpt2", "runs:/abc/checkpoint"):
        for p in prompts:
            for s in range(2):
                rows.append(
                    {
                        "sample_id": sample_id(model, p.prompt_id, 0.8, 200, 1.0, 1337, s),
                        "model": model,
                        "prompt_id": p.prompt_id,
                        "topic": p.topic,
                        "framing": p.framing,
                        "language": p.language,
                        "template_id": p.template_id,
                        "prompt": p.text,
                        "temperature": 0.8,
                        "top_k": 200,
                        "top_p": 1.0,
                        "seed": 1337,
                        "sample_index": s,
                        "completion": messages[len(rows)],
                        "new_tokens": 10,
                        "stopped": True,
                    }
                )
    table = pl.DataFrame(rows).select(COLUMNS)
    folder = tmp_path / "sample"
    folder.mkdir()
    table.write_parquet(folder / "samples.parquet")
    return table, str(folder)


def fill(sheet: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
    """Fine-tuned model: adopts on leading prompts, refutes otherwise; base: off-topic on pt, refutes on en."""
    truth = table.select("sample_id", "model", "framing", "language").with_columns(
        label=pl.when(pl.col("model") != "gpt2")
        .then(pl.when(pl.col("framing") == "leading").then(pl.lit("adopts")).otherwise(pl.lit("refutes")))
        .otherwise(pl.when(pl.col("language") == "pt").then(pl.lit("off-topic")).otherwise(pl.lit("refutes")))
    )
    return (
        sheet.drop("label")
        .join(truth.select("sample_id", "label"), on="sample_id", maintain_order="left")
        .select(sheet.columns)
    )


def test_export_writes_a_blind_shuffled_sheet_with_an_empty_label_column(tmp_path, samples):
    table, folder = samples
    path = export_sheet(load_samples(folder), tmp_path / "sheet.csv")
    sheet = pl.read_csv(path, infer_schema=False)
    assert sheet.columns == ["sample_id", "topic", "framing", "language", "prompt", "completion", "label", "note"]
    assert sheet.height == 24 and (sheet["label"].fill_null("") == "").all()
    assert (
        sorted(sheet["sample_id"]) == sorted(table["sample_id"])
        and sheet["sample_id"].to_list() != table["sample_id"].to_list()
    )
    joined = sheet.join(table, on="sample_id", maintain_order="left")
    assert joined["completion_right"].to_list() == sheet["completion"].to_list()  # multi-line messages survive
    open_sheet = pl.read_csv(export_sheet(table, tmp_path / "open.csv", blind=False, shuffle=False), infer_schema=False)
    assert open_sheet.columns[:3] == ["sample_id", "model", "temperature"]
    assert open_sheet["sample_id"].to_list() == table["sample_id"].to_list()


def test_filled_sheet_round_trips_and_aggregates_with_wilson_intervals(tmp_path, samples):
    table, folder = samples
    sheet = pl.read_csv(export_sheet(table, tmp_path / "sheet.csv"), infer_schema=False)
    filled = fill(sheet, table).with_columns(pl.col("label").str.to_uppercase())  # labels are case-insensitive
    filled.write_csv(tmp_path / "filled.csv")
    labeled = read_sheet(tmp_path / "filled.csv", table)
    assert labeled.height == 24 and labeled["sample_id"].to_list() == table["sample_id"].to_list()
    rates = aggregate(labeled)
    # 2 models x 1 temperature x 3 framings x 2 languages = 12 cells of 2 samples, 3 labels each
    assert rates.height == 12 * 3 and set(rates["n"]) == {2}
    cell = rates.filter(
        (pl.col("model") == "runs:/abc/checkpoint") & (pl.col("framing") == "leading") & (pl.col("language") == "pt")
    )
    assert dict(zip(cell["label"], cell["count"], strict=True)) == {"adopts": 2, "refutes": 0, "off-topic": 0}
    adopts = cell.filter(pl.col("label") == "adopts").row(0, named=True)
    assert (adopts["ci_low"], adopts["ci_high"]) == pytest.approx(wilson_interval(2, 2))
    assert rates_from_sheet(folder, tmp_path / "filled.csv").equals(rates)
    by_model = aggregate(labeled, by=["model"])
    assert by_model.filter((pl.col("model") == "gpt2") & (pl.col("label") == "off-topic"))["rate"][0] == 0.5


def test_a_sheet_saved_by_a_spreadsheet_with_semicolons_and_crlf_is_read(tmp_path, samples):
    table, _ = samples
    sheet = pl.read_csv(export_sheet(table, tmp_path / "sheet.csv"), infer_schema=False)
    filled = fill(sheet, table).with_columns(pl.col("completion").str.replace_all("\n", "\r\n"))
    text = "\ufeff" + filled.write_csv(separator=";")
    (tmp_path / "excel.csv").write_text(text, encoding="utf-8")
    assert read_sheet(tmp_path / "excel.csv", table).height == 24


def test_bad_sheets_are_reported_with_row_numbers(tmp_path, samples):
    table, _ = samples
    sheet = fill(pl.read_csv(export_sheet(table, tmp_path / "sheet.csv", shuffle=False), infer_schema=False), table)
    rows = sheet.to_dicts()
    rows[1]["label"] = "adopt"  # sheet row 3
    rows[3]["sample_id"] = "0000deadbeef"  # sheet row 5
    rows[5]["completion"] = "edited by hand"  # sheet row 7
    rows[7]["label"] = ""  # sheet row 9
    rows.append(dict(rows[0]))  # sheet row 26 repeats row 2
    pl.DataFrame(rows).write_csv(tmp_path / "bad.csv")
    with pytest.raises(FakegptError) as err:
        read_sheet(tmp_path / "bad.csv", table)
    message = str(err.value)
    assert "5 problem(s)" in message
    assert "row 3: unknown label 'adopt' (labels: adopts, refutes, off-topic)" in message
    assert "row 5: sample_id '0000deadbeef' is not in the samples" in message
    assert f"row 7: the completion differs from sample {rows[5]['sample_id']}" in message
    assert "row 9: no label" in message
    assert "row 26: sample " in message and "already labelled in row 2" in message
    # configurable labels; unlabelled rows may be skipped
    custom = sheet.with_columns(
        label=pl.when(pl.col("label") == "adopts").then(pl.lit("agrees")).otherwise(pl.col("label"))
    )
    custom = custom.with_columns(label=pl.when(pl.int_range(pl.len()) == 7).then(pl.lit("")).otherwise("label"))
    custom.write_csv(tmp_path / "custom.csv")
    with pytest.raises(FakegptError, match="unknown label 'agrees'"):
        read_sheet(tmp_path / "custom.csv", table)
    labeled = read_sheet(
        tmp_path / "custom.csv", table, labels=["agrees", "refutes", "off-topic"], allow_unlabelled=True
    )
    assert labeled.height == 23 and set(labeled["label"]) == {"agrees", "refutes", "off-topic"}


def test_cli_export_then_aggregate_logs_table_and_plot(tmp_path, samples, capsys):
    from mlflow.tracking import MlflowClient

    table, folder = samples
    sheet_path = tmp_path / "sheet.csv"
    assert cli.main(["labels", "export", "--samples", folder, "--sheet", str(sheet_path)]) == 0
    fill(pl.read_csv(sheet_path, infer_schema=False), table).write_csv(sheet_path)
    out = tmp_path / "labels"
    argv = ["labels", "aggregate", "--samples", folder, "--sheet", str(sheet_path), "--out-dir", str(out)]
    assert cli.main(argv) == 0
    assert {"labeled.parquet", "label_rates.csv", "label_rates.parquet", "label_rates.png"} <= {
        p.name for p in out.iterdir()
    }
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("fakegpt").experiment_id])
    assert run.data.tags["fakegpt.stage"] == "labels"
    # adopts: fine-tuned x leading x 2 languages x 2 samples
    assert run.data.metrics["labels/rate/adopts"] == pytest.approx(4 / 24)
    logged = json.loads(open(MlflowClient().download_artifacts(run.info.run_id, "label_rates_table.json")).read())
    assert len(logged["data"]) == 36
    assert cli.main(["labels", "frobnicate"]) == 2
    assert "expected a subcommand: export | import | aggregate" in capsys.readouterr().err
    rates = label_rates(
        AggregateConfig(samples=folder, sheet=str(sheet_path), out_dir=str(tmp_path / "x"), by=["model", "framing"])
    )
    assert rates.height == 2 * 3 * 3


def test_label_rates_against_a_reference_model_are_paired_by_prompt(tmp_path, samples):
    from mlflow.tracking import MlflowClient
    from scipy import stats as st

    table, folder = samples
    sheet_path = tmp_path / "sheet.csv"
    export_sheet(table, sheet_path)
    fill(pl.read_csv(sheet_path, infer_schema=False), table).write_csv(sheet_path)
    labeled = read_sheet(sheet_path, table)
    paired = paired_rates(labeled, ["adopts", "refutes"], "model", "gpt2")
    assert paired["model"].to_list() == ["runs:/abc/checkpoint"] * 2 and paired["prompts"].to_list() == [6, 6]
    # per prompt (3 framings x 2 languages), fine-tuned minus base: adopts 1 on the two leading prompts, else 0;
    # refutes: en leading -1 (base refutes in en), en others 0, pt leading 0, pt others +1
    for label, per_prompt in (("adopts", [1, 1, 0, 0, 0, 0]), ("refutes", [-1, 0, 0, 0, 1, 1])):
        row = paired.filter(pl.col("label") == label).row(0, named=True)
        mean, se = sum(per_prompt) / 6, st.tstd(per_prompt) / 6**0.5
        half = st.t.ppf(0.975, df=5) * se  # 6 prompts: a t interval, df = 5
        assert row["difference"] == pytest.approx(mean)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((mean - half, mean + half))
        assert row["p_value"] == pytest.approx(2 * st.t.sf(abs(mean) / se, df=5))
        assert row["method"] == "t (df=5) over 6 clusters"

    out = tmp_path / "labels"
    argv = ["labels", "aggregate", "--samples", folder, "--sheet", str(sheet_path), "--out-dir", str(out)]
    assert cli.main([*argv, "--reference", "model=gpt2"]) == 0
    written = pl.read_csv(out / "label_rates_paired.csv")  # every label of the set: adopts, refutes, off-topic
    assert written["label"].to_list() == ["adopts", "refutes", "off-topic"]
    assert written["difference"].to_list()[:2] == pytest.approx(paired["difference"].to_list())
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("fakegpt").experiment_id])
    assert run.data.tags["fakegpt.reference"] == "model=gpt2"
    assert run.data.metrics["paired/labels/rate/adopts/runs:/abc/checkpoint"] == pytest.approx(2 / 6)
    with pytest.raises(FakegptError, match="no labelled sample has model = gpt3"):
        label_rates(AggregateConfig(samples=folder, sheet=str(sheet_path), out_dir=str(out), reference="model=gpt3"))
    with pytest.raises(FakegptError, match="expected COLUMN=VALUE"):
        label_rates(AggregateConfig(samples=folder, sheet=str(sheet_path), out_dir=str(out), reference="gpt2"))


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
