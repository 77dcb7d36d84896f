"""Collectors' tables: Telethon-style JSON Lines, Parquet and CSV with their own column names (`--columns`),
epoch and zoned ISO dates, marked channel ids; an unknown column is a one-line error."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest
import telegram_export as tg
from test_prepare import decode_messages, expected_messages
from test_telegram_json import BASE, OFF, RAW, _error, marked

from fakegpt import cli
from fakegpt.data import readers, tables
from fakegpt.data.prepare import parse_args, prepare


@pytest.fixture(scope="module")
def rows(shared_data) -> pl.DataFrame:
    """300 real messages from channels 2 and 4 (dates read as UTC)."""
    df = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)
    return pl.concat([df.filter(pl.col("channel_id") == c).head(150) for c in ("2", "4")])


def telethon_jsonl(rows: pl.DataFrame, path) -> None:
    """Telethon `Message.to_dict()` lines: nested peer objects or marked ids, zoned ISO dates or epoch seconds."""
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows.iter_rows(named=True)):
            chat = BASE + int(r["channel_id"])
            peer = {"_": "PeerChannel", "channel_id": chat} if i % 2 else marked(chat)
            when = tg.unix(r["date"])
            date = when if i % 3 == 0 else dt.datetime.fromtimestamp(when, dt.timezone.utc).isoformat()
            if i % 3 == 2:  # the same instant written in Brasília time
                date = dt.datetime.fromtimestamp(when, dt.timezone(dt.timedelta(hours=-3))).isoformat()
            obj = {"_": "Message", "id": i + 1, "peer_id": peer, "date": date, "text": r["message"], "out": False}
            fwd = None
            if i % 5 == 0:  # a forward: Telethon's header names the origin channel, or the sender's name
                origin = {"_": "PeerChannel", "channel_id": 555} if i % 10 else None
                fwd = {"_": "MessageFwdHeader", "date": date, "from_id": origin, "from_name": None if origin else "Zé"}
            f.write(json.dumps(obj | {"media": None, "fwd_from": fwd}, ensure_ascii=False) + "\n")


def run(tmp_path, out: str, *args: str) -> list[str]:
    assert cli.main(["prepare", *args, *RAW, "--out", str(tmp_path / out)]) == 0
    return decode_messages(tmp_path / out / "train.bin") + decode_messages(tmp_path / out / "val.bin")


def test_telethon_jsonl_with_a_column_map(tmp_path, rows):
    path = tmp_path / "telethon.jsonl"
    telethon_jsonl(rows, path)
    got = run(tmp_path, "all", str(path), "--columns", "message=text,channel_id=peer_id,date=date,id=id")
    assert got == expected_messages(rows["message"], OFF, 1)
    meta = json.loads((tmp_path / "all" / "meta.json").read_text())
    assert meta["sources"][0]["forwards"] == len(range(0, rows.height, 5))  # fwd_from found without a map
    frame = pl.concat(list(readers.read_batches(str(path), columns={"message": "text"})))
    assert frame["forwarded_from"].head(11).to_list() == ["Zé"] + [None] * 4 + ["555"] + [None] * 4 + ["Zé"]
    # a bare id and a marked id select the same chat, whichever way the file spells it
    four = expected_messages(rows.filter(pl.col("channel_id") == "4")["message"], OFF, 1)
    assert (
        run(tmp_path, "bare", str(path), "--columns", "message=text,channel_id=peer_id", "--channel-ids", str(BASE + 4))
        == four
    )
    assert run(tmp_path, "mark", str(path), "--columns", "message=text", "--channel-ids", str(marked(BASE + 4))) == four
    # epoch, UTC and -03:00 dates all land on the same UTC clock: a date split agrees with the CSV's dates
    cut = sorted(rows["date"].to_list())[200]
    meta = prepare(
        parse_args(
            [
                str(path),
                "--columns",
                "message=text",
                *RAW,
                "--split",
                "date",
                "--split-date",
                cut,
                "--out",
                str(tmp_path / "d"),
            ]
        ),
        track=False,
    )
    late = expected_messages(rows.filter(pl.col("date") >= cut)["message"], OFF, 1)
    assert decode_messages(tmp_path / "d" / "val.bin") == late and meta.val_messages == len(late)


def test_parquet_and_csv_with_their_own_names(tmp_path, rows):
    table = pl.DataFrame(
        {
            "content": rows["message"],
            "chat": rows["channel_id"].cast(pl.Int64) + BASE,
            "posted_at": rows["date"].str.to_datetime("%Y-%m-%dT%H:%M:%S", time_zone="UTC"),
        }
    )
    table.write_parquet(tmp_path / "t.parquet", row_group_size=50)
    want = expected_messages(rows["message"], OFF, 1)
    assert (
        run(tmp_path, "pq", str(tmp_path / "t.parquet"), "--columns", "message=content,channel_id=chat,date=posted_at")
        == want
    )
    # the same table as CSV, epoch dates, with the map given in a dataset YAML's source
    csv = table.with_columns(pl.col("posted_at").dt.epoch("s"), msg_id=pl.int_range(pl.len()))
    csv.write_csv(tmp_path / "t.csv")
    (tmp_path / "set.yaml").write_text(
        "sources:\n  - name: t\n    path: t.csv\n"
        "    columns: {message: content, channel_id: chat, date: posted_at, id: msg_id}\n"
    )
    meta = prepare(
        parse_args(["--config", str(tmp_path / "set.yaml"), *RAW, "--out", str(tmp_path / "c")]), track=False
    )
    assert decode_messages(tmp_path / "c" / "train.bin") == want and meta.sources[0]["files"][0]["format"] == "csv"
    (tmp_path / "top.yaml").write_text(  # the top-level key, as a mapping, for plain input files
        f"inputs: [{tmp_path / 't.csv'}]\ncolumns: {{message: content, channel_id: chat, date: posted_at}}\n"
    )
    top = prepare(parse_args(["--config", str(tmp_path / "top.yaml"), *RAW, "--out", str(tmp_path / "top")]), False)
    assert decode_messages(tmp_path / "top" / "train.bin") == want
    assert top.config["columns"] == ["message=content", "channel_id=chat", "date=posted_at"]


def test_unknown_columns_are_one_line_errors(tmp_path, capsys, rows, shared_data):
    path = tmp_path / "telethon.jsonl"
    telethon_jsonl(rows.head(5), path)
    out = str(tmp_path / "out")
    line = _error(capsys, str(path), "--columns", "message=txt", "--out", out)
    assert "telethon.jsonl: --columns message=txt: no column 'txt'" in line and "peer_id" in line
    line = _error(capsys, str(shared_data / "fakewhatsapp_br.csv"), "--columns", "message=body", "--out", out)
    assert "fakewhatsapp_br.csv: line 1: --columns message=body: no column 'body'" in line
    assert "--columns: unknown field 'msg'" in _error(capsys, str(path), "--columns", "msg=text", "--out", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "peer_id": 1, "date": 0}\n{"text": "b", \n')
    assert "bad.jsonl: line 2: malformed JSON" in _error(capsys, str(bad), "--out", out)


def test_date_normalisation():
    s = pl.Series(["2021-03-04T12:00:00+00:00", "2021-03-04T09:00:00-03:00", "1614859200", "2021-03-04T12:00:00Z"])
    assert tables.dates(s).to_list() == ["2021-03-04T12:00:00"] * 4
    assert tables.dates(pl.Series([1614859200, 1614859200000])).to_list() == ["2021-03-04T12:00:00"] * 2
    naive = pl.Series(["2018-07-02T02:17:00", "2018-07-02"])
    assert tables.dates(naive).to_list() == naive.to_list()
