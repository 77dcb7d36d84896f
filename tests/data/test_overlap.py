"""Cross-source overlap in mixtures: a message found in two sources stays only where it appears first in time
(the default rule), counted per source pair in meta.json and on the MLflow run; `--overlap first-read` keeps
the old rule (the source read first keeps it)."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
import telegram_export as tg
from test_prepare import decode_messages, expected_messages
from test_telegram_json import OFF, RAW

from fakegpt import cli
from fakegpt.data.meta import DatasetMeta


def _shift(rows: pl.DataFrame, days: int) -> pl.DataFrame:
    when = rows["date"].str.to_datetime("%Y-%m-%dT%H:%M:%S") + dt.timedelta(days=days)
    return rows.with_columns(date=when.dt.strftime("%Y-%m-%dT%H:%M:%S"))


@pytest.fixture(scope="module")
def series(shared_data, tmp_path_factory):
    """`general`: a Telegram export of channel 2 that also forwards 20 anti-vaccine posts a day before they
    appear in `antivax` and 15 a day after; `antivax`: channel 1 as CSV."""
    df = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)
    general, antivax = (
        df.filter(pl.col("channel_id") == "2").head(200),
        df.filter(pl.col("channel_id") == "1").head(200),
    )
    early, late = _shift(antivax[10:30], -1), _shift(antivax[50:65], +1)
    folder = tmp_path_factory.mktemp("overlap")
    gen = pl.concat([general, early, late]).sort("date")
    tg.write(folder / "general.json", tg.chat(gen, 77, "general"))
    antivax.write_csv(folder / "antivax.csv")
    (folder / "set.yaml").write_text(
        "sources:\n  - {name: general, path: general.json}\n  - {name: antivax, path: antivax.csv}\n"
    )
    return folder, gen, antivax, early, late


def _run(folder, out: str, *args: str) -> DatasetMeta:
    assert cli.main(["prepare", "--config", str(folder / "set.yaml"), *RAW, "--out", str(folder / out), *args]) == 0
    return DatasetMeta.load(folder / out)


def test_first_in_time_keeps_each_shared_message_in_its_earliest_source(series):
    import mlflow

    folder, gen, antivax, early, late = series
    meta = _run(folder, "time")
    late_texts, early_texts = set(late["message"]), set(early["message"])
    want_general = [m for m in expected_messages(gen["message"], OFF, 1) if m not in late_texts]
    want_antivax = [m for m in expected_messages(antivax["message"], OFF, 1) if m not in early_texts]
    assert decode_messages(folder / "time" / "train.bin") == want_general + want_antivax
    assert meta.overlap == {
        "rule": "first-in-time",
        "dropped": 35,
        "pairs": {"general>antivax": 20, "antivax>general": 15},
    }
    assert meta.dropped["cross_source"] == 35
    assert [s["train_messages"] for s in meta.sources] == [len(want_general), len(want_antivax)]
    (r,) = mlflow.search_runs(experiment_names=["fakegpt"], output_format="list")
    assert r.data.metrics["data/overlap/general/antivax"] == 20 and r.data.metrics["data/overlap/antivax/general"] == 15
    assert r.data.metrics["data/dropped/cross_source"] == 35


def test_first_read_keeps_the_old_rule(series):
    folder, gen, antivax, early, late = series
    meta = _run(folder, "read", "--overlap", "first-read")
    shared = set(early["message"]) | set(late["message"])
    want = expected_messages(gen["message"], OFF, 1) + [
        m for m in expected_messages(antivax["message"], OFF, 1) if m not in shared
    ]
    assert decode_messages(folder / "read" / "train.bin") == want
    assert meta.overlap == {"rule": "first-read", "dropped": 35, "pairs": {"general>antivax": 35}}
    assert meta.dropped["duplicate"] == 0 and meta.dropped["cross_source"] == 35


def test_overlap_with_fractions_and_sequential_split(series):
    """A mixture draw and the sequential split work on what the rule leaves: no shared text in two sources."""
    folder, *_ = series
    meta = _run(folder, "mix", "--mix", "general=0.5", "antivax=0.5", "--val-fraction", "0.1")
    train = decode_messages(folder / "mix" / "train.bin")
    val = decode_messages(folder / "mix" / "val.bin")
    assert len(train) + len(val) == len(set(train) | set(val))  # every message once
    assert meta.overlap["dropped"] == 35 and abs(meta.mixture["antivax"] - 0.5) < 0.02
