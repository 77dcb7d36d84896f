"""Time, not the file's order: a newest-first scrape gives the very bins of the same messages oldest first (val
is the latest 1/11, dedupe keeps the earliest copy), and meta.json's counts agree with what the bins hold.
The fixtures are written here from the real messages of ../shared/data."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest
import telegram_export as tg
from test_prepare import decode_messages, expected_messages, in_time
from test_telegram_json import BASE

from fakegpt import cli
from fakegpt.data.clean import CleanRules, clean_series


def _later(rows: pl.DataFrame, days: int, channel: str) -> pl.DataFrame:
    when = rows["date"].str.to_datetime("%Y-%m-%dT%H:%M:%S") + dt.timedelta(days=days)
    return rows.with_columns(date=when.dt.strftime("%Y-%m-%dT%H:%M:%S"), channel_id=pl.lit(channel))


@pytest.fixture(scope="module")
def scrape(shared_data) -> pl.DataFrame:
    """Two 2020 groups (channels 3 and 4: their first 300 messages less 5 that share a minute with another,
    oldest first) and channel 9, which reposts 12 of their messages two days later and 3 empty or blank
    ones; sorted by date as a chronological export is. (Same-time messages keep the file's order.)"""
    df = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)
    groups = df.filter(pl.col("channel_id").is_in(["3", "4"])).head(300).filter(pl.col("date").is_first_distinct())
    reposts = _later(groups.gather(list(range(5, 295, 25))), 2, "9")
    blank = _later(groups.head(3), 1, "9").with_columns(message=pl.Series(["", "   ", "\n\t"]))
    out = in_time(pl.concat([groups, reposts, blank]))
    return out.with_columns(id=pl.int_range(1, out.height + 1).cast(pl.String))


def _prepare(tmp_path: Path, name: str, df: pl.DataFrame, *args: str) -> tuple[Path, dict]:
    path = tmp_path / f"{name}.csv"
    df.write_csv(path)
    out = tmp_path / f"{name}-out"
    assert cli.main(["prepare", str(path), "--out", str(out), *args]) == 0
    return out, json.loads((out / "meta.json").read_text())


COUNTS = ("train_tokens", "val_tokens", "train_messages", "val_messages", "dropped")


@pytest.mark.parametrize("args", [(), ("--chunk-mb", "1", "--remove-urls", "false")])
def test_newest_first_file_gives_the_bins_of_the_chronological_one(tmp_path, scrape, args):
    old, old_meta = _prepare(tmp_path, "oldest-first", scrape, *args)
    new, new_meta = _prepare(tmp_path, "newest-first", scrape.reverse(), *args)
    for name in ("train.bin", "val.bin"):
        assert (new / name).read_bytes() == (old / name).read_bytes(), name
    assert {k: new_meta[k] for k in COUNTS} == {k: old_meta[k] for k in COUNTS}
    (a,), (b,) = old_meta["sources"], new_meta["sources"]
    assert a["messages_by_channel"] == b["messages_by_channel"]
    # what the bins hold: the earliest copy of each text, in time order, the latest 1/11 in val
    rules = CleanRules(remove_urls="--remove-urls" not in args)
    want = expected_messages(scrape["message"], rules)
    train, val = decode_messages(old / "train.bin"), decode_messages(old / "val.bin")
    assert sorted(train + val) == sorted(want) and len(val) == round(len(want) / 11)
    texts, dates = clean_series(scrape["message"], rules).to_list(), scrape["date"].to_list()
    when = dict(zip(texts[::-1], dates[::-1], strict=True))  # each text's earliest date
    dates = [when[m] for m in train + val]
    assert dates == sorted(dates) and max(dates[: len(train)]) <= min(dates[len(train) :])
    # every repost is a later copy: channel 9 keeps none of them, and its blank messages are empty_text
    groups = scrape.filter(pl.col("channel_id") != "9")
    assert a["messages_by_channel"] == {
        "3": len(expected_messages(groups.filter(pl.col("channel_id") == "3")["message"], rules)),
        "4": len(expected_messages(groups.filter(pl.col("channel_id") == "4")["message"], rules)),
        "9": 0,
    }
    reposts = clean_series(scrape.filter(pl.col("channel_id") == "9")["message"], rules).str.len_chars() >= 3
    assert old_meta["dropped"]["duplicate"] == reposts.sum() > 0 and old_meta["dropped"]["empty_text"] == 3
    written = scrape.filter(pl.col("message").str.contains(r"\S"))["message"]
    assert old_meta["dropped"]["too_short"] == (clean_series(written, rules).str.len_chars() < 3).sum()


