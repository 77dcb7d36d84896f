"""Telegram Desktop JSON exports (per chat and whole account) built from the real data: the bins hold exactly
each chat's messages, filters by bare and marked ids and by chat type, meta.json's chat records, and
truncated or foreign JSON rejected as one line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest
import telegram_export as tg
from test_prepare import decode_messages, expected_messages, in_time

from fakegpt import cli
from fakegpt.data import telegram_json
from fakegpt.data.clean import CleanRules, clean_series
from fakegpt.data.prepare import parse_args, prepare

OFF = CleanRules(False, False, False, False, False)
RAW = ["--remove-mentions", "false", "--remove-urls", "false", "--remove-symbols", "false"]
RAW += ["--collapse-whitespace", "false", "--min-chars", "1", "--val-fraction", "0"]
BASE = 1_234_567_000  # chat ids of the size real channels have; marked: -100 followed by the id


def marked(chat_id: int) -> int:
    return -(10**12) - chat_id


@pytest.fixture(scope="module")
def whatsapp(shared_data) -> pl.DataFrame:
    return pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)


@pytest.fixture(scope="module")
def chats(whatsapp, shared_data) -> dict[int, pl.DataFrame]:
    """Rows per chat id: the four WhatsApp channels and 120 Fake.br fake-news articles (a left channel)."""
    out = {BASE + c: whatsapp.filter(pl.col("channel_id") == str(c)) for c in (1, 2, 3, 4)}
    news = pl.read_csv(shared_data / "fakebr_news.csv", infer_schema=False)
    out[BASE + 5] = news.filter(pl.col("channel_id") == "5").head(120)
    return out


@pytest.fixture(scope="module")
def account_export(chats, tmp_path_factory) -> Path:
    kinds = {1: "public_supergroup", 2: "public_channel", 3: "private_group", 4: "private_channel"}
    listed = [tg.chat(chats[BASE + c], BASE + c, f"Grupo {c}", kinds[c]) for c in (1, 2, 3, 4)]
    left = [tg.chat(chats[BASE + 5], BASE + 5, "Notícias", "public_channel")]
    return tg.write(tmp_path_factory.mktemp("export") / "result.json", tg.account(listed, left))


def raw_run(tmp_path: Path, out: str, *args: str) -> dict:
    assert cli.main(["prepare", *args, *RAW, "--out", str(tmp_path / out)]) == 0
    return json.loads((tmp_path / out / "meta.json").read_text())


def bins(folder: Path) -> list[str]:
    return decode_messages(folder / "train.bin") + decode_messages(folder / "val.bin")


def test_per_chat_export_every_message_shape(tmp_path, chats):
    rows = chats[BASE + 3]
    export = tg.write(tmp_path / "result.json", tg.chat(rows, BASE + 3, "COVID grupo", "private_supergroup"))
    meta = raw_run(tmp_path, "out", str(export), "--val-fraction", "0.1")
    assert bins(tmp_path / "out") == expected_messages(rows["message"], OFF, min_chars=1)
    (f,) = meta["sources"][0]["files"]
    assert f["format"] == "telegram-json" and f["rows"] == rows.height
    (c,) = f["chats"]
    n_extra = -(-rows.height // 5)  # a message without text before every fifth
    kinds = [(i // 5) % 6 for i in range(0, rows.height, 5)]
    assert (c["id"], c["name"], c["type"], c["left"]) == (BASE + 3, "COVID grupo", "private_supergroup", False)
    assert c["messages"] == rows.height + n_extra and c["kept"] == rows.height
    assert c["dropped"] == {
        "service": sum(k < 4 for k in kinds),
        "media_only": kinds.count(4),
        "empty_text": kinds.count(5),
        "chat_type": 0,
    }
    assert c["forwards"] == sum(i % 4 == 1 for i in range(rows.height))
    assert c["forwarded_from"] == {
        f"Fonte {k}": sum(i % 4 == 1 and i % 3 == k for i in range(rows.height)) for k in (0, 1, 2)
    }
    assert meta["dropped"]["service"] == c["dropped"]["service"] and meta["dropped"]["media_only"] > 0
    assert meta["sources"][0]["forwards"] == c["forwards"]  # no forward was a duplicate or too short


def test_reader_batches_carry_ids_utc_dates_and_forwards(tmp_path, chats):
    rows = chats[BASE + 1].head(50)
    export = tg.write(tmp_path / "chat.json", tg.chat(rows, -(10**12) - 77, "marked", "public_channel"))
    chats_seen: list[dict] = []
    with open(export, "rb") as f:
        df = pl.concat(list(telegram_json.read_export(f, str(export), chunk_bytes=2000, chats=chats_seen)))
    assert df["message"].to_list() == rows["message"].to_list()
    assert df["date"].to_list() == rows["date"].to_list()  # date_unixtime, written from the naive date as UTC
    assert df["forwarded_from"].is_not_null().sum() == sum(i % 4 == 1 for i in range(50))
    assert df["id"].is_sorted() and df["channel_id"].unique().to_list() == [-(10**12) - 77]


def test_whole_account_export_left_chats_and_per_chat_contents(tmp_path, chats, account_export):
    meta = raw_run(tmp_path, "all", str(account_export), "--dedupe", "false")
    # every chat's messages in time order (ties: chats.list first); no dedupe: a text in two chats stays twice
    expected = clean_series(in_time(pl.concat([chats[cid] for cid in sorted(chats)]))["message"], OFF).to_list()
    assert bins(tmp_path / "all") == expected
    records = meta["sources"][0]["files"][0]["chats"]
    assert [(r["id"], r["left"]) for r in records] == [(BASE + c, c == 5) for c in (1, 2, 3, 4, 5)]
    assert [r["kept"] for r in records] == [chats[BASE + c].height for c in (1, 2, 3, 4, 5)]
    assert meta["sources"][0]["messages_by_channel"] == {str(BASE + c): chats[BASE + c].height for c in range(1, 6)}
    # Each chat on its own, selected by its bare id or by its -100-marked id
    for c, ident in ((2, BASE + 2), (4, marked(BASE + 4)), (5, marked(BASE + 5))):
        raw_run(tmp_path, f"c{c}", str(account_export), "--channel-ids", str(ident))
        assert bins(tmp_path / f"c{c}") == expected_messages(chats[BASE + c]["message"], OFF, 1)


def test_chat_types_filter_and_yaml_channel_ids(tmp_path, chats, account_export):
    meta = raw_run(tmp_path, "types", str(account_export), "--chat-types", "private_group,private_channel")
    want = expected_messages(in_time(pl.concat([chats[BASE + 3], chats[BASE + 4]]))["message"], OFF, 1)
    assert bins(tmp_path / "types") == want
    assert meta["dropped"]["chat_type"] == sum(chats[BASE + c].height for c in (1, 2, 5))
    # dataset YAML: one source by a marked id, the other by a bare id (no fractions: both kept whole)
    yaml = tmp_path / "set.yaml"
    yaml.write_text(
        f"sources:\n  - {{name: left, path: {account_export}, channel_ids: [{marked(BASE + 5)}]}}\n"
        f"  - {{name: one, path: {account_export}, channel_ids: [{BASE + 1}]}}\n"
    )
    meta = prepare(parse_args(["--config", str(yaml), *RAW, "--out", str(tmp_path / "yaml")]), track=False)
    assert [s["channel_ids"] for s in meta.sources] == [[BASE + 5], [BASE + 1]]
    assert bins(tmp_path / "yaml") == expected_messages(
        pl.concat([chats[BASE + 5], chats[BASE + 1]])["message"], OFF, 1
    )


def test_format_flag_content_detection_and_gzip(tmp_path, chats):
    export = tg.write(tmp_path / "history.txt", tg.chat(chats[BASE + 2].head(40), 9, "g"))  # no .json suffix
    (tmp_path / "result.json.gz").write_bytes(gzip.compress(export.read_bytes()))
    raw_run(tmp_path, "auto", str(export))
    raw_run(tmp_path, "flag", str(export), "--format", "telegram-json")
    meta = raw_run(tmp_path, "gz", str(tmp_path / "result.json.gz"))
    want = expected_messages(chats[BASE + 2].head(40)["message"], OFF, 1)
    assert bins(tmp_path / "auto") == bins(tmp_path / "flag") == bins(tmp_path / "gz") == want
    assert meta["sources"][0]["files"][0]["bytes_read"] == (tmp_path / "result.json.gz").stat().st_size


def test_id_after_messages_is_applied_to_them(tmp_path, chats):
    rows = chats[BASE + 4].head(30)
    obj = tg.chat(rows, BASE + 4, "late id")
    late = {"messages": obj["messages"], "name": obj["name"], "type": obj["type"], "id": obj["id"]}
    export = tg.write(tmp_path / "late.json", late)
    raw_run(tmp_path, "late", str(export), "--channel-ids", str(marked(BASE + 4)), "--chunk-mb", "1")
    assert bins(tmp_path / "late") == expected_messages(rows["message"], OFF, 1)


def _error(capsys, *args: str) -> str:
    assert cli.main(["prepare", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # MLflow may log its own lines before
    assert err[-1].startswith("fakegpt prepare: error: ") and not any("Traceback" in x for x in err), err
    return err[-1]


def test_truncated_and_foreign_json_are_one_line_errors(tmp_path, capsys, chats):
    full = tg.write(tmp_path / "full.json", tg.chat(chats[BASE + 1].head(200), BASE + 1, "x")).read_bytes()
    cut = tmp_path / "cut.json"
    cut.write_bytes(full[: len(full) // 2])
    out = tmp_path / "out"
    line = _error(capsys, str(cut), "--out", str(out))
    assert "cut.json: malformed or truncated JSON near byte" in line and "after message id" in line
    assert not out.exists() or not any(out.iterdir())  # no partial output
    broken = tmp_path / "broken.json"
    broken.write_bytes(full.replace(b'"type": "message"', b'"type": message', 1))
    assert "broken.json: malformed or truncated JSON near byte" in _error(capsys, str(broken), "--out", str(out))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"data": [{"text": "olá", "id": 1}], "version": 2}))
    line = _error(capsys, str(other), "--out", str(out))
    assert "other.json: not a Telegram Desktop export" in line and "data, version" in line
    other.write_text(json.dumps([{"text": "olá"}]))
    assert "not a Telegram Desktop export" in _error(capsys, str(other), "--out", str(out))
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name
    lines.write_text("".join(json.dumps({"text": f"mensagem {i}", "peer_id": 1, "date": 0}) + "\n" for i in (1, 2)))
    assert "use --format jsonl" in _error(capsys, str(lines), "--out", str(out))
    assert cli.main(["prepare", str(lines), "--format", "jsonl", "--out", str(tmp_path / "ok")]) == 0
    assert "--chat-types: unknown chat type 'channel'" in _error(
        capsys, str(other), "--chat-types", "channel", "--out", str(out)
    )


def test_large_exports_are_parsed_in_a_child_process(tmp_path, capsys, chats, account_export, monkeypatch):
    """Above CHILD_PROCESS_BYTES the parse runs in a child process: the same bins, chat records and sha256,
    and its errors still one line."""
    import hashlib

    inline = raw_run(tmp_path, "inline", str(account_export), "--dedupe", "false")
    monkeypatch.setattr(telegram_json, "CHILD_PROCESS_BYTES", 0)
    child = raw_run(tmp_path, "child", str(account_export), "--dedupe", "false")
    assert bins(tmp_path / "child") == bins(tmp_path / "inline")
    (a,), (b,) = inline["sources"][0]["files"], child["sources"][0]["files"]
    assert a == b and b["sha256"] == hashlib.sha256(account_export.read_bytes()).hexdigest()
    assert child["dropped"] == inline["dropped"]
    cut = tmp_path / "cut.json"
    cut.write_bytes(account_export.read_bytes()[:200_000])
    line = _error(capsys, str(cut), "--out", str(tmp_path / "out"))
    assert "cut.json: malformed or truncated JSON near byte" in line and "after message id" in line
