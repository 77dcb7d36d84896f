"""Reading exports: well-formed CSV in chunks, the naive-export repair, gzip, format detection, bad input."""

from __future__ import annotations

import gzip

import polars as pl
import pytest

from fakegpt.data.csv_reader import ReadStats, read_csv_batches, sniff_format
from fakegpt.errors import FakegptError

HEADER = b"id,channel_id,date,message\n"


def read(path, fmt="auto", chunk_bytes=8 << 20) -> tuple[pl.DataFrame, ReadStats]:
    stats = ReadStats()
    batches = list(read_csv_batches(str(path), fmt, chunk_bytes, stats=stats))
    return pl.concat(batches), stats


def test_naive_repair_commas_quotes_trailing_comma(tmp_path):
    p = tmp_path / "naive.csv"
    p.write_bytes(
        HEADER
        + (
            '1,7,2021-01-01T10:00:00,Bom dia, grupo, "vacina" é "segura",\n'
            "2,7,2021-01-01T10:05:00,sem vírgula\n"
            "3,8,2021-01-01T10:06:00,termina com vírgula,\n"
            '4,8,2021-01-01T10:07:00,"começa com aspas, e segue\n'
        ).encode()
    )
    df, stats = read(p)
    assert stats.format == "naive"
    assert df["message"].to_list() == [
        'Bom dia, grupo, "vacina" é "segura",',
        "sem vírgula",
        "termina com vírgula,",
        '"começa com aspas, e segue',
    ]
    assert df["channel_id"].to_list() == [7, 7, 8, 8]
    assert df["date"].to_list()[0] == "2021-01-01T10:00:00"
    assert stats.repaired_rows == 3 and stats.bad_rows == 0


def test_naive_continuation_lines_and_orphans(tmp_path):
    p = tmp_path / "naive.csv"
    p.write_bytes(
        HEADER
        + (
            "linha solta antes de tudo\n"
            "1,7,2021-01-01,primeira linha, com vírgula\n"
            "segunda linha da mesma mensagem\n"
            "\n"
            "2,7,2021-01-02,outra\r\n"
        ).encode()
    )
    df, stats = read(p, fmt="naive")
    assert df["message"].to_list() == ["primeira linha, com vírgula\nsegunda linha da mesma mensagem\n", "outra"]
    assert stats.continuation_lines == 2
    assert stats.bad_rows == 1
    assert stats.bad_row_examples[0].startswith(f"{p}: line 2:")


def test_naive_chunks_never_split_a_message(tmp_path):
    rows = [f'{i},{i % 3},2021-01-01,mensagem {i}, com vírgula "e aspas"\ncontinua {i}\n' for i in range(1, 400)]
    p = tmp_path / "naive.csv"
    p.write_bytes(HEADER + "".join(rows).encode())
    small, _ = read(p, fmt="naive", chunk_bytes=256)
    whole, _ = read(p, fmt="naive")
    assert small["message"].to_list() == whole["message"].to_list()
    assert small.height == 399 and small["message"][5] == 'mensagem 6, com vírgula "e aspas"\ncontinua 6'


def test_real_naive_export_equals_well_formed(shared_data):
    """Repaired messages equal the main file's (every third row) with line breaks turned into spaces; the
    quotes the naive export leaves raw are kept too (the data README's check strips them on both sides)."""
    naive, stats = read(shared_data / "fakewhatsapp_br-naive.csv")
    full = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)[::3]
    assert stats.format == "naive" and naive.height == full.height == 2728
    expected = full["message"].str.replace_all(r"\r\n|[\n\r\u2028\u2029\u0085\x0b\x0c]", " ")
    assert naive["message"].to_list() == expected.to_list()
    assert (naive["message"].str.replace_all('"', "") == expected.str.replace_all('"', "")).all()
    assert naive["channel_id"].to_list() == full["channel_id"].cast(pl.Int64).to_list()
    assert stats.repaired_rows >= 1449  # the README: 1,449 lines have commas inside the message
    assert naive["message"].str.ends_with(",").sum() == 2  # the trailing-comma trap (ids 853 and 3631)


def test_well_formed_chunked_equals_polars(shared_data):
    df, stats = read(shared_data / "fakewhatsapp_br.csv", chunk_bytes=64 << 10)
    ref = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)
    assert stats.format == "csv" and stats.rows == 8182
    assert df["message"].to_list() == ref["message"].to_list()  # multi-line quoted records survive the cuts
    assert stats.sha256 == "7367c30452ad6feaccb106954e90cff5eba56d68fdaae8a21d0889eed45a653d"


def test_gzip_and_extra_columns_in_any_order(tmp_path):
    p = tmp_path / "export.csv.gz"
    body = 'views,message,date,channel_id,id\n5,"olá, mundo",2021-01-01,9,1\n6,"duas\nlinhas",2021-01-02,9,2\n'
    p.write_bytes(gzip.compress(body.encode()))
    df, stats = read(p)
    assert df["message"].to_list() == ["olá, mundo", "duas\nlinhas"] and df["channel_id"].to_list() == [9, 9]
    assert stats.format == "csv" and len(stats.sha256) == 64


def test_invalid_utf8_replaced_and_counted(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_bytes(HEADER + b"1,1,2021-01-01,ol\xe1 mundo\n2,1,2021-01-01,ok \xef\xbf\xbd genuine\n")
    df, stats = read(p)
    assert df["message"][0] == "ol\ufffd mundo"
    assert stats.invalid_utf8 == 1  # the genuine U+FFFD in row 2 is not an error


def test_sniff():
    assert sniff_format(b'1,2,d,"a, b"\n2,2,d,plain\n', ["id", "channel_id", "date", "message"]) == "csv"
    assert sniff_format(b"1,2,d,a, b\n", ["id", "channel_id", "date", "message"]) == "naive"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"id,date,message\n1,2021,x\n", "line 1: missing column 'channel_id'"),
        (b"\n\n", "empty file"),
    ],
)
def test_bad_files(tmp_path, content, message):
    p = tmp_path / "x.csv"
    p.write_bytes(content)
    with pytest.raises(FakegptError, match=message) as err:
        read(p)
    assert str(p) in str(err.value)


def test_missing_file_and_unreadable_gzip(tmp_path):
    with pytest.raises(FakegptError, match="no such file"):
        read(tmp_path / "nope.csv")
    p = tmp_path / "broken.csv.gz"
    p.write_bytes(gzip.compress(HEADER + b"1,1,2021,abc\n" * 100)[:40])
    with pytest.raises(FakegptError, match=f"{p}: unreadable gzip"):
        read(p)


def test_malformed_csv_names_lines(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(HEADER + b"1,1,2021,ok\n" * 3 + b"2,1,2021,a,b\n")
    with pytest.raises(FakegptError, match=r"x.csv: lines 2-\d+: malformed CSV.*--format naive"):
        read(p, fmt="csv")


def test_non_integer_channel_is_counted_with_its_record(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(HEADER + b"1,1,2021,ok\n2,abc,2021,bad\n3,1,2021,ok too\n")
    df, stats = read(p)
    assert df["message"].to_list() == ["ok", "ok too"]
    assert stats.bad_rows == 1 and "record 2" in stats.bad_row_examples[0]