def test_random_split_and_dedupe_follow_time_too(tmp_path, scrape):
    old, _ = _prepare(tmp_path, "r-old", scrape, "--split", "random", "--seed", "5")
    new, _ = _prepare(tmp_path, "r-new", scrape.reverse(), "--split", "random", "--seed", "5")
    for name in ("train.bin", "val.bin"):
        assert (new / name).read_bytes() == (old / name).read_bytes(), name
    assert decode_messages(old / "val.bin")


def test_chat_counts_are_what_reached_the_bins(tmp_path, shared_data):
    """A Telegram export whose forwards are partly later copies of earlier messages and partly too short after
    cleaning: each chat's `kept` and `forwards` count messages in the bins, and add up to the source's."""
    df = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)
    rows = df.filter(pl.col("channel_id") == "3").head(160)
    # every 8th message is a repost of the one 4 before it (forwards fall on i % 4 == 1: some of them repost);
    # every 10th becomes a bare URL, which cleaning leaves empty
    msgs = rows["message"].to_list()
    for i in range(len(msgs)):
        if i % 8 == 5:
            msgs[i] = msgs[i - 4]
        elif i % 10 == 9:
            msgs[i] = "https://example.org/so-um-link"
    rows = rows.with_columns(message=pl.Series(msgs))
    one = tg.chat(rows.head(100), BASE + 3, "Grupo 3")
    two = tg.chat(rows.tail(60), BASE + 4, "Grupo 4")
    export = tg.write(tmp_path / "result.json", tg.account([one, two], []))
    out = tmp_path / "out"
    assert cli.main(["prepare", str(export), "--out", str(out), "--val-fraction", "0.1"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    (src,) = meta["sources"]
    records = src["files"][0]["chats"]
    in_bins = decode_messages(out / "train.bin") + decode_messages(out / "val.bin")
    assert sum(r["kept"] for r in records) == len(in_bins) == meta["train_messages"] + meta["val_messages"]
    assert [r["kept"] for r in records] == [src["messages_by_channel"][str(BASE + c)] for c in (3, 4)]
    # each chat: every message object read is dropped by the reader, left out later, or in the bins
    for r in records:
        assert r["messages"] == sum(r["dropped"].values()) + r["not_in_bins"] + r["kept"]
    # forwards: messages in the bins that the export marks as forwarded, one definition for chat and source
    cleaned = clean_series(rows["message"]).to_list()
    first: dict[str, int] = {}
    for i, text in enumerate(cleaned):
        first.setdefault(text, i)
    kept = [i for i, text in enumerate(cleaned) if len(text) >= 3 and first[text] == i]
    forwards = [i for i in kept if i % 4 == 1]  # (tg.chat marks every 4th message of a chat, 100 is a multiple)
    assert len(kept) == len(in_bins) and len(forwards) < sum(i % 4 == 1 for i in range(len(rows)))
    assert src["forwards"] == sum(r["forwards"] for r in records) == len(forwards)
    assert sum(sum(r["forwarded_from"].values()) for r in records) == len(forwards)
    repeats = sum(len(text) >= 3 and first[text] != i for i, text in enumerate(cleaned))
    assert meta["dropped"]["duplicate"] == repeats > 0 and meta["dropped"]["too_short"] > 0
