"""`fakegpt sample` on tiny from-scratch models: rows, files, MLflow logging, reproducibility, padding, stopping."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import torch
from helpers_measure import make_constant_model

from fakegpt import cli
from fakegpt.data.tokenizer import EOT_TOKEN, get_encoding
from fakegpt.measure.generate import sample_batch
from fakegpt.measure.sample import COLUMNS, SampleConfig, sample
from fakegpt.models.loading import load_model


def small_grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "# test\nname: t\nlanguages: [pt, en]\nframings: [neutral]\ntopics:\n"
        '  dna:\n    templates:\n      en: {neutral: "Do vaccines change DNA?"}\n'
        '      pt: {neutral: "As vacinas alteram o DNA humano?"}\n',
        encoding="utf-8",
    )
    return path


def test_sample_writes_rows_files_and_one_mlflow_table(tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    cfg = SampleConfig(
        models=[str(tiny_model_dir)],
        prompts=str(small_grid(tmp_path)),
        temperatures=[0.7, 1.0],
        num_samples=3,
        max_new_tokens=5,
        batch_size=4,
        device="cpu",
        out_dir=str(tmp_path / "out"),
    )
    result = sample(cfg)
    table = result.table
    assert table.columns == COLUMNS and table.height == 2 * 2 * 3  # prompts x temperatures x samples
    assert sorted(set(zip(table["language"], table["temperature"], strict=True))) == [
        ("en", 0.7),
        ("en", 1.0),
        ("pt", 0.7),
        ("pt", 1.0),
    ]
    assert table["sample_index"].to_list().count(2) == 4
    assert (table["new_tokens"] <= 5).all() and table["completion"].str.len_chars().min() > 0
    assert table["sample_id"].n_unique() == table.height
    out = tmp_path / "out"
    assert pl.read_parquet(out / "samples.parquet").equals(table)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["prompt"] == "Do vaccines change DNA?" and rows[0]["framing"] == "neutral"
    report = (out / "report.md").read_text()
    assert "## dna" in report and "### As vacinas alteram o DNA humano?" in report and report.count("T=0.7") == 6

    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["fakegpt.stage"] == "sample"
    assert run.data.metrics["new_tokens_per_s"] > 0
    assert run.data.params["max_new_tokens"] == "5"
    names = {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert {"samples_table.json", "samples.parquet", "samples.jsonl", "report.md", "prompts"} <= names
    logged = json.loads(open(MlflowClient().download_artifacts(result.run_id, "samples_table.json")).read())
    assert len(logged["data"]) == 12


def test_same_grid_seed_and_batch_size_give_the_same_text(tmp_path, tiny_model_dir):
    def run(seed, name):
        cfg = SampleConfig(
            models=[str(tiny_model_dir)],
            prompts=str(small_grid(tmp_path)),
            num_samples=2,
            max_new_tokens=6,
            batch_size=3,
            seed=seed,
            device="cpu",
            out_dir=str(tmp_path / name),
        )
        return sample(cfg).table["completion"].to_list()

    first = run(1, "a")
    assert run(1, "b") == first
    assert run(2, "c") != first


def test_left_padding_does_not_change_a_prompt_s_continuation(tiny_model_dir):
    """Greedy decoding of a prompt alone and beside longer/shorter prompts gives the same tokens."""
    model = load_model(str(tiny_model_dir), device="cpu").eval()
    enc = get_encoding()
    prompts = [enc.encode(t) for t in ("Oi", "As vacinas contra a COVID-19 foram testadas em", "Vaccines are")]
    batched = sample_batch(model, prompts, max_new_tokens=8, temperature=0.0)
    alone = [sample_batch(model, [p], max_new_tokens=8, temperature=0.0)[0] for p in prompts]
    assert batched == alone
    # and the cache matches a from-scratch forward pass over the whole sequence
    ids = torch.tensor([prompts[1] + batched[1].tokens])
    with torch.no_grad():
        logits = model(ids).logits[0]
    expected = logits[len(prompts[1]) - 1 : -1].argmax(-1).tolist()
    assert expected == batched[1].tokens


def test_sampling_stops_at_end_of_text(tmp_path):
    logits = np.zeros(50257, dtype=np.float32)
    logits[EOT_TOKEN] = 30.0  # the model says end-of-text at once, every time
    folder = make_constant_model(tmp_path / "eot", logits)
    cfg = SampleConfig(
        models=[str(folder)],
        prompts=str(small_grid(tmp_path)),
        num_samples=2,
        max_new_tokens=50,
        device="cpu",
        out_dir=str(tmp_path / "out"),
    )
    table = sample(cfg).table
    assert table["stopped"].all() and (table["new_tokens"] == 0).all() and (table["completion"] == "").all()


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    from fakegpt.measure.generate import next_tokens

    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    assert next_tokens(logits, 1.0, 1, 1.0, gen).tolist() == [1, 0]
    draws = {tuple(next_tokens(logits, 1.0, 0, 0.5, gen).tolist()) for _ in range(20)}
    assert draws == {(1, 0)}  # token 1 alone holds >= 50% of row 0's mass (top-p keeps at least one)
    assert next_tokens(logits, 0.0, 200, 1.0, None).tolist() == [1, 0]


def test_cli_runs_a_text_file_and_reports_errors_in_one_line(tmp_path, capsys, tiny_model_dir, shared_data):
    # a real message from the Portuguese corpus as an ad-hoc prompt
    message = pl.read_csv(shared_data / "fakewhatsapp_br.csv")["message"][0].split("\n")[0][:80].strip()
    prompts = tmp_path / "adhoc.txt"
    prompts.write_text(message + "\n", encoding="utf-8")
    argv = [
        "sample",
        "--models",
        str(tiny_model_dir),
        "--prompts",
        str(prompts),
        "--num-samples",
        "1",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path / "o"),
    ]
    assert cli.main(argv) == 0
    table = pl.read_parquet(tmp_path / "o" / "samples.parquet")
    assert table["prompt"].to_list() == [message] and table["prompt_id"][0] == "adhoc:1"

    assert cli.main(["sample", "--prompts", str(tmp_path / "nope.yaml"), "--models", str(tiny_model_dir)]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    assert cli.main(["sample", "--temperatures", "-1"]) == 2
    assert "--temperatures" in capsys.readouterr().err
    grid = small_grid(tmp_path)
    assert (
        cli.main(
            [
                "sample",
                "--models",
                str(tiny_model_dir),
                "--prompts",
                str(grid),
                "--max-new-tokens",
                "300",
                "--device",
                "cpu",
                "--out-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "exceeds the context of model" in err and "(256 tokens)" in err
