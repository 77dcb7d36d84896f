"""Collectors' files read as their owners meant: Telegram Desktop messages one per line (entity-list text),
one-channel scrapes without a chat column, a pandas index column, chats named by @username, and a file whose
every row fails saying why. The fixtures are written here from the real messages of ../shared/data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import polars as pl
import pytest
import telegram_export as tg
from test_prepare import decode_messages, expected_messages
from test_telegram_json import BASE, OFF, RAW, _error

from fakegpt import cli


@pytest.fixture(scope="module")
def rows(shared_data) -> pl.DataFrame:
    """200 real messages of one WhatsApp group, oldest first, each at its own second."""
    df = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)
    return df.filter(pl.col("channel_id") == "3").head(200)


def prepared(tmp_path: Path, out: str, *args: str) -> tuple[list[str], dict]:
    assert cli.main(["prepare", *args, *RAW, "--out", str(tmp_path / out)]) == 0
    folder = tmp_path / out
    return (
        decode_messages(folder / "train.bin") + decode_messages(folder / "val.bin"),
        json.loads((folder / "meta.json").read_text()),
    )


def telethon_csv(path: Path, rows: pl.DataFrame, header: list[str], chat: list[str] | None = None) -> Path:
    """A Telethon scrape of one channel: `id,date,text,views,forwards`, UTC dates with an offset."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, r in enumerate(rows.iter_rows(named=True)):
            date = r["date"].replace("T", " ") + "+00:00"
            w.writerow([i + 1, date, r["message"], 100 + i, i % 7] + ([chat[i % len(chat)]] if chat else []))
    return path


def test_desktop_messages_one_per_line_read_as_result_json(tmp_path, rows):
    """JSON Lines of Desktop message objects: entity-list texts joined exactly as result.json's, the chat named
    by the file (the lines carry none), a Parquet table of entity structs the same."""
    chat = tg.chat(rows, BASE + 3, "Grupo 3")
    export = tg.write(tmp_path / "result.json", chat)
    lines = tmp_path / "grupo3.jsonl"
    lines.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in chat["messages"]), encoding="utf-8")
    want, _ = prepared(tmp_path, "json", str(export))
    assert want == expected_messages(rows["message"], OFF, 1)
    got, meta = prepared(tmp_path, "jsonl", str(lines))
    assert got == want
    assert meta["sources"][0]["messages_by_channel"] == {"grupo3": len(want)}
    assert meta["sources"][0]["files"][0]["channel_id"] == "grupo3"
    assert not any(m.startswith("[") and "'type'" in m for m in got)
    # Parquet: the same texts as lists of {type, text} structs
    entities = [m["text_entities"] for m in chat["messages"]]
    pl.DataFrame({"text": entities, "date": [m["date_unixtime"] for m in chat["messages"]]}).write_parquet(
        tmp_path / "g.parquet"
    )
    got, _ = prepared(tmp_path, "pq", str(tmp_path / "g.parquet"), "--channel-id", str(BASE + 3))
    assert got == want


def test_one_channel_scrape_without_a_chat_column(tmp_path, rows):
    path = telethon_csv(tmp_path / "AwasMart.csv", rows, ["id", "date", "text", "views", "forwards"])
    want = expected_messages(rows["message"], OFF, 1)
    got, meta = prepared(tmp_path, "byname", str(path))  # `text` found as the message, the file names the chat
    assert got == want and meta["sources"][0]["messages_by_channel"] == {"AwasMart": len(want)}
    got, meta = prepared(tmp_path, "byflag", str(path), "--channel-id", "@AwasMart", "--channel-ids", "@awasmart")
    assert got == want and meta["sources"][0]["messages_by_channel"] == {"@AwasMart": len(want)}
    assert meta["config"]["channel_ids"] == ["@awasmart"] and meta["dropped"]["channel_filter"] == 0
    got, meta = prepared(tmp_path, "byid", str(path), "--channel-id", str(-(10**12) - BASE), "--channel-ids", str(BASE))
    assert got == want and meta["sources"][0]["messages_by_channel"] == {str(BASE): len(want)}
    # a dataset YAML names the chat per source
    (tmp_path / "set.yaml").write_text(f"sources:\n  - {{name: awas, path: {path}, channel_id: '@AwasMart'}}\n")
    got, meta = prepared(tmp_path, "yaml", "--config", str(tmp_path / "set.yaml"))
    assert got == want and meta["sources"][0]["messages_by_channel"] == {"@AwasMart": len(want)}


def test_pandas_csv_with_an_unnamed_index_column(tmp_path, rows):
    path = tmp_path / "scrape.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:  # what pandas' DataFrame.to_csv writes
        csv.writer(f).writerows(
            [
                ["", "date", "message"],
                *([i, d, m] for i, (d, m) in enumerate(rows.select("date", "message").iter_rows())),
            ]
        )
    assert path.read_text(encoding="utf-8").startswith(",date,message\n")
    want = expected_messages(rows["message"], OFF, 1)
    got, meta = prepared(tmp_path, "plain", str(path))
    assert got == want and meta["sources"][0]["messages_by_channel"] == {"scrape": len(want)}
    got, _ = prepared(tmp_path, "mapped", str(path), "--columns", "id=,date=date", "--channel-id", "7")
    assert got == want


def test_chats_named_by_username(tmp_path, rows, capsys):
    names = ["@Canal_Um", "canal_dois", "https://t.me/CanalTres"]
    path = telethon_csv(tmp_path / "many.csv", rows, ["id", "date", "text", "views", "forwards", "channel"], names)
    got, meta = prepared(tmp_path, "all", str(path), "--columns", "channel_id=channel,message=text")
    assert got == expected_messages(rows["message"], OFF, 1)
    by = meta["sources"][0]["messages_by_channel"]
    assert set(by) == {"@Canal_Um", "@canal_dois", "@CanalTres"} and sum(by.values()) == len(got)
    got, meta = prepared(
        tmp_path, "one", str(path), "--columns", "channel_id=channel,message=text", "--channel-ids", "CANAL_UM"
    )
    assert got == expected_messages(rows["message"].gather_every(3), OFF, 1)
    assert meta["dropped"]["channel_filter"] == rows.height - len(got)
    # every row fails: the error gives the count and the reason, not "dropped: none"
    bad = telethon_csv(tmp_path / "bad.csv", rows, ["id", "date", "text", "views", "forwards", "Channel"], ["a b"])
    line = _error(capsys, str(bad), "--columns", "channel_id=Channel,message=text", "--out", str(tmp_path / "x"))
    assert f"no usable messages ({rows.height:,} rows: channel_id is not an integer or a @username" in line
    # header names quoted as the file spells them
    line = _error(capsys, str(bad), "--columns", "channel_id=Chat", "--out", str(tmp_path / "x"))
    assert "no column 'Chat' (header has: id, date, text, views, forwards, Channel)" in line
