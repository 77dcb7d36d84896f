"""`fakegpt prepare` end to end on the real data: bins decode back to the cleaned messages, splits, meta.json,
atomic output, bad input as one-line errors, the embedded demo default and MLflow tracking."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fakegpt import cli
from fakegpt.data import bins
from fakegpt.data import prepare as prep
from fakegpt.data.clean import CleanRules, clean_series
from fakegpt.data.prepare import PrepareConfig, prepare
from fakegpt.data.tokenizer import EOT_TOKEN, get_encoding

META_KEYS = {
    "encoding",
    "vocab_size",
    "eot_token",
    "dtype",
    "train_tokens",
    "val_tokens",
    "train_messages",
    "val_messages",
    "dropped",
    "sources",
    "mixture",
    "config",
    "fakegpt_version",
}


def decode_messages(path: Path) -> list[str]:
    tokens = np.fromfile(path, dtype=np.uint16)
    assert len(tokens) == 0 or tokens[-1] == EOT_TOKEN
    ends = np.flatnonzero(tokens == EOT_TOKEN)
    enc = get_encoding()
    return [enc.decode(piece[:-1].tolist()) for piece in np.split(tokens, ends + 1)[:-1]]  # EOT dropped


def expected_messages(messages: pl.Series, rules: CleanRules = CleanRules(), min_chars: int = 3) -> list[str]:
    """What prepare should keep: cleaned, long enough, first occurrence only, in input order."""
    cleaned = clean_series(messages, rules)
    cleaned = cleaned.filter(cleaned.str.len_chars() >= min_chars)
    return cleaned.unique(maintain_order=True).to_list()


def in_time(df: pl.DataFrame) -> pl.DataFrame:
    """Rows in the order prepare writes a source's messages: by date (ISO, so as text), ties in read order."""
    return df.sort("date", maintain_order=True)


def run(*args: str) -> int:
    return cli.main(["prepare", *args])


def test_real_whatsapp_bins_decode_to_cleaned_messages(prepared_whatsapp, shared_data):
    meta = json.loads((prepared_whatsapp / "meta.json").read_text())
    assert META_KEYS <= set(meta)
    train, val = decode_messages(prepared_whatsapp / "train.bin"), decode_messages(prepared_whatsapp / "val.bin")
    expected = expected_messages(pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)["message"])
    assert train + val == expected  # sequential split: val is the tail, at message boundaries
    assert len(val) == round(len(expected) / 11) == meta["val_messages"]
    assert meta["train_messages"] == len(train)
    assert meta["train_tokens"] == (prepared_whatsapp / "train.bin").stat().st_size // 2
    assert meta["val_tokens"] == (prepared_whatsapp / "val.bin").stat().st_size // 2
    assert (meta["encoding"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert meta["dropped"]["duplicate"] + meta["dropped"]["too_short"] == 8182 - len(expected)
    (src,) = meta["sources"]
    assert src["files"][0]["sha256"] == "7367c30452ad6feaccb106954e90cff5eba56d68fdaae8a21d0889eed45a653d"
    assert meta["mixture"] == {}
    assert meta["config"]["split"] == "sequential"


def test_real_naive_export_prepares_like_the_well_formed_rows(tmp_path, shared_data):
    meta = prepare(
        PrepareConfig(inputs=[str(shared_data / "fakewhatsapp_br-naive.csv")], out=str(tmp_path)), track=False
    )
    full = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)[::3]["message"]
    flat = full.str.replace_all(r"\r\n|[\n\r\u2028\u2029\u0085\x0b\x0c]", " ")
    got = decode_messages(tmp_path / "train.bin") + decode_messages(tmp_path / "val.bin")
    assert got == expected_messages(flat)
    assert meta.read["repaired_rows"] >= 1449
    assert meta.sources[0]["files"][0]["format"] == "naive"


def test_random_split_is_seeded_and_disjoint(tmp_path, shared_data):
    def split(seed: int, out: str) -> tuple[list[str], list[str]]:
        prepare(
            PrepareConfig(
                inputs=[str(shared_data / "fakewhatsapp_br.csv")], out=str(tmp_path / out), split="random", seed=seed
            ),
            track=False,
        )
        return decode_messages(tmp_path / out / "train.bin"), decode_messages(tmp_path / out / "val.bin")

    a_train, a_val = split(1, "a")
    b_train, b_val = split(1, "b")
    c_train, c_val = split(2, "c")
    assert (a_train, a_val) == (b_train, b_val)
    assert a_val != c_val
    assert not set(a_train) & set(a_val)
    assert 0.06 < len(a_val) / (len(a_train) + len(a_val)) < 0.12


def test_date_split(tmp_path, shared_data):
    meta = prepare(
        PrepareConfig(
            inputs=[str(shared_data / "fakewhatsapp_br.csv")], out=str(tmp_path), split="date", split_date="2020-01-01"
        ),
        track=False,
    )
    df = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)
    late = expected_messages(df.filter(pl.col("date") >= "2020-01-01")["message"])
    # the COVID-19 groups (2020) are val; a message also posted in 2018 stays with its first (train) copy
    val = decode_messages(tmp_path / "val.bin")
    assert set(val) <= set(late) and len(val) >= len(late) - 5
    assert meta.val_messages == len(val) and meta.split["mode"] == "date"


