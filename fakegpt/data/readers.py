"""One entry point for every input format prepare reads; each yields the batches csv_reader yields.

Formats: `csv` and `naive` (csv_reader), `telegram-json` (Telegram Desktop's result.json, telegram_json),
`jsonl` and `parquet` (collectors' tables, tables). `auto` picks by extension (`.parquet`, `.jsonl`/`.ndjson`,
each optionally `.gz`) and then by content: a file that opens a JSON object is a Telegram export, anything else
a CSV (well-formed or naive, sniffed as before). `columns` (`--columns`) maps fields to a table's own names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import polars as pl

from fakegpt.data import csv_reader, tables, telegram_json
from fakegpt.data.csv_reader import ReadStats, _open, _read
from fakegpt.errors import FakegptError
from fakegpt.files import check_text_input

FORMATS = ("auto", "csv", "naive", telegram_json.FORMAT, "jsonl", "parquet")


def _stem(path: str) -> str:
    name = path.lower()
    return name[:-3] if name.endswith(".gz") else name


def _open_raw(path: str) -> BinaryIO:
    p = Path(path)
    if not p.exists():
        raise FakegptError(f"{path}: no such file")
    if p.is_dir():
        raise FakegptError(f"{path}: is a folder, not a file")
    try:
        return open(p, "rb")  # noqa: SIM115 (the caller closes it)
    except OSError as exc:
        raise FakegptError(f"{path}: cannot read ({exc.strerror})") from None


def detect(path: str, fmt: str = "auto", raw: BinaryIO | None = None) -> str:
    """The format of one input file: `fmt` unless it is `auto`."""
    if fmt not in FORMATS:
        raise FakegptError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    stem = _stem(path)
    if stem.endswith(".parquet"):
        return "parquet"
    if stem.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if raw is not None:
        return "auto"  # the embedded demo data: CSV
    f = _open_raw(path)
    try:
        head = _read(_open(path, f)[0], 4096, path)
    finally:
        f.close()
    return telegram_json.FORMAT if telegram_json.looks_like_json(head) else "auto"


def file_chat(path: str) -> str:
    """The chat a file without a chat column is read as: its name without extensions (`AwasMart.csv.gz` ->
    `AwasMart`), so a scrape of one channel is that channel."""
    name = Path(path).name
    stem = name[:-3] if name.lower().endswith(".gz") else name
    return Path(stem).stem or name


def _in_child(path: str, raw: BinaryIO | None) -> bool:
    """Parse a large Telegram export in a child process, where there is a second core to run it on."""
    if raw is not None or (os.cpu_count() or 1) < 2:
        return False
    return Path(path).stat().st_size >= telegram_json.CHILD_PROCESS_BYTES


def _counted(batches: Iterator[pl.DataFrame], stats: ReadStats) -> Iterator[pl.DataFrame]:
    """Telegram batches, counted into `stats`; at the end, the chats' drops summed by reason."""
    for df in batches:
        stats.rows += df.height
        yield df
    stats.skipped = {r: sum(c["dropped"][r] for c in stats.chats) for r in telegram_json.DROP_REASONS}


def check(path: str, fmt: str = "auto", columns: dict[str, str] | None = None, chat: int | str | None = None) -> None:
    """Fail fast (before a tracking run starts) on a missing, empty or header-less file, an unknown column, or
    JSON that is not a Telegram export. `chat`: as read_batches's (a file's name names its chat by default)."""
    if fmt != "parquet" and not _stem(path).endswith(".parquet"):
        check_text_input(path)  # binary or CR-only files: a clear error before a text reader (or detect) sees them
    kind = detect(path, fmt)
    if kind == telegram_json.FORMAT:
        if columns or chat is not None:
            flag = "--columns" if columns else "--channel-id"
            raise FakegptError(
                f"{path}: {flag} applies to CSV, JSON Lines and Parquet tables, not to a Telegram export"
            )
        raw = _open_raw(path)
        try:
            telegram_json.check_export(_open(path, raw)[0], path)
        finally:
            raw.close()
        return
    for _ in read_batches(path, kind, header_only=True, columns=columns, chat=chat, fallback_chat=file_chat(path)):
        pass


def read_batches(
    path: str,
    fmt: str = "auto",
    chunk_bytes: int = 8 << 20,
    raw: BinaryIO | None = None,
    stats: ReadStats | None = None,
    header_only: bool = False,
    columns: dict[str, str] | None = None,
    chat_types: frozenset[str] | None = None,
    chat: int | str | None = None,
    fallback_chat: int | str | None = None,
) -> Iterator[pl.DataFrame]:
    """Yield DataFrames with `channel_id` (Int64, or String where chats are @usernames), `date` and `message`
    (String) from one input file. Tables: `chat` is the chat of every row, `fallback_chat` that of every row of
    a file without a chat column (prepare gives the file's name)."""
    stats = stats if stats is not None else ReadStats()
    kind = detect(path, fmt, raw)
    if kind in ("auto", "csv", "naive"):
        batches = csv_reader.read_csv_batches(
            path, kind, chunk_bytes, raw, stats, header_only, columns, chat, fallback_chat
        )
        for df in batches:
            if stats.mapped or stats.chat is not None:  # a collector's CSV: epoch or zoned ISO dates as well
                df = df.with_columns(date=tables.dates(df["date"]))
            yield df  # (the standard layouts exactly as before)
        return
    stats.format = kind
    if kind == "parquet":
        yield from tables.read_parquet(path, columns or {}, chunk_bytes, stats, header_only, chat, fallback_chat)
        with open(path, "rb") as f:  # the file's sha256 for meta.json, without holding it in memory
            hashing = csv_reader._HashingReader(f)
            stats.sha256 = hashing.finish()
            stats.bytes_read = hashing.count
        return
    if kind == telegram_json.FORMAT and not header_only and _in_child(path, raw):
        yield from _counted(telegram_json.read_export_in_child(path, chunk_bytes, chat_types, stats), stats)
        return
    f = raw if raw is not None else _open_raw(path)
    try:
        stream, hashing = _open(path, f)
        if kind == "jsonl":
            batches = tables.read_jsonl(
                stream, path, columns or {}, chunk_bytes, stats, header_only, chat, fallback_chat
            )
            for df in batches:
                stats.bytes_read = hashing.count
                yield df
        else:
            if header_only:
                return

            def progress() -> None:
                stats.bytes_read = hashing.count

            yield from _counted(
                telegram_json.read_export(stream, path, chunk_bytes, chat_types, stats.chats, progress), stats
            )
        stats.sha256 = hashing.finish()
        stats.bytes_read = hashing.count
    finally:
        f.close()