def test_chunked_reading_gives_identical_bins(tmp_path, shared_data):
    src = [str(shared_data / "fakewhatsapp_br.csv")]
    prepare(PrepareConfig(inputs=src, out=str(tmp_path / "one"), chunk_mb=64), track=False)
    prepare(PrepareConfig(inputs=src, out=str(tmp_path / "many"), chunk_mb=1, threads=3), track=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()


def test_globs_gzip_and_several_inputs(tmp_path, shared_data):
    data = tmp_path / "in"
    data.mkdir()
    shutil.copy(shared_data / "fakewhatsapp_br.csv", data / "a.csv")
    news = pl.read_csv(shared_data / "fakebr_news.csv", infer_schema=False).head(200)
    (data / "b.csv.gz").write_bytes(gzip.compress(news.write_csv().encode()))
    meta = prepare(
        PrepareConfig(inputs=[str(data / "*.csv*")], out=str(tmp_path / "out"), channel_ids=[3, 5]), track=False
    )
    files = meta.sources[0]["files"]
    assert [Path(f["path"]).name for f in files] == ["a.csv", "b.csv.gz"]
    assert meta.dropped["channel_filter"] > 0
    wa = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False).filter(pl.col("channel_id") == "3")
    want = expected_messages(in_time(pl.concat([wa, news.filter(pl.col("channel_id") == "5")]))["message"])
    train, val = decode_messages(tmp_path / "out" / "train.bin"), decode_messages(tmp_path / "out" / "val.bin")
    # both files' messages in time order: the older news first, and val the 2020 group's last messages
    assert train + val == want and len(val) == round(len(want) / 11) == meta.val_messages
    assert set(val) <= set(expected_messages(wa["message"])) and train[0] in expected_messages(news["message"])


@pytest.mark.parametrize("split, step", [("sequential", "_split_in_place"), ("random", "_copy_selected")])
def test_existing_output_needs_force_and_failures_leave_no_partial_bins(
    tmp_path, shared_data, monkeypatch, split, step
):
    out = tmp_path / "out"
    cfg = PrepareConfig(inputs=[str(shared_data / "fakewhatsapp_br-naive.csv")], out=str(out), split=split)
    prepare(cfg, track=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(prep.FakegptError, match="already holds train.bin; use --force"):
        prepare(cfg, track=False)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep, step, boom)
    cfg.force = True
    with pytest.raises(prep.FakegptError, match=f"{out}: could not write the output .*No space left"):
        prepare(cfg, track=False)
    # the old dataset stays whole (meta.json included) and no temporary files are left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    prepare(cfg, track=False)
    assert (out / "meta.json").exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.csv", "missing.csv: no such file"),
        (lambda d: _write(d / "nocol.csv", b"id,channel_id,date\n1,1,2021\n"), "nocol.csv: line 1: missing column"),
        (lambda d: _write(d / "empty.csv", b""), "empty.csv: empty file"),
        (lambda d: _write(d / "header.csv", b"id,channel_id,date,message\n"), "header.csv: no messages"),
        (
            lambda d: _write(d / "short.csv", b"id,channel_id,date,message\n1,1,2021,ok\n2,1,2021,\xf0\x9f\x98\x80\n"),
            "short.csv: no usable messages",
        ),
        (lambda d: _write(d / "bad.csv.gz", b"\x1f\x8b\x08\x00garbage" * 10), "bad.csv.gz: unreadable gzip"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert run(str(path), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fakegpt prepare: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_bad_flags(tmp_path, capsys):
    assert run("--split", "weekly", "--out", str(tmp_path)) == 2
    assert "--split: expected one of sequential, random, date" in capsys.readouterr().err
    assert run("--split", "date", "--out", str(tmp_path)) == 2
    assert "--split-date" in capsys.readouterr().err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_demo_default_and_tracking(tmp_path, monkeypatch):
    """`fakegpt prepare --out DIR` with no inputs prepares the embedded demo data, as an MLflow run."""
    import mlflow

    out = tmp_path / "demo"
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")  # default 10 s; this run takes ~0.3 s
    assert run("--out", str(out), "--log-data") == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"][0]["paths"] == ["demo:"]
    assert 200_000 < meta["train_tokens"] < 500_000 and meta["val_messages"] > 300
    assert meta["dropped"]["duplicate"] > 0  # the demo has forwarded copies
    train = decode_messages(out / "train.bin")
    assert any("vacina" in m for m in train) and not any("http" in m for m in train)
    (r,) = mlflow.search_runs(experiment_names=["fakegpt"], output_format="list")
    assert r.data.tags["fakegpt.stage"] == "prepare" and r.data.tags["fakegpt.dataset"] == "demo"
    assert r.data.metrics["data/train_tokens"] == meta["train_tokens"]
    assert r.data.metrics["prepare/tokens_per_s"] > 0 and "data/dropped/duplicate" in r.data.metrics
    assert r.data.params["split"] == "sequential"
    # lineage: the bins as the run's dataset input, identified by their content
    (given,) = r.inputs.dataset_inputs
    tags = {t.key: t.value for t in given.tags}
    assert given.dataset.name == "demo" and tags["mlflow.data.context"] == "prepared"
    assert tags["train_sha256"] == hashlib.sha256((out / "train.bin").read_bytes()).hexdigest()
    assert tags["val_tokens"] == str(meta["val_tokens"]) and given.dataset.digest == bins.fingerprint(out)["digest"]
    assert "system/cpu_utilization_percentage" in r.data.metrics  # fakegpt[metrics]: psutil
    # named by what it is, in an experiment the MLflow UI opens on its runs table
    assert r.info.run_name == "prepare demo"
    experiment = mlflow.get_experiment(r.info.experiment_id)
    assert experiment.name == "fakegpt" and experiment.tags["mlflow.experimentKind"] == "finetuning"
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)]
    assert "meta.json" in arts
    logged = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="data", dst_path=tmp_path / "dl")
    assert sorted(p.name for p in Path(logged).iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert (Path(logged) / "train.bin").read_bytes() == (out / "train.bin").read_bytes()
    # deterministic: the same demo bins again
    assert run("--out", str(tmp_path / "again")) == 0
    assert (out / "train.bin").read_bytes() == (tmp_path / "again" / "train.bin").read_bytes()


def test_tracked_run_spans_the_work_and_records_failures(tmp_path, shared_data):
    """The run spans the work, carries MLflow's source tags, and a failure mid-work ends it FAILED."""
    import time

    import mlflow

    t0 = time.time() * 1000
    assert run(str(shared_data / "fakewhatsapp_br.csv"), "--out", str(tmp_path / "ok")) == 0
    t1 = time.time() * 1000
    (r,) = mlflow.search_runs(experiment_names=["fakegpt"], output_format="list")
    seconds = json.loads((tmp_path / "ok" / "meta.json").read_text())["timing"]["seconds"]
    assert r.info.status == "FINISHED" and r.info.run_name == "prepare ok"
    assert t0 <= r.info.start_time and r.info.end_time <= t1
    assert r.info.end_time - r.info.start_time >= seconds * 1000  # the run spans the work
    assert r.data.tags["fakegpt.stage"] == "prepare" and "mlflow.source.name" in r.data.tags
    assert r.data.metrics["data/train_tokens"] > 0
    # A file whose messages are all emoji fails after reading ("no usable messages"): the run says FAILED.
    bad = _write(tmp_path / "emoji.csv", b"id,channel_id,date,message\n1,1,2021,\xf0\x9f\x98\x80\n")
    assert run(str(bad), "--out", str(tmp_path / "bad")) == 2
    runs = mlflow.search_runs(experiment_names=["fakegpt"], output_format="list", order_by=["start_time DESC"])
    assert [x.info.status for x in runs] == ["FAILED", "FINISHED"]
    assert runs[0].data.params["out"] == str(tmp_path / "bad")
